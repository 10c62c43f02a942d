"""Writers without TensorFlow: TensorBoard files read back with TensorBoard's own reader, the
workdir config, Orbax's console filter, and compile time left out of throughput."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ultrajax.train import timing, writers


def test_flatten_hparams_by_hand():
  config = ml_collections.ConfigDict(
    dict(
      seed=0,
      model=dict(width=64, dtype="float32", sizes=(1, 2)),
      lr=1e-3,
      fed=dict(opt=dict(name="adam", eps=None)),
      ok=True,
    )
  )
  assert writers.flatten_hparams(config) == {
    "seed": 0,
    "model.width": 64,
    "model.dtype": "float32",
    "model.sizes": "(1, 2)",
    "lr": 1e-3,
    "fed.opt.name": "adam",
    "fed.opt.eps": "None",
    "ok": True,
  }


def test_tensorboard_file_read_back_by_tensorboard(tmp_path):
  event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  writer = writers.create_writer(tmp_path)
  writer.write_hparams({"model": {"width": 64}, "seed": 3})
  writer.write_scalars(1, {"loss": 2.5, "img_per_s": np.float32(10.0)})
  writer.write_scalars(2, {"loss": 1.5})
  image = np.zeros((6, 8, 3), np.uint8)
  image[:, :4, 0] = 255
  writer.write_images(2, {"reconstructions": image})
  writer.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"images": 0})
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.5), (2, 1.5)]
  assert acc.Tags()["images"] == ["reconstructions"]
  shown = acc.Images("reconstructions")[0]
  assert (shown.step, shown.width, shown.height) == (2, 8, 6)
  plugin = acc.PluginTagToContent("hparams")
  assert any(b"model.width" in content for content in plugin.values())
  rows = writers.read_jsonl(tmp_path / "metrics.jsonl")
  assert rows == [{"step": 1, "loss": 2.5, "img_per_s": 10.0}, {"step": 2, "loss": 1.5}]


def test_jobs_import_and_write_without_tensorflow_or_torch(tmp_path):
  """clu's writers and progress reports load, the jobs import and a job's writer writes its
  TensorBoard file without TensorFlow, and without PyTorch (tensorboardX imports torch where
  it is installed), which still imports afterwards where installed."""
  code = textwrap.dedent(f"""
    import sys
    import ultrajax.jobs.pretrain, ultrajax.jobs.finetune, ultrajax.jobs.sam
    from clu import periodic_actions
    from ultrajax.train import writers
    writer = writers.create_writer({str(tmp_path)!r})
    writer.write_scalars(1, {{"loss": 2.5}})
    writer.close()
    print("tensorflow" in sys.modules, "torch" in sys.modules)
    try:
      import torch
    except ImportError as e:
      assert "torch" in str(e) and "None in sys.modules" not in str(e), e
  """)
  done = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    check=False,
    env={"JAX_PLATFORMS": "cpu", "PATH": ""},
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip() == "False False"
  assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1


def test_log_config_writes_a_readable_config_json(tmp_path):
  config = ml_collections.ConfigDict(dict(job="pretrain", model=dict(width=64, sizes=(1, 2))))
  writers.log_config(config, tmp_path)
  back = ml_collections.ConfigDict(json.loads((tmp_path / "config.json").read_text()))
  assert back.model.width == 64 and list(back.model.sizes) == [1, 2] and back.job == "pretrain"


def test_quiet_orbax_drops_only_orbax_info_lines():
  logger = logging.getLogger("absl")

  def record(path, level):
    return logger.makeRecord("absl", level, path, 1, "message", (), None)

  writers.quiet_orbax(True)
  try:
    assert not logger.filter(record("/venv/site-packages/orbax/checkpoint/x.py", logging.INFO))
    assert logger.filter(record("/venv/site-packages/orbax/checkpoint/x.py", logging.WARNING))
    assert logger.filter(record("/repo/ultrajax/jobs/pretrain.py", logging.INFO))
  finally:
    writers.quiet_orbax(False)
  assert logger.filter(record("/venv/site-packages/orbax/checkpoint/x.py", logging.INFO))


def test_compile_clock_counts_compilation_once_and_merges_overlaps():
  clock = timing.CompileClock()
  try:
    fn = jax.jit(lambda x: jnp.sin(x) * 3.0 + x.sum())  # a new function: traced and compiled
    t0 = timing.now()
    fn(jnp.ones(7)).block_until_ready()
    t1 = timing.now()
    first = clock.seconds_between(t0, t1)
    fn(jnp.ones(7)).block_until_ready()  # cached: nothing compiles
    t2 = timing.now()
    assert 0 < first <= t1 - t0
    assert clock.seconds_between(t1, t2) == 0.0
    clock._spans[:] = []  # by hand: [1, 3] and [2, 5] overlap, [7, 8] is cut at the window end
    for span in ((1.0, 3.0), (2.0, 5.0), (7.0, 8.0)):
      clock._listen(timing.COMPILE_EVENTS[0], *span)
    clock._listen("/jax/other_event", 0.0, 10.0)
    assert clock.seconds_between(0.0, 7.5) == pytest.approx(4.0 + 0.5)
  finally:
    clock.close()
