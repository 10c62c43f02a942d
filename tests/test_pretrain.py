"""End-to-end pretraining job: smoke runs, resume after a crash, meshes, bad input, real images."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from ultrajax import configlib, evaluate
from ultrajax.eval import evaluators
from ultrajax.jobs import pretrain
from ultrajax.train import checkpoint, perf, writers

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def smoke_config(**overrides):
  config = configlib.load_config_module(CONFIGS / "pretrain_fed.py").get_config("smoke")
  config.mesh.update(clients=1, data=1)
  config.update_from_flattened_dict(overrides)  # 'a.b' -> config.a.b
  return config


def losses_by_round(workdir):
  """Rows of training rounds (the evaluators' round-0 row has no loss)."""
  return {
    row["round"]: row
    for row in writers.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")
    if "loss" in row
  }


def evals_by_round(workdir, keys):
  """Rows of evaluator figures (those holding every key), by round."""
  rows = writers.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")
  return {row["round"]: row for row in rows if set(keys) <= set(row)}


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# For tests about the training state, not the model or the evaluators (each compile counts):
# one encoder block of width 32, no evaluators, a PNG at the last round only.
LEAN = {
  "model.width": 32,
  "model.depth": 1,
  "model.num_heads": 2,
  "model.decoder_width": 16,
  "model.decoder_heads": 2,
  "evals.linear_probe.every_rounds": 0,
  "evals.knn.every_rounds": 0,
  "image_every_rounds": 100,
}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """pretrain.run(smoke_config()) once for the tests that check different things on it:
  (workdir, the returned params), round 2 profiled. Tests must not write into the workdir's run
  files."""
  workdir = tmp_path_factory.mktemp("pretrain_smoke")
  config = smoke_config()
  config.profile_round = 2
  return workdir, pretrain.run(config, workdir)


def test_smoke_run_writes_metrics_images_and_checkpoint(smoke_run):
  tmp_path, params = smoke_run
  rows = losses_by_round(tmp_path)
  assert sorted(rows) == [1, 2]
  for row in rows.values():
    assert np.isfinite(row["loss"]) and row["img_per_s"] > 0
    assert {"loss/client_00", "loss/client_01", "lr", "s_per_round"} <= set(row)
    assert row["grad_norm"] > 0 and np.isfinite(row["grad_norm"])
  # The server params' norm is logged after aggregation: the final round's equals the norm of
  # the params the run returns (numpy, float64).
  final = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(params)))
  assert rows[2]["param_norm"] == pytest.approx(final, rel=1e-5)
  assert sorted(p.name for p in (tmp_path / "images").glob("*.png")) == [
    "round_00001.png",
    "round_00002.png",
    "smat_pairs.png",
  ]
  assert_trees_equal(checkpoint.load_params(tmp_path), params)
  # profile_round=2: one jax.profiler trace, of round 2: XLA ops busy for no longer than it took.
  summary = perf.trace_summary(perf.latest_trace(tmp_path / "profile"))
  assert len(list((tmp_path / "profile").glob("plugins/profile/*"))) == 1
  assert summary["rows"] and 0 < summary["busy_ms"] <= 1e3 * rows[2]["s_per_round"]
  # The evaluators ran at random init (round 0) and at the last round (smoke: every 2 rounds).
  keys = {f"eval/{n}/{m}" for n in ("linear_probe", "knn") for m in ("accuracy", "auroc")}
  evals = evals_by_round(tmp_path, keys)
  assert sorted(evals) == [0, 2] and "loss" not in evals[0] and "loss" in evals[2]
  assert all(0 <= evals[r][k] <= 1 for r in evals for k in keys)
  # The command-line evaluator on the saved checkpoint gives what the job logged.
  record = evaluate.evaluate(smoke_config(), workdir=str(tmp_path))
  assert (
    record["round"] == 2 and json.loads(pathlib.Path(record["output"]).read_text())["round"] == 2
  )
  for k in keys:
    assert record[k] == pytest.approx(evals[2][k], abs=1e-4), k


