"""Run safety (issue 15): divergence stops a run and keeps the good checkpoint, resume checks the
config, one process per workdir, fallback past damaged checkpoints and torn metrics lines,
shape mismatches named. Each test provokes the failure for real, on tiny shapes."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ultrajax import configlib
from ultrajax.fed import rounds, strategies
from ultrajax.interop import load as interop_load
from ultrajax.jobs import finetune, pretrain
from ultrajax.train import checkpoint, divergence, resume, writers

REPO = pathlib.Path(__file__).resolve().parents[1]


def smoke_config(**overrides):
  config = configlib.load_config_module(REPO / "configs" / "pretrain_fed.py").get_config("smoke")
  config.mesh.update(clients=1, data=1)
  # A smaller model, no evaluators, no PNGs before the last round, no MIC or SMAT: these
  # tests are about the training state, and each compile counts.
  config.model.update(
    width=32, depth=1, num_heads=2, decoder_width=16, decoder_heads=2, image_size=16
  )
  config.ultramim.update(mic=False, smat=False)
  config.update_from_flattened_dict(
    {"evals.linear_probe.every_rounds": 0, "evals.knn.every_rounds": 0, "image_every_rounds": 100}
  )
  config.update_from_flattened_dict(overrides)
  return config


def rounds_logged(workdir):
  return [
    r["round"] for r in writers.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl") if "loss" in r
  ]


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
  """Two good rounds of four (checkpoints 1 and 2, rotation keeping 2), then a restart with lr
  1e6 (allowed knowingly): returns (workdir, the DivergenceError)."""
  workdir = tmp_path_factory.mktemp("diverged")
  pretrain.run(
    smoke_config(**{"keep_checkpoints": 2, "fed.num_rounds": 4}), workdir, stop_after_rounds=2
  )
  config = smoke_config(
    **{
      "keep_checkpoints": 2,
      "fed.num_rounds": 4,
      "optim.base_lr": 1e6,
      "allow_config_change": "optim.base_lr",
    }
  )
  with pytest.raises(divergence.DivergenceError) as error:
    pretrain.run(config, workdir)
  return workdir, error.value


def test_huge_lr_stops_naming_the_round_and_keeps_the_good_checkpoints(diverged):
  workdir, error = diverged
  assert "round 3: non-finite loss or gradient at client" in str(error)
  ckpt = checkpoint.Checkpointer(workdir, keep=2)
  assert ckpt.all_steps() == [1, 2]  # no NaN checkpoint 3 or 4 rotated them away
  ckpt.close()
  assert all(
    np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(checkpoint.load_params(workdir))
  )
  assert rounds_logged(workdir) == [1, 2]  # the diverged round was never logged
  assert not (workdir / resume.LOCK_NAME).exists()  # released on the error


def test_config_change_on_resume_is_refused_with_a_diff(diverged):
  workdir, _ = diverged
  config = smoke_config(**{"fed.num_rounds": 4, "seed": 7, "model.mask_ratio": 0.5})
  with pytest.raises(resume.ConfigMismatchError) as error:
    pretrain.run(config, workdir)
  message = str(error.value)
  assert f"checkpoint {workdir}/checkpoints/2 was written with another config" in message
  assert "  model.mask_ratio: 0.75 -> 0.5\n  seed: 0 -> 7\n" in message
  assert "--config.allow_config_change=model.mask_ratio,seed" in message
  assert "keep_checkpoints" not in message  # allowed to change (resume.CHANGEABLE)


def test_damaged_latest_checkpoint_falls_back_and_width_mismatch_is_named(diverged):
  workdir, _ = diverged
  # Truncate the biggest array file of checkpoint 2: the resume falls back to checkpoint 1.
  files = [f for f in (workdir / "checkpoints" / "2" / "params").rglob("*") if f.is_file()]
  biggest = max(files, key=lambda f: f.stat().st_size)
  os.truncate(biggest, biggest.stat().st_size // 2)
  one = checkpoint.load_params(workdir / "checkpoints" / "1")
  params = pretrain.run(
    smoke_config(**{"fed.num_rounds": 4}), workdir, stop_after_rounds=1
  )  # restores; trains nothing
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(one), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert (workdir / "checkpoints" / "2.damaged").is_dir()  # set aside, not deleted
  # Another width on resume (allowed knowingly): one error names the parameter and both shapes
  # before Orbax reads anything (init_from: test_init_from_workdir_shape_mismatch_...).
  wide = {"model.width": 64, "allow_config_change": "model.width"}
  qkv = r"encoder/blocks/0/attn/qkv/kernel: checkpoint \(32, 96\), this config \(64, 192\)"
  with pytest.raises(checkpoint.ShapeMismatchError, match=qkv):
    pretrain.run(smoke_config(**wide), workdir)


def test_finetune_cell_of_another_config_is_refused(tmp_path):
  config = configlib.load_config_module(REPO / "configs" / "finetune_cls.py").get_config("smoke")
  config.num_seeds = 1
  cell = tmp_path / "scratch" / "frac_1" / "seed_0"
  cell.mkdir(parents=True)
  saved = {"test": {}, "config": resume.snapshot(config, exclude=finetune.STUDY_FIELDS)}
  (cell / "results.json").write_text(json.dumps(saved))
  config.mode, config.optim.base_lr = "linear_probe", 0.5
  with pytest.raises(resume.ConfigMismatchError, match=r'mode: "finetune" -> "linear_probe"'):
    finetune.run(config, str(tmp_path))


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"model.mask_ratio": 0.0}, "model.mask_ratio"),
    ({"optim.base_lr": -1.0}, "optim.base_lr"),
    ({"on_nonfinite": "ignore"}, "on_nonfinite"),
    ({"allow_config_change": "optim.base_lrr"}, "optim.base_lrr"),
  ],
)
def test_bad_safety_fields_fail_naming_the_field(overrides, message):
  with pytest.raises(configlib.ConfigError, match=message.replace(".", r"\.")):
    pretrain.validate(smoke_config(**overrides))


# ----------------------------------------------------------------------------- divergence
def test_chunk_skip_mode_drops_exactly_the_nonfinite_step():
  """A quadratic loss with one NaN batch: both modes report NaN there (the host then stops);
  'skip' also leaves the params as they were, and the other steps match SGD worked by hand."""
  loss_fn = lambda p, batch, key: (jnp.sum((p["w"] - batch) ** 2), None)  # noqa: E731
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  batches = jnp.asarray([[1.0], [jnp.nan], [3.0]])[None]  # [L=1, K=3, 1]
  plan = rounds.plan_round([3], 1, 3)
  server = {"w": jnp.zeros(1)}
  opt = jax.vmap(tx.init)({"w": jnp.zeros((1, 1))})
  args = (
    batches,
    plan,
    jnp.asarray([3.0]),
    jnp.asarray([1.0]),
    jnp.asarray(0.0),
    jax.random.key(0),
  )
  fedavg, server = strategies.make_strategy("fedavg"), strategies.Server(server, {})
  for mode in ("stop", "skip"):
    chunk = rounds.make_chunk(
      rounds.without_model_state(loss_fn), tx, fedavg, lambda e: 0.1, on_nonfinite=mode
    )
    state, metrics = chunk(
      server, rounds.start_round(fedavg, server, opt, fedavg.init(server.params, 1), 1, 1), *args
    )
    losses = metrics["loss"]
    assert np.isfinite(losses[0, 0]) and np.isnan(losses[0, 1])
    assert np.isfinite(losses[0, 2]) == (mode == "skip")  # 'stop' went on with NaN params
  w = 0.0 - 0.1 * 2 * (0.0 - 1.0)  # step 0; step 1 skipped
  w = w - 0.1 * 2 * (w - 3.0)
  np.testing.assert_allclose(np.asarray(state.acc["params"]["w"]), [w], rtol=1e-6)
  valid = divergence.screen(np.asarray(losses), plan.client_ids >= 0, where="round 1", mode="skip")
  assert valid.tolist() == [[True, False, True]]
  with pytest.raises(divergence.DivergenceError, match="round 1: .* at step 1 \\(1 of 3 steps\\)"):
    divergence.screen(np.asarray(losses), plan.client_ids >= 0, where="round 1", mode="stop")


def test_finite_and_norm_flags_any_nonfinite_entry():
  """divergence.finite_and_norm against numpy: the global L2 norm, and 'finite' false for a NaN
  or an inf anywhere in the gradient or the loss, or a norm beyond float32's range."""
  rng = np.random.default_rng(0)
  grads = {
    "a": rng.normal(size=(5, 3)).astype(np.float32),
    "b": rng.normal(size=7).astype(np.float32),
  }
  expected = np.sqrt(sum(np.sum(np.float64(g) ** 2) for g in grads.values()))
  ok, norm = divergence.finite_and_norm(jnp.float32(1.0), grads)
  assert bool(ok)
  np.testing.assert_allclose(float(norm), expected, rtol=1e-6)
  for bad in (np.nan, np.inf, -np.inf, 1e30):
    broken = dict(grads, b=grads["b"].copy())
    broken["b"][3] = bad
    assert not bool(divergence.finite_and_norm(jnp.float32(1.0), broken)[0]), bad
  assert not bool(divergence.finite_and_norm(jnp.float32(np.nan), grads)[0])


