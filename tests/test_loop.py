"""train/loop.py: itstime, put_global, atomic_write, resume_or_init against hand-worked cases."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ultrajax.train import checkpoint, loop, resume, sharding


@pytest.mark.parametrize(
  "every,last,expected",
  [
    (3, 10, [3, 6, 9, 10]),  # multiples of 3, and the last step
    (5, 10, [5, 10]),  # the last step is also a multiple: once
    (1, 10, list(range(1, 11))),
    (4, None, [4, 8]),  # no last step given
    (20, 10, [10]),  # longer than the run: only the end
    (0, 10, []),  # 0 and None switch the action off, the last step included
    (None, 10, []),
  ],
)
def test_itstime(every, last, expected):
  assert [s for s in range(1, 11) if loop.itstime(s, every, last)] == expected


def test_put_global_splits_host_values_by_the_sharding():
  mesh = sharding.make_mesh(clients=2, data=4)
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  by_rows = NamedSharding(mesh, P("data"))
  out = loop.put_global(x, by_rows)
  assert out.sharding == by_rows and out.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(out), x)
  for shard in out.addressable_shards:  # each device holds exactly its two rows
    np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])
    assert shard.data.shape == (2, 3)
  # A pytree with one sharding for every leaf; a 0-d integer keeps its dtype.
  tree = loop.put_global({"a": np.int32(7), "b": np.array([1.5, 2.5])}, sharding.replicated(mesh))
  assert tree["a"].dtype == np.int32 and int(tree["a"]) == 7
  assert all(s.data.shape == (2,) for s in tree["b"].addressable_shards)
  # A matching tree of shardings.
  pair = loop.put_global((x, x[:, 0]), (by_rows, NamedSharding(mesh, P("clients"))))
  assert pair[1].addressable_shards[0].data.shape == (4,)
  np.testing.assert_array_equal(np.asarray(pair[1]), x[:, 0])


def test_atomic_write_kinds_and_replacement(tmp_path):
  path = tmp_path / "sub" / "results.json"
  loop.atomic_write(path, {"auroc": [0.5, 0.25, 0.75]})
  assert json.loads(path.read_text()) == {"auroc": [0.5, 0.25, 0.75]}
  loop.atomic_write(path, {"auroc": 1})  # replaces the old file
  assert json.loads(path.read_text()) == {"auroc": 1}
  loop.atomic_write(tmp_path / "a.txt", "héllo")
  assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
  loop.atomic_write(tmp_path / "b.bin", b"\x00\x01")
  assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
  arrays = {"probs": np.eye(3, dtype=np.float32), "labels": np.arange(3)}
  loop.atomic_write(tmp_path / "c.npz", arrays)
  with np.load(tmp_path / "c.npz") as f:
    assert set(f) == {"probs", "labels"}
    np.testing.assert_array_equal(f["probs"], arrays["probs"])
  assert sorted(p.name for p in tmp_path.rglob("*.tmp")) == []


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
  path = tmp_path / "results.json"
  loop.atomic_write(path, {"v": 1})
  with pytest.raises(TypeError):  # not JSON: nothing is written
    loop.atomic_write(path, {"v": object()})

  def killed(*_):
    raise KeyboardInterrupt

  monkeypatch.setattr(os, "replace", killed)  # killed between writing and renaming
  with pytest.raises(KeyboardInterrupt):
    loop.atomic_write(path, {"v": 2})
  assert json.loads(path.read_text()) == {"v": 1}
  assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # the temporary file is gone


@pytest.fixture
def state():
  mesh = sharding.make_mesh(clients=1, data=8)
  rep = sharding.replicated(mesh)
  params = loop.put_global({"w": np.arange(8, dtype=np.float32)}, rep)
  train = loop.put_global({"opt": np.full(8, 3.0, np.float32)}, rep)
  return params, train


def test_resume_or_init_inits_then_restores_exactly(tmp_path, state):
  params, train = state
  config = ml_collections.ConfigDict({"lr": 0.1, "log_every_steps": 1})
  calls = []

  def init():
    calls.append(1)
    return params, train

  ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
  step, p, t = loop.resume_or_init(ckpt, params, train, init, config=config)
  assert (step, p, t, len(calls)) == (0, params, train, 1)
  moved = jax.tree.map(lambda x: x + 1, params)
  ckpt.save(3, moved, train, None, {"config": resume.snapshot(config)})
  ckpt.close()

  ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
  abstract = checkpoint.abstract_like(params, jax.tree.map(lambda x: x.sharding, params))
  config.log_every_steps = 5  # a cadence may change on resume (resume.CHANGEABLE)
  step, p, t = loop.resume_or_init(ckpt, abstract, train, init, config=config)
  assert step == 3 and len(calls) == 1  # init is not run on resume
  np.testing.assert_array_equal(np.asarray(p["w"]), np.arange(8) + 1.0)
  np.testing.assert_array_equal(np.asarray(t["opt"]), np.full(8, 3.0))
  assert p["w"].sharding == params["w"].sharding
  assert ckpt.read_meta(3)["process_count"] == jax.process_count()  # save adds it

  config.lr = 0.2  # changes the result: refused with the field named
  with pytest.raises(resume.ConfigMismatchError, match="lr: 0.1 -> 0.2"):
    loop.resume_or_init(ckpt, params, train, init, config=config)
  ckpt.close()


def test_resume_or_init_refuses_another_process_count(tmp_path, state):
  params, train = state
  config = ml_collections.ConfigDict({"lr": 0.1})
  ckpt = checkpoint.Checkpointer(tmp_path)
  ckpt.save(2, params, train, None, {"process_count": 4, "config": resume.snapshot(config)})
  ckpt.wait()
  with pytest.raises(ValueError, match="written by 4 processes, this run has 1"):
    loop.resume_or_init(ckpt, params, train, lambda: (params, train), config=config)
  ckpt.close()