def test_evaluator_outputs_give_the_logged_figures(smoke_run):
  """The job keeps each evaluated round's test outputs under evals/: scored by scikit-learn they
  give the logged AUROC and accuracy, and the closing summary tests round 0 against round 2 on
  them."""
  from sklearn.metrics import accuracy_score, roc_auc_score

  workdir = smoke_run[0]
  keys = {f"eval/{n}/{m}" for n in evaluators.EVALUATORS for m in ("accuracy", "auroc")}
  evals = evals_by_round(workdir, keys)
  for r in (0, 2):
    out = np.load(evaluators.outputs_path(workdir / "evals", r))
    for name in evaluators.EVALUATORS:
      proba = out[name]
      auroc = roc_auc_score(out["labels"], proba[:, 1])
      assert auroc == pytest.approx(evals[r][f"eval/{name}/auroc"], abs=1e-6)
      accuracy = accuracy_score(out["labels"], proba.argmax(1))
      assert accuracy == pytest.approx(evals[r][f"eval/{name}/accuracy"], abs=1e-6)
  rows = writers.read_jsonl(workdir / "metrics.jsonl")
  text = evaluators.summary(rows, workdir / "evals", num_samples=100)
  assert text.count(f"paired bootstrap over {len(out['labels'])} test images") == len(keys)


# FedAdam (server moments in the checkpoint), one of the two clients sampled per round, fresh
# client optimizers every round; 4 chunks of 2 steps per round.
KILLED = {
  **LEAN,
  "fed.num_rounds": 3,
  "fed.strategy": "fedadam",
  "fed.strategy_options": "server_lr=0.01",
  "fed.clients_per_round": 1,
  "fed.reset_client_optimizer": True,
}


def _main(args, **env):
  """`python -m ultrajax.main ARGS` in a subprocess with this session's devices and `env`."""
  return subprocess.run(
    [sys.executable, "-m", "ultrajax.main", *args],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", **env),
    capture_output=True,
    text=True,
    timeout=1200,
  )


def _main_killed(workdir, round_chunk=None):
  """The command line on the KILLED config; with round_chunk 'R,J' the process SIGKILLs itself
  after chunk J of round R."""
  flags = [f"--config.{k}={v}" for k, v in {**KILLED, "mesh.clients": 1, "mesh.data": 1}.items()]
  args = ["--config=configs/pretrain_fed.py:smoke", *flags, f"--workdir={workdir}"]
  done = _main(args, **({pretrain.KILL_AT_ENV: round_chunk} if round_chunk else {}))
  assert done.returncode == (-signal.SIGKILL if round_chunk else 0), done.stderr[-3000:]
  return done


def test_sigkilled_mid_round_twice_resumes_bitwise(tmp_path):
  """A real process killed mid-round 2 (round 1's checkpoint possibly still being written: then
  the next run starts over), then mid-round 3, then resumed by the command line: the losses,
  sampled clients and parameters are exactly those of a run that never stopped (FedAdam's
  moments, the sampler and the client optimizer resets included)."""
  config = smoke_config(**KILLED)
  straight = pretrain.run(config, tmp_path / "straight")
  _main_killed(tmp_path / "killed", "2,1")
  assert sorted(losses_by_round(tmp_path / "killed")) == [1]
  _main_killed(tmp_path / "killed", "3,1")
  assert sorted(losses_by_round(tmp_path / "killed")) == [1, 2]
  resumed = _main_killed(tmp_path / "killed")
  assert "Total:" in resumed.stderr  # clu's parameter overview
  a, b = losses_by_round(tmp_path / "straight"), losses_by_round(tmp_path / "killed")
  assert sorted(a) == sorted(b) == [1, 2, 3]
  for r in a:
    assert a[r]["clients"] == b[r]["clients"] == 1, r
    assert {k: v for k, v in a[r].items() if k.startswith("loss")} == {
      k: v for k, v in b[r].items() if k.startswith("loss")
    }, r
  assert_trees_equal(straight, checkpoint.load_params(tmp_path / "killed"))