def test_apply_update_keeps_the_old_state_only_when_skipping_a_nonfinite_step():
  """divergence.apply_update (the fine-tuning and SAM steps): one SGD-with-momentum step worked
  by hand when ok holds; with ok false 'skip' returns the given params and state unchanged and
  'stop' still applies the update (the host stops on the NaN loss)."""
  tx = optax.sgd(0.1, momentum=0.9)
  params, grads = {"w": jnp.asarray([1.0, -2.0])}, {"w": jnp.asarray([0.5, 1.0])}
  opt = tx.init(params)
  stepped = np.asarray([1.0 - 0.05, -2.0 - 0.1])
  for ok, mode, want in [
    (True, "skip", stepped),
    (False, "skip", [1.0, -2.0]),
    (False, "stop", stepped),
  ]:
    new_params, new_opt = divergence.apply_update(tx, grads, opt, params, jnp.asarray(ok), mode)
    np.testing.assert_allclose(np.asarray(new_params["w"]), want, rtol=1e-6)
    trace = np.asarray(jax.tree.leaves(new_opt)[0])
    np.testing.assert_allclose(trace, [0.5, 1.0] if want is stepped else [0.0, 0.0])


def test_checkpointer_never_writes_nonfinite_state(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, keep=1)
  ckpt.save(1, {"w": jnp.ones(3)}, {"step": jnp.asarray(1)}, None, {})
  ckpt.wait()
  with pytest.raises(checkpoint.NonFiniteStateError, match=r"\['w'\].*last good checkpoint is 1"):
    ckpt.save(2, {"w": jnp.asarray([1.0, jnp.inf, 0.0])}, {"step": jnp.asarray(2)}, None, {})
  ckpt.close()
  assert checkpoint.Checkpointer(tmp_path).all_steps() == [1]