def test_centralized_config_pools_clients(tmp_path):
  config = configlib.load_config_module(CONFIGS / "pretrain_central.py").get_config("smoke")
  config.mesh.update(clients=1, data=1)
  config.attention_every_rounds = 2
  pretrain.run(config, tmp_path)
  assert [k for k in losses_by_round(tmp_path)[1] if k.startswith("loss/client")] == [
    "loss/client_00"
  ]
  # The encoder's attention maps every 2 rounds (and at the last round).
  assert [p.name for p in (tmp_path / "attention").glob("*.png")] == ["round_00002.png"]


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"data.batch_size": 6, "mesh.clients": 1, "mesh.data": 4}, "batch_size=6"),
    ({"ultramim.tgm_mode": "textured"}, "ultramim.tgm_mode"),
    ({"model.mask_ratio": 1.0}, "model.mask_ratio"),
    ({"data.source": "folder"}, "data.root"),
    ({"ultramim.smat_ratio": -0.5}, "ultramim.smat_ratio"),
    ({"data.fraction": 0.0}, "data.fraction"),
    ({"attention_every_rounds": -1}, "attention_every_rounds"),
    ({"fed.strategy": "splitavg"}, "fed.strategy"),
    ({"fed.strategy_options": "mu=0.1"}, "fed.strategy_options"),
    ({"fed.sampling": "stratified"}, "fed.sampling"),
    ({"fed.clients_per_round": 2.5}, "fed.clients_per_round"),
  ],
)
def test_bad_config_fails_naming_the_field(tmp_path, overrides, message):
  with pytest.raises(configlib.ConfigError, match=message.replace(".", r"\.")):
    pretrain.run(smoke_config(**overrides), tmp_path)


def _write_client_folders(root, num_clients=2, num_images=8, size=40):
  rng = np.random.default_rng(0)
  for c in range(num_clients):
    (root / f"site_{c}").mkdir(parents=True)
    for i in range(num_images):
      Image.fromarray(rng.integers(0, 256, (size, size + 8), np.uint8)).save(
        root / f"site_{c}" / f"{i}.png"
      )