# ----------------------------------------------------------------------------- damage
def _two_checkpoints(workdir):
  ckpt = checkpoint.Checkpointer(workdir, keep=3)
  for r in (1, 2):
    ckpt.save(
      r,
      {"w": jnp.full((64, 64), float(r))},
      {"n": jnp.asarray(r)},
      None,
      {"config": json.dumps({"a": 1})},
    )
  ckpt.close()
  return checkpoint.Checkpointer(workdir, keep=3)


def _abstract(shape):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return (
    {"w": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=device)},
    {"n": jax.ShapeDtypeStruct((), jnp.int32, sharding=device)},
  )


@pytest.mark.parametrize(
  "damage, reason",
  [
    (lambda c: (c / "meta" / "metadata").write_text('{"config": "{\\"a'), "JSONDecodeError"),
    (lambda c: [f.unlink() for f in (c / "train").rglob("*") if f.is_file()], "train"),
  ],
)
def test_damaged_checkpoint_item_falls_back_with_a_warning(tmp_path, damage, reason, caplog):
  ckpt = _two_checkpoints(tmp_path)
  damage(tmp_path / "checkpoints" / "2")
  r, params, _, _ = resume.restore_latest(ckpt, *_abstract((64, 64)), None, config={"a": 1})
  assert r == 1 and float(params["w"][0, 0]) == 1.0
  assert "checkpoints/2 could not be restored" in caplog.text and reason in caplog.text
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2.damaged"]
  with pytest.raises(
    checkpoint.ShapeMismatchError,
    match=r"w: checkpoint \(64, 64\), this "
    r"config \(64, 32\)",
  ):
    resume.restore_latest(ckpt, *_abstract((64, 32)), None, config={"a": 1})
  ckpt.close()


def test_torn_metrics_line_is_dropped_and_a_bad_middle_line_named(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "round": 1}\n{"step": 2, "round": 2}\n{"step": 3, "rou')
  writers.truncate_jsonl(path, 2)
  assert writers.read_jsonl(path) == [{"step": 1, "round": 1}, {"step": 2, "round": 2}]
  path.write_text('{"step": 1, "round": 1}\nxx\n{"step": 3, "round": 3}\n')
  with pytest.raises(ValueError, match="metrics.jsonl line 2 is not JSON"):
    writers.truncate_jsonl(path, 3)


def test_init_from_workdir_shape_mismatch_names_parameter(tmp_path):
  ckpt = _two_checkpoints(tmp_path)
  ckpt.close()
  with pytest.raises(configlib.DataError, match=r"w: checkpoint \(64, 64\), this config \(8, 64\)"):
    interop_load.load_init_params(tmp_path, None, target=_abstract((8, 64))[0])


# ----------------------------------------------------------------------------- lock
_TAKE_LOCK = (
  "import sys; from ultrajax.train import resume\n"
  "with resume.WorkdirLock(sys.argv[1]): print('took it')"
)


def _second_process(workdir):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-c", _TAKE_LOCK, str(workdir)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_second_process_on_a_locked_workdir_stops_naming_the_holder(tmp_path, caplog):
  with resume.WorkdirLock(tmp_path) as lock:
    second = _second_process(tmp_path)
    assert second.returncode != 0 and "took it" not in second.stdout
    assert f"is in use by process {os.getpid()} on host '{socket.gethostname()}'" in second.stderr
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
  assert not lock.path.exists()  # released at exit
  # A lock left by a killed run (its pid is gone) is taken over with a warning.
  gone = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
  ).stdout.strip()
  lock.path.write_text(
    json.dumps({"host": socket.gethostname(), "pid": int(gone), "started": "earlier"})
  )
  with resume.WorkdirLock(tmp_path):
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
  assert f"Taking over the stale lock {lock.path} of process {gone}" in caplog.text
  # A holder on another host cannot be checked: refused, naming the file to delete.
  lock.path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "earlier"}))
  with pytest.raises(resume.WorkdirLockedError, match=f"host 'elsewhere'.*delete {lock.path}"):
    with resume.WorkdirLock(tmp_path):
      pass