def test_folder_clients_missing_empty_and_unreadable(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    pretrain.run(
      smoke_config(**{"data.source": "folder", "data.root": str(tmp_path / "nowhere")}),
      tmp_path / "w0",
    )
  root = tmp_path / "clients"
  _write_client_folders(root)
  (root / "site_empty").mkdir()
  with pytest.raises(ValueError, match="site_empty"):
    pretrain.run(smoke_config(**{"data.source": "folder", "data.root": str(root)}), tmp_path / "w1")
  (root / "site_empty").rmdir()
  (root / "site_1" / "broken.png").write_bytes(b"not a png")
  config = smoke_config(
    **{
      "data.source": "folder",
      "data.root": str(root),
      "data.probe": "linear",
      "data.on_bad_image": "raise",
      "fed.num_rounds": 1,
    }
  )
  with pytest.raises(ValueError, match="broken.png"):
    pretrain.run(config, tmp_path / "w2")
  config.data.on_bad_image = "skip"
  config.fed.strategy = "personalized"  # each site's own model in the strategy state
  pretrain.run(config, tmp_path / "w3")
  assert losses_by_round(tmp_path / "w3")[1]["loss"] > 0


def test_round_on_real_ultrasound_manifest(tmp_path, real_us):
  config = smoke_config(
    **{
      **LEAN,
      "data.source": "manifest",
      "data.manifest": str(real_us / "hc18" / "labels.csv"),
      "data.fraction": 0.25,  # 50 of the 200 frames (800 x 540 PNGs): one batch of 32
      "data.probe": "convex",
      "data.batch_size": 32,
      "fed.num_rounds": 1,
      "fed.chunk_steps": 4,
    }
  )
  pretrain.run(config, tmp_path)
  row = losses_by_round(tmp_path)[1]
  assert np.isfinite(row["loss"]) and (tmp_path / "images" / "round_00001.png").exists()


def test_main_rejects_unknown_fields(tmp_path):
  """(The command line's successful runs: the SIGKILL test above.)"""
  bad = _main(
    ["--config=configs/pretrain_fed.py:smoke", "--config.model.widht=3", f"--workdir={tmp_path}/b"]
  )
  assert bad.returncode != 0 and "widht" in bad.stderr


# SCAFFOLD (per-client controls sharded over the 'clients' axis when it has 2 devices), with the
# evaluators of the smoke preset on a lean model.
SCAFFOLD = {
  **{k: v for k, v in LEAN.items() if not k.startswith("evals.")},
  "fed.strategy": "scaffold",
  "fed.strategy_options": "local_lr=1e-3",
}


def test_one_device_and_two_processes_of_two_devices_agree(tmp_path):
  """launch/local_multiprocess.sh: 2 processes x 2 CPU devices joined by jax.distributed, each
  loading its slice of every batch, clients over 2 devices, batch over 2 and matrices
  FSDP-sharded over the data axis: the losses, evaluator figures and parameters of one device."""
  one = pretrain.run(smoke_config(**SCAFFOLD), tmp_path / "one")
  flags = {
    **SCAFFOLD,
    "mesh.clients": 2,
    "mesh.data": 2,
    "sharding_rules": "(('.*kernel', 'fsdp'), ('.*', 'replicated'))",
  }
  # The session's XLA flags (the script replaces the device count): both sides compile alike.
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PORT="12391")
  done = subprocess.run(
    [
      "bash",
      "launch/local_multiprocess.sh",
      "2",
      "configs/pretrain_fed.py:smoke",
      str(tmp_path / "mp"),
      *[f"--config.{k}={v}" for k, v in flags.items()],
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  one_dir = tmp_path / "one"
  a, b = losses_by_round(tmp_path / "mp"), losses_by_round(one_dir)
  assert sorted(a) == sorted(b) == [1, 2]
  for r in a:
    np.testing.assert_allclose(a[r]["loss"], b[r]["loss"], rtol=1e-4)
  keys = ("eval/knn/auroc", "eval/linear_probe/auroc")
  evals = [evals_by_round(d, keys) for d in (tmp_path / "mp", one_dir)]
  assert sorted(evals[0]) == sorted(evals[1]) == [0, 2]
  for r in (0, 2):
    for k in keys:
      assert evals[0][r][k] == pytest.approx(evals[1][r][k], abs=1e-3), (r, k)
  mp = checkpoint.load_params(tmp_path / "mp")
  for x, y in zip(jax.tree.leaves(mp), jax.tree.leaves(one), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-5)
  assert sorted(
    p.name for p in (tmp_path / "mp" / "checkpoints" / "2" / "data").glob("*.json")
  ) == ["process_0-of-2.json", "process_1-of-2.json"]


def test_init_from_official_mae_file(tmp_path, smoke_run, closes_event_files):
  """config.init_from accepts an official-MAE .safetensors file: training starts from exactly
  its weights (smoke_run's trained ones), and a workdir's own checkpoint takes precedence once
  it exists."""
  from ultrajax.interop import files, mae_official

  first = smoke_run[1]
  path = tmp_path / "mae.safetensors"
  files.save_state_dict(path, mae_official.mae_to_official(first, image_size=32, patch_size=8))
  # FedBN: the MAE's LayerNorms stay per client (kept leaves in the checkpoint).
  config = smoke_config(
    **{"fed.num_rounds": 1, "init_from": str(path), "seed": 1, "fed.strategy": "fedbn"}
  )
  assert_trees_equal(pretrain.run(config, tmp_path / "b", stop_after_rounds=0), first)
  trained = pretrain.run(config, tmp_path / "b")
  assert np.isfinite(losses_by_round(tmp_path / "b")[1]["loss"])
  config.fed.num_rounds = 2
  resumed = pretrain.run(config, tmp_path / "b", stop_after_rounds=1)  # resumes, trains nothing
  assert_trees_equal(resumed, trained)
