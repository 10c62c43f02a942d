"""HeteroSync Learning: ResNet-18 against torchvision, the MMoE against numpy, the study job."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ultrajax.models import mmoe, resnet

try:  # the [torch] extra; without it the five tests against torch / torchvision skip
  import torch
  import torchvision
except ImportError:
  torch = torchvision = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs the [torch] extra")

TORCH_NAMES = {
  "scale": "weight",
  "bias": "bias",
  "mean": "running_mean",
  "var": "running_var",
  "kernel": "weight",
  "downsample_conv": "downsample.0",
  "downsample_bn": "downsample.1",
}


def _torch_key(path) -> str:
  return ".".join(TORCH_NAMES.get(str(p), str(p)) for p in path)


def _copy_torch_weights(model, torch_model):
  """Loads a torchvision ResNet state dict into our ResNet (every leaf must be found)."""
  sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  state = nnx.state(model)
  flat = []
  for path, leaf in nnx.to_flat_state(state):
    w = sd.pop(_torch_key(path))
    if w.ndim == 4:
      w = w.transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
    elif w.ndim == 2:
      w = w.T
    assert w.shape == leaf.shape, path
    flat.append((path, jnp.asarray(w)))
  assert set(k.rsplit(".", 1)[1] for k in sd) <= {"num_batches_tracked"}, sorted(sd)
  nnx.update(model, nnx.from_flat_state(flat))


def _jit_call(model, *args, **kwargs):
  """model(*args, **kwargs) compiled once: far quicker than op-by-op on small CPU inputs."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a, **kwargs))(state, *args)


@needs_torch
@pytest.mark.parametrize("num_classes", [1000, 1])
def test_resnet18_parameter_count_matches_torchvision(num_classes):
  ours = nnx.eval_shape(lambda: resnet.ResNet(num_classes=num_classes, rngs=nnx.Rngs(0)))
  theirs = torchvision.models.resnet18(num_classes=num_classes)
  count = sum(x.size for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
  assert count == sum(p.numel() for p in theirs.parameters())
  buffers = sum(x.size for x in jax.tree.leaves(nnx.state(ours, nnx.BatchStat)))
  assert buffers == sum(b.numel() for n, b in theirs.named_buffers() if "running" in n)


@needs_torch
def test_resnet18_forward_matches_torchvision_with_copied_weights():
  torch.manual_seed(0)
  theirs = torchvision.models.resnet18(num_classes=5)
  with torch.no_grad():  # non-trivial running statistics and affine parameters
    for m in theirs.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
  ours = resnet.ResNet(num_classes=5, rngs=nnx.Rngs(0))
  _copy_torch_weights(ours, theirs)
  x = np.random.default_rng(0).normal(size=(4, 3, 48, 48)).astype(np.float32)
  theirs.eval()
  with torch.no_grad():
    expected = theirs(torch.from_numpy(x)).numpy()
  got = _jit_call(ours, jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

  # Training mode: batch statistics in the forward pass; running means move as torch's do.
  theirs.train()
  with torch.no_grad():
    expected = theirs(torch.from_numpy(x)).numpy()
  graphdef, params, stats = nnx.split(ours, nnx.Param, nnx.BatchStat)

  def train_forward(params, stats, x):
    model = nnx.merge(graphdef, params, stats)
    return model(x, train=True), nnx.state(model, nnx.BatchStat)

  got, new_stats = jax.jit(train_forward)(params, stats, jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(
    new_stats["bn1"]["mean"][...], theirs.bn1.running_mean.numpy(), rtol=1e-4, atol=1e-5
  )
  # torch updates running_var with the unbiased batch variance, Flax with the biased one: the
  # stem's 4 x 24 x 24 values per channel make the factor n / (n - 1) negligible.
  np.testing.assert_allclose(
    new_stats["bn1"]["var"][...], theirs.bn1.running_var.numpy(), rtol=1e-3
  )
  # The input state is untouched: updated statistics exist only in the returned state.
  assert not np.allclose(stats["bn1"]["mean"][...], new_stats["bn1"]["mean"][...])


# ----------------------------------------------------------------------------- MMoE
TINY_HEAD = dict(
  num_tasks=2, feature_dim=6, num_experts=3, expert_hidden=5, expert_dim=4, tower_hidden=3
)
TINY_ENCODER = dict(resnet_width=4, resnet_stem="cifar")


def _tiny_mmoe(temperature=3.0, encoder="resnet18", **kw):
  kwargs = (
    dict(vit_width=16, vit_depth=1, vit_heads=2, vit_patch=8) if encoder == "vit" else TINY_ENCODER
  )
  model = mmoe.MMoE(
    **TINY_HEAD,
    encoder=encoder,
    image_size=16,
    temperature=temperature,
    encoder_kwargs=kwargs,
    rngs=nnx.Rngs(1),
    **kw,
  )
  # Noise on every parameter, so zero biases count in the comparison too.
  rng = np.random.default_rng(0)
  nnx.update(
    model,
    jax.tree.map(
      lambda x: x + jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype),
      nnx.state(model, nnx.Param),
    ),
  )
  return model


def _numpy_head(model, feats, temperature):
  """The MMoE head of research/seed_systems.md 4.1 in float64 numpy, from the model's params."""
  p = jax.tree.map(
    lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param))
  )
  lin = lambda layer, x: x @ layer["kernel"] + layer["bias"]
  softmax = lambda z: (
    np.exp(z - z.max(-1, keepdims=True))
    / np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
  )
  feats = [np.asarray(f, np.float64) for f in feats]
  emb = softmax(np.concatenate(feats, -1) / temperature)
  experts = np.stack(
    [
      np.maximum(emb @ p["expert_w1"][k] + p["expert_b1"][k], 0) @ p["expert_w2"][k]
      + p["expert_b2"][k]
      for k in range(p["expert_w1"].shape[0])
    ],
    axis=1,
  )  # [B, E, O]
  logits = []
  for t in range(len(feats)):
    g = softmax(lin(p["gates"][t], emb))
    z = (g[:, :, None] * experts).sum(1) + lin(p["down"][t], feats[t])
    logits.append(lin(p["tower2"][t], np.maximum(lin(p["tower1"][t], z), 0))[:, 0])
  return np.stack(logits, -1), emb


def test_mmoe_forward_matches_numpy_reference():
  model = _tiny_mmoe(temperature=3.0)
  rng = np.random.default_rng(1)
  images = [jnp.asarray(rng.normal(size=(3, 16, 16, 3)), jnp.float32) for _ in range(2)]
  # Encoder features from the (torchvision-checked) ResNet trunks; fc + ReLU in numpy.
  p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  feats = [
    np.maximum(
      np.asarray(_jit_call(model.encoders[t], images[t]), np.float64)
      @ np.asarray(p["fc"][t]["kernel"])
      + np.asarray(p["fc"][t]["bias"]),
      0,
    )
    for t in range(2)
  ]
  expected, _ = _numpy_head(model, feats, 3.0)
  got = _jit_call(model, images)
  assert got.shape == (3, 2)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  # Dropout only with a key: deterministic without one, different with one.
  np.testing.assert_array_equal(_jit_call(model, images), got)
  assert not np.allclose(_jit_call(model, images, key=jax.random.key(0)), got)


def test_temperature_one_is_plain_softmax_and_large_is_uniform():
  rng = np.random.default_rng(2)
  feats = [jnp.asarray(rng.normal(size=(2, 6)) * 3, jnp.float32) for _ in range(2)]
  concat = np.concatenate([np.asarray(f) for f in feats], -1)
  entropies = []
  model = _tiny_mmoe()
  for temperature in (1.0, 3.0, 10.0, 1e6):
    model.temperature = temperature  # read by the head at call time
    logits, inner = model.head(feats, internals=True)
    emb = np.asarray(inner["emb"])
    np.testing.assert_allclose(emb.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
      logits, _numpy_head(model, feats, temperature)[0], rtol=1e-5, atol=1e-5
    )
    if temperature == 1.0:
      np.testing.assert_allclose(emb, np.asarray(jax.nn.softmax(jnp.asarray(concat))), rtol=1e-6)
    entropies.append(float(-(emb * np.log(emb)).sum(-1).mean()))
  np.testing.assert_allclose(emb, 1.0 / concat.shape[-1], rtol=1e-4)
  assert entropies == sorted(entropies) and entropies[-1] == pytest.approx(np.log(12), rel=1e-6)


def test_gates_sum_to_one_and_a_one_hot_gate_selects_one_expert():
  model = _tiny_mmoe()
  rng = np.random.default_rng(3)
  feats = [jnp.asarray(rng.normal(size=(4, 6)), jnp.float32) for _ in range(2)]
  _, inner = model.head(feats, internals=True)
  assert inner["gates"].shape == (4, 2, 3)
  np.testing.assert_allclose(inner["gates"].sum(-1), 1.0, rtol=1e-6)
  # Gate of task 1 forced onto expert 2: its tower input is expert 2 plus its own residual.
  model.gates[1].kernel[...] = jnp.zeros_like(model.gates[1].kernel[...])
  model.gates[1].bias[...] = jnp.asarray([0.0, 0.0, 100.0])
  _, inner = model.head(feats, internals=True)
  np.testing.assert_allclose(inner["gates"][:, 1], np.tile([0, 0, 1.0], (4, 1)), atol=1e-6)
  residual = model.down[1](feats[1])
  np.testing.assert_allclose(
    inner["task_features"][:, 1], inner["experts"][:, 2] + residual, rtol=1e-5, atol=1e-5
  )


def test_mmoe_with_vit_encoders():
  model = _tiny_mmoe(encoder="vit")
  images = [jnp.zeros((2, 16, 16, 3)), jnp.ones((2, 16, 16, 3))]
  assert _jit_call(model, images).shape == (2, 2)
  assert not nnx.state(model, nnx.BatchStat)  # a ViT has parameters only
  with pytest.raises(ValueError, match="encoder='cnn' is not one of"):
    mmoe.MMoE(encoder="cnn", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="2 tasks got 1 image batches"):
    model([images[0]])


# ----------------------------------------------------------------------------- the study job
import contextlib  # noqa: E402
import csv  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from PIL import Image  # noqa: E402
from sklearn import metrics as sk_metrics  # noqa: E402

from ultrajax import configlib  # noqa: E402
from ultrajax.data import nodes, partition  # noqa: E402
from ultrajax.eval import node_tables  # noqa: E402
from ultrajax.fed import strategies  # noqa: E402
from ultrajax.jobs import hsl  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def _config(arg="smoke", **overrides):
  config = configlib.load_config_module(CONFIGS / "hsl.py").get_config(arg)
  config.update_from_flattened_dict(overrides)  # 'a.b' -> config.a.b
  return config


# One method per distinct code path of the job (the smoke preset lists every method; its other
# strategies differ from these only inside fed/strategies, which tests/test_strategies.py checks
# on the same engine against numpy: fedavg_uniform, fedprox, fedyogi, fedadagrad, fedadam (a
# server optimizer: its moments are strategy state, carried and checkpointed as SCAFFOLD's
# controls are) and personalized (fed/strategies.Local is Personalized with its own alpha)):
# the MMoE with the auxiliary task, single-task FedAvg with the MMoE's unweighted averaging
# (no_al), single-task FedAvg, a pooled node, per-node models (local), kept-local BatchNorm, the
# split driver and control variates.
STUDY_METHODS = (
  "hsl",
  "no_al",
  "local",
  "central",
  "fedavg",
  "fedbn",
  "splitavg",
  "scaffold",
)


def _study_config():
  return _config(methods=",".join(STUDY_METHODS))


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
  """configs/hsl.py:smoke through hsl.run: STUDY_METHODS, one repeat, combined scenario.

  XLA's optimisations are off while it runs: compiling the vmapped ResNet rounds dominates
  this tiny study, and the results only need to be consistent, not fast.
  """
  workdir = tmp_path_factory.mktemp("hsl_smoke")
  with _unoptimized():
    summary = hsl.run(_study_config(), workdir)
  return workdir, summary


@contextlib.contextmanager
def _unoptimized():
  """XLA optimisations off, as a process started with JAX_DISABLE_MOST_OPTIMIZATIONS=true has
  them. The caches are cleared on the way in and out: eager ops (parameter initialisers among
  them) compiled earlier in this worker with optimisations would otherwise be reused, and the
  study's numbers would depend on which tests ran before it.

  Every program compiled meanwhile goes to the session's persistent compilation cache, not
  only those that took a second (JAX's default): a resumed study (test_killed_...) then loads
  each one instead of compiling it again."""
  before = jax.config.read("jax_disable_most_optimizations")  # the session's (conftest)
  min_secs = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.clear_caches()
  jax.config.update("jax_disable_most_optimizations", True)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs)
    jax.clear_caches()


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_smoke_runs_every_method_and_writes_tables_and_plots(smoke_study):
  workdir, summary = smoke_study
  methods = hsl.parse_methods(_study_config())
  assert methods == list(STUDY_METHODS)
  # The smoke preset itself lists every method (keep_local needs patterns of its own, the
  # privacy strategies options of their own).
  smoke = set(hsl.parse_methods(_config()))
  assert set(STUDY_METHODS) <= smoke
  assert {"fedprox", "fedyogi", "fedadagrad", "fedadam", "personalized"} <= smoke
  nodes = summary["nodes"]
  assert len(nodes) == 5 and nodes[0] == "screening_centre"
  for name in (
    "per_node.csv",
    "runs.csv",
    "fairness.csv",
    "results.json",
    "partition.png",
    "boxplots_auc.png",
    "boxplots_accuracy.png",
  ):
    assert (workdir / name).stat().st_size > 0, name
  assert sorted(p.parent.name for p in (workdir / "runs").glob("*/repeat_0.npz")) == sorted(methods)
  per_node = _read_csv(workdir / "per_node.csv")
  assert len(per_node) == len(methods) * len(nodes) * len(node_tables.METRICS)

  # Each run's metrics recomputed with scikit-learn from its saved predictions.
  runs = _read_csv(workdir / "runs.csv")
  assert len(runs) == len(methods) * len(nodes)
  for row in runs:
    if row["method"] not in ("hsl", "splitavg", "fedbn"):
      continue
    k = nodes.index(row["node"])
    with np.load(workdir / "runs" / row["method"] / f"repeat_{row['repeat']}.npz") as f:
      labels, probs = f[f"labels_{k}"], f[f"probs_{k}"]
    assert ((probs >= 0) & (probs <= 1)).all()
    preds = (probs >= 0.5).astype(int)
    assert float(row["accuracy"]) == pytest.approx(
      sk_metrics.accuracy_score(labels, preds), abs=1e-4
    )
    assert float(row["recall"]) == pytest.approx(
      sk_metrics.recall_score(labels, preds, zero_division=0), abs=1e-4
    )
    assert float(row["precision"]) == pytest.approx(
      sk_metrics.precision_score(labels, preds, zero_division=0), abs=1e-4
    )
    if 0 < labels.sum() < len(labels):
      assert float(row["auc"]) == pytest.approx(sk_metrics.roc_auc_score(labels, probs), abs=1e-4)

  # Fairness: worst node and spread of the per-node mean AUC; local's gain over itself is 0.
  fairness = {(r["method"], r["metric"]): r for r in _read_csv(workdir / "fairness.csv")}
  for method in ("hsl", "local"):
    means = []
    for node in nodes:
      v = [
        float(r["auc"])
        for r in runs
        if r["method"] == method and r["node"] == node and r["auc"] != "nan"
      ]
      means.append(np.mean(v) if v else np.nan)
    row = fairness[(method, "auc")]
    assert float(row["worst"]) == pytest.approx(np.nanmin(means), abs=1e-3)
    assert float(row["spread"]) == pytest.approx(np.nanmax(means) - np.nanmin(means), abs=1e-3)
  assert all(
    float(fairness[("local", "auc")][f"gain_{n}"]) == 0.0
    for n in nodes
    if fairness[("local", "auc")][f"gain_{n}"] != "nan"
  )

  # The paper's protocol (the smoke preset's default): every run validated after each round,
  # the reported model is each node's best-validation round (first maximum), early stopping
  # never runs past config.fed.num_rounds.
  config = _config()
  assert summary["protocol"]["name"] == "paper" and summary["protocol"]["val_fraction"] == 0.1
  for method in methods:
    with np.load(workdir / "runs" / method / "repeat_0.npz") as f:
      val_auc, best_round, losses = f["val_auc"], f["best_round"], f["losses"]
    slots = 1 if method == "central" else len(nodes)
    assert val_auc.shape == (len(losses), slots) and 1 <= len(losses) <= config.fed.num_rounds
    for k in range(slots):
      finite = np.isfinite(val_auc[:, k])
      expected = int(np.argmax(np.where(finite, val_auc[:, k], -np.inf))) if finite.any() else -1
      assert best_round[k] == expected, (method, k)


def test_killed_study_resumes_with_the_missing_run_only(smoke_study):
  workdir, _ = smoke_study
  missing = workdir / "runs" / "fedavg" / "repeat_0.npz"
  with np.load(missing) as f:
    before = dict(f)
  missing.unlink()
  others = {p: p.stat().st_mtime_ns for p in (workdir / "runs").glob("*/*.npz")}
  with _unoptimized():
    hsl.run(_study_config(), workdir)
  assert {p: p.stat().st_mtime_ns for p in others} == others  # nothing else retrained
  with np.load(missing) as f:  # the redone run reproduces the lost one exactly
    for key, value in before.items():
      np.testing.assert_array_equal(f[key], value, err_msg=key)


def _sigkill_when(cmd, env, ready, timeout=300):
  """Starts `cmd`; SIGKILLs it once ready() holds. -> True if killed, False if it ended first."""
  proc = subprocess.Popen(
    cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )
  deadline = time.monotonic() + timeout
  while proc.poll() is None and not ready() and time.monotonic() < deadline:
    time.sleep(0.05)
  killed = proc.poll() is None
  if killed:
    proc.send_signal(signal.SIGKILL)
  _, err = proc.communicate(timeout=60)
  assert killed or proc.returncode == 0, err[-3000:]
  return killed


def test_sigkilled_study_resumes_mid_cell_bitwise(smoke_study, tmp_path):
  """A real study process (smoke, SCAFFOLD: controls, per-node Adam states, BatchNorm
  statistics, best-validation models, the host batch generator) SIGKILLed once its round-1
  checkpoint is written and again, resumed, once its round-2 one is: the finished cell equals
  the uninterrupted fixture's bit for bit."""
  workdir, _ = smoke_study
  # The fixture's compile options (XLA optimisations off) and its 8 fake CPU devices.
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="true")
  cmd = [
    sys.executable,
    "-m",
    "ultrajax.main",
    "--config=configs/hsl.py:smoke",
    "--config.methods=scaffold",
    f"--workdir={tmp_path}",
  ]
  cell = tmp_path / "runs" / "scaffold" / "repeat_0"
  killed = [
    _sigkill_when(cmd, env, lambda r=r: (cell / "checkpoints" / str(r)).is_dir()) for r in (1, 2)
  ]
  assert killed[0]  # the first kill lands mid-cell, after round 1 of 2
  subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
  assert not cell.exists()  # the results file replaces the cell's checkpoints
  with np.load(workdir / "runs" / "scaffold" / "repeat_0.npz") as f:
    expected = dict(f)
  with np.load(tmp_path / "runs" / "scaffold" / "repeat_0.npz") as f:
    assert sorted(f) == sorted(expected)
    for key, value in expected.items():
      np.testing.assert_array_equal(f[key], value, err_msg=key)


def test_unknown_method_is_an_error_naming_the_valid_ones():
  with pytest.raises(configlib.ConfigError, match=r"unknown method\(s\) \['fedsgd'\].*'hsl'"):
    hsl.validate(_config(methods="hsl,fedsgd"))
  with pytest.raises(configlib.ConfigError, match="config.scenario='iid' is not one of"):
    hsl.validate(_config(scenario="iid"))


def test_ratios_the_data_cannot_meet_raise_the_partition_error():
  # 30 negatives and 3 positives cannot give node 2 of the label scenario 20 images at 1:1.
  pool = nodes.Pool(
    np.zeros((33, 8, 8), np.uint8), np.array([0] * 30 + [1] * 3), np.array(["thyroid"] * 33)
  )
  config = _config(scenario="label", **{"data.label_node_size": 20, "data.ratio": 1.0})
  with pytest.raises(ValueError, match=r"node 'node1_1:1' needs 10 examples of class 1"):
    nodes.make_partition(config, pool, seed=0)


def test_old_field_names_fail_naming_the_fed_block_names():
  with pytest.raises(
    configlib.ConfigError, match=r"config.train.rounds is now config.fed.num_rounds"
  ):
    hsl.validate(_config(**{"train.rounds": 3}))
  with pytest.raises(
    configlib.ConfigError,
    match=r"config.strategy.fedprox_mu is now "
    r"config.fed.strategy_options='fedprox: mu=...'",
  ):
    hsl.validate(_config(**{"strategy.fedprox_mu": 0.1}))
  with pytest.raises(configlib.ConfigError, match=r"config.fed.dropout"):
    hsl.validate(_config(**{"fed.dropout": 1.5}))


def test_strategy_options_per_strategy_and_any_registered_strategy_is_a_method(monkeypatch):
  config = _config(
    **{"fed.strategy_options": "fedprox: mu=0.1; scaffold: server_lr=0.5", "train.lr": 0.003}
  )
  assert hsl.make_strategy(config, "fedprox").mu == 0.1
  scaffold = hsl.make_strategy(config, "scaffold")
  assert (scaffold.server_lr, scaffold.local_lr) == (0.5, 0.003)  # local_lr: train.lr
  assert hsl.make_strategy(config, "fedadam").server_lr == 1e-2  # the strategy's default
  assert hsl.make_strategy(config, "hsl").weighting == "uniform"  # the paper's equation 1
  with pytest.raises(configlib.ConfigError, match="takes no option"):
    hsl.validate(_config(**{"fed.strategy_options": "fedprox: alpha=0.1"}))
  with pytest.raises(configlib.ConfigError, match=r"'fedsgd: lr=1' is not 'strategy: k=v"):
    hsl.validate(_config(**{"fed.strategy_options": "fedsgd: lr=1"}))
  # A new strategy is one class and one registry line: the study runs it by name.
  monkeypatch.setitem(
    strategies.STRATEGIES,
    "fedavg_half",
    strategies._Entry(strategies.Personalized, {"name": "fedavg_half"}),
  )
  config = _config(methods="hsl,fedavg_half", **{"fed.strategy_options": "fedavg_half: alpha=0.25"})
  assert hsl.validate(config) == ["hsl", "fedavg_half"]
  assert hsl.make_strategy(config, "fedavg_half").alpha == 0.25


def test_folder_nodes_and_sat_load_with_their_labels(tmp_path):
  rng = np.random.default_rng(5)
  layout = {
    "nodes/site_a/malignant": 2,
    "nodes/site_a/benign": 3,
    "nodes/site_b/benign": 1,
    "nodes/site_b/malignant": 1,
    "sat/normal": 2,
    "sat/abnormal": 2,
  }
  for folder, n in layout.items():
    (tmp_path / folder).mkdir(parents=True)
    for i in range(n):
      Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(
        tmp_path / folder / f"{i}.png"
      )
  config = _config(
    scenario="natural",
    **{
      "data.source": "folder",
      "data.root": str(tmp_path / "nodes"),
      "data.sat_root": str(tmp_path / "sat"),
      "data.positive_labels": ("malignant", "abnormal"),
      "data.sat_per_class": 2,
      "data.image_size": 16,
    },
  )
  hsl.validate(config)
  pool, sat = nodes.load_data(config)
  assert pool.images.shape == (7, 16, 16) and sat.images.shape == (4, 16, 16)
  assert sorted(zip(pool.groups.tolist(), pool.labels.tolist())) == sorted(
    [("site_a", 1)] * 2 + [("site_a", 0)] * 3 + [("site_b", 0), ("site_b", 1)]
  )
  assert sat.labels.tolist().count(1) == 2
  assert nodes.make_partition(config, pool, 0).names == ["site_a", "site_b"]
  with pytest.raises(configlib.ConfigError, match="use scenario='natural'"):
    hsl.validate(_config(scenario="label", **{"data.source": "folder"}))


# ----------------------------------------------------------------------------- the paper's protocol
def test_protocol_presets_set_the_paper_and_legacy_fields():
  paper, legacy = _config("cpu"), _config("cpu,protocol=legacy")
  assert (paper.data.val_fraction, paper.data.test_fraction) == (0.1, 0.3)
  assert (
    paper.train.optimizer,
    paper.train.lr_schedule,
    paper.train.patience_epochs,
    paper.train.cosine_period_epochs,
  ) == ("adam", "cosine_restarts", 5, 10)
  assert (
    legacy.data.val_fraction,
    legacy.train.lr_schedule,
    legacy.train.patience_epochs,
    legacy.train.optimizer,
  ) == (0.0, "constant", 0, "adamw")
  assert {"no_sat", "no_al"} <= set(hsl.parse_methods(paper))
  with pytest.raises(configlib.ConfigError, match="needs a validation split"):
    hsl.validate(_config(**{"data.val_fraction": 0.0}))
  with pytest.raises(configlib.ConfigError, match="config.train.lr_schedule='step'"):
    hsl.validate(_config(**{"train.lr_schedule": "step"}))
  with pytest.raises(configlib.ConfigError, match="protocol='fast' is not one of"):
    _config("smoke,protocol=fast")


def test_compute_options_reach_the_vit_encoder_only():
  """config.model.remat / scan_layers / attention_impl, as in the other jobs: the ViT encoder
  takes them; with the ResNet, or with a bad value, validation fails naming the field."""
  config = _config(
    methods="hsl,fedavg", **{"model.encoder": "vit", "model.vit_depth": 2, "model.vit_patch": 4}
  )
  config.model.update(remat="dots", scan_layers=True, attention_impl="einsum")
  hsl.validate(config)
  for method in ("hsl", "fedavg"):
    model = nnx.eval_shape(lambda: hsl.build_model(config, method, jax.random.key(0)))
    encoder = model.encoder if method == "fedavg" else model.encoders[0]
    assert (encoder.remat, encoder.scan_layers, encoder.blocks[0].attn.impl) == (
      "dots",
      True,
      "einsum",
    )
  with pytest.raises(configlib.ConfigError, match=r"config\.model\.remat='all'"):
    hsl.validate(_config(methods="hsl", **{"model.encoder": "vit", "model.remat": "all"}))
  with pytest.raises(configlib.ConfigError, match=r"remat='full'.*apply to the ViT encoder only"):
    hsl.validate(_config(**{"model.remat": "full"}))


def test_split_node_is_60_10_30_disjoint_seeded_and_legacy_70_30():
  labels = np.array([0, 1] * 150)
  indices = np.arange(0, 300, 3)[:100]  # 50 per class, a node's subset of the pool
  labels[indices] = np.repeat([0, 1], 50)
  train, val, test = partition.split_node(labels, indices, 0.1, 0.3, seed=4)
  parts = np.concatenate([train, val, test])
  assert sorted(parts.tolist()) == indices.tolist()  # disjoint and complete
  for part, n in ((train, 30), (val, 5), (test, 15)):
    np.testing.assert_array_equal(np.bincount(labels[part], minlength=2), [n, n])
  again = partition.split_node(labels, indices, 0.1, 0.3, seed=4)
  assert all(np.array_equal(a, b) for a, b in zip(again, (train, val, test)))
  assert not np.array_equal(partition.split_node(labels, indices, 0.1, 0.3, seed=5)[2], test)
  # Legacy: no validation, 70/30; the test cases are those of the 60/10/30 split (same draw).
  tr, va, te = partition.split_node(labels, indices, 0.0, 0.3, seed=4)
  assert len(va) == 0 and len(tr) == 70 and np.array_equal(te, test)
  # Tiny classes: each split gets a case while training keeps one; 2 cases -> train + test.
  small = np.array([0, 0, 0, 1, 1])
  tr, va, te = partition.split_node(small, np.arange(5), 0.1, 0.3, seed=0)
  assert [np.bincount(small[p], minlength=2).tolist() for p in (tr, va, te)] == [
    [1, 1],
    [1, 0],
    [1, 1],
  ]


def test_split_node_keeps_each_patient_in_one_split():
  rng = np.random.default_rng(6)
  per_patient = rng.integers(1, 4, 100)  # 100 patients with 1-3 images each
  patients = np.repeat([f"p{i}" for i in range(100)], per_patient)
  labels = np.repeat(np.arange(100) % 2, per_patient)
  train, val, test = partition.split_node(
    labels, np.arange(len(labels)), 0.1, 0.3, seed=1, patients=patients
  )
  assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(len(labels)))
  owners = [set(patients[p]) for p in (train, val, test)]
  assert not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])
  assert [len(o) for o in owners] == [60, 10, 30]  # 60/10/30 of the patients, per class 30/5/15


def _hand_curve_fit(curve, local_epochs, patience, rounds):
  """hsl.fit on a fake 2-slot model whose parameter w_k sets slot k's validation AUC:
  w = 1 ranks every positive above every negative (AUC 1), -1 below (0), 0 ties (0.5)."""
  pool = nodes.Pool(
    np.repeat(np.array([0, 1, 0, 1], np.uint8), 4).reshape(4, 2, 2),
    np.array([0, 1, 0, 1]),
    np.zeros(4),
  )

  def do_round(state, r):
    return (
      {"w": jnp.asarray(curve[r], jnp.float32), "round": jnp.full(2, r, jnp.int32)},
      np.zeros(2),
    )

  predict = lambda p, s, images, sat: jax.nn.sigmoid(p["w"] * images.mean((1, 2)))
  config = _config(
    **{
      "fed.local_epochs": local_epochs,
      "train.patience_epochs": patience,
      "fed.num_rounds": rounds,
    }
  )
  return hsl.fit(
    config,
    "test",
    None,
    do_round,
    lambda state: (state, {}),
    predict,
    pool,
    None,
    [np.array([0, 1]), np.array([2, 3])],
    np.random.default_rng(0),
  )


def test_early_stopping_keeps_each_nodes_best_validation_round():
  # Validation AUC per round: slot 0 0.5, 1, 0, 0, 1, ...; slot 1 1, 1 (a tie: no gain), 0, ...
  curve = [(0, 1), (1, 1), (-1, -1), (-1, -1), (1, 1), (1, 1)]
  chosen, history = _hand_curve_fit(curve, local_epochs=2, patience=4, rounds=6)
  np.testing.assert_array_equal(history["val_auc"], [[0.5, 1], [1, 1], [0, 0], [0, 0]])
  # Patience 4 epochs = 2 rounds of 2 epochs: slot 0's best is round 1, slot 1's round 0, so
  # both have waited >= 4 epochs after round 3: 4 rounds run, the best ones are evaluated.
  np.testing.assert_array_equal(history["best_round"], [1, 0])
  assert len(history["losses"]) == 4
  np.testing.assert_array_equal(chosen[0]["round"], [1, 0])
  # Patience 0: no validation, every round runs and the last is evaluated.
  chosen, history = _hand_curve_fit(curve, local_epochs=2, patience=0, rounds=6)
  assert history["val_auc"].shape == (0, 2) and len(history["losses"]) == 6
  np.testing.assert_array_equal(chosen[0]["round"], [5, 5])
  stopper = hsl.EarlyStopping(1, local_epochs=5, patience_epochs=5)  # the paper's 5 x 5
  stopper.update([0.7], 0)
  assert not stopper.should_stop(0)
  stopper.update([0.6], 1)
  assert stopper.should_stop(1)  # one fusion round without gain = 5 epochs


@needs_torch
@pytest.mark.parametrize("schedule", ["cosine_restarts", "cosine"])
def test_cosine_schedule_matches_torch_schedulers(schedule):
  config = _config(
    **{
      "train.lr_schedule": schedule,
      "train.lr": 1e-3,
      "train.min_lr": 1e-4,
      "train.cosine_period_epochs": 10,
    }
  )
  opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
  torch_schedule = (
    torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, 10, eta_min=1e-4)
    if schedule == "cosine_restarts"
    else torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10, eta_min=1e-4)
  )
  expected = []
  for _ in range(25):
    expected.append(opt.param_groups[0]["lr"])
    opt.step()
    torch_schedule.step()
  got = hsl.epoch_lr(config.train, jnp.arange(25))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # Hand-worked: 1e-4 + 9e-4 * (1 + cos(pi * 5 / 10)) / 2 = 5.5e-4 at epoch 5 (and 15 with
  # restarts), 1e-4 + 9e-4 * (1 + cos(pi * 15 / 10)) / 2 = 5.5e-4 too without them.
  assert float(got[5]) == pytest.approx(5.5e-4, rel=1e-5)
  assert float(got[10]) == pytest.approx(1e-3 if schedule == "cosine_restarts" else 1e-4)


@needs_torch
@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_optimizer_with_per_epoch_cosine_matches_torch(optimizer):
  """make_optimizer against torch.optim.Adam / AdamW + CosineAnnealingWarmRestarts stepped
  every 2 optimizer steps (2 steps per epoch), period 2 epochs: a restart at step 4."""
  config = _config(
    **{
      "train.optimizer": optimizer,
      "train.lr_schedule": "cosine_restarts",
      "train.cosine_period_epochs": 2,
      "train.lr": 0.1,
      "train.min_lr": 0.01,
      "train.weight_decay": 0.05,
    }
  )
  tx = hsl.make_optimizer(config)
  rng = np.random.default_rng(7)
  w0, grads = rng.normal(size=3), rng.normal(size=(9, 3))
  w = jnp.asarray(w0, jnp.float32)
  state = hsl.set_steps_per_epoch(tx.init(w), 2)
  tw = torch.tensor(w0, dtype=torch.float32, requires_grad=True)
  cls = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
  opt = cls([tw], lr=0.1, weight_decay=0.05)
  sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, 2, eta_min=0.01)
  for step, g in enumerate(grads):
    updates, state = tx.update(jnp.asarray(g, jnp.float32), state, w)
    w = optax.apply_updates(w, updates)
    tw.grad = torch.tensor(g, dtype=torch.float32)
    opt.step()
    if step % 2 == 1:  # end of an epoch
      sched.step()
    # float32 rounding only; a wrong lr in any epoch moves w by ~1e-2.
    np.testing.assert_allclose(w, tw.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_ablations_build_their_models_and_objectives():
  config = _config()
  key = jax.random.key(0)
  hsl_model, no_sat, no_al = (
    nnx.eval_shape(lambda m=m: hsl.build_model(config, m, key)) for m in ("hsl", "no_sat", "no_al")
  )  # shapes only: no compute
  assert isinstance(hsl_model, mmoe.MMoE) and hsl_model.num_tasks == 2
  assert isinstance(no_sat, mmoe.MMoE) and no_sat.num_tasks == 1  # the MMoE, without the SAT
  assert len(no_sat.gates) == len(no_sat.encoders) == 1 and no_sat.num_experts == 3
  assert isinstance(no_al, mmoe.Classifier)  # no auxiliary learning architecture
  assert hsl.METHODS["no_sat"] == hsl.METHODS["no_al"] == hsl.METHODS["hsl"] == "fedavg_uniform"
  # Their training batches carry no SAT images and the losses need none.
  pool = nodes.Pool(np.zeros((6, 16, 16), np.uint8), np.array([0, 1] * 3), np.zeros(6))
  batches, _ = nodes.round_batches(
    np.random.default_rng(0), pool, None, [np.arange(6)], 1, 4, hsl=False
  )
  assert set(batches) == {"image", "label"}
  batch = jax.tree.map(lambda x: x[0, 0], batches)
  for method, model in (("no_sat", no_sat), ("no_al", no_al)):
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    loss_fn = hsl.make_loss_fn(graphdef, config, method)
    loss, (_, aux) = jax.eval_shape(
      loss_fn, nnx.to_pure_dict(params), nnx.to_pure_dict(stats), batch, key
    )
    assert loss.shape == () and set(aux) == {"primary"}


# ----------------------------------------------------------------------------- ratio sweeps
def test_sweeps_are_the_papers_ten_ratios_and_partition_accordingly():
  label, quantity = _config("cpu,sweep=label"), _config("cpu,sweep=quantity")
  assert label.scenario == "label" and quantity.scenario == "quantity"
  assert hsl.sweep_ratios(label) == (2, 4, 6, 8, 10, 20, 40, 60, 80, 100)
  assert hsl.sweep_ratios(quantity) == (1, 2, 4, 6, 8, 10, 20, 40, 60, 80)
  hsl.validate(label)
  with pytest.raises(configlib.ConfigError, match="config.sweep='label' varies the label"):
    hsl.validate(_config("cpu,sweep=label,scenario=combined"))
  pool = nodes.Pool(np.zeros((3000, 1, 1), np.uint8), np.array([0, 1] * 1500), np.zeros(3000))
  for ratio in hsl.sweep_ratios(label):
    label.data.ratio = quantity.data.ratio = ratio
    counts = nodes.make_partition(label, pool, 0).counts(pool.labels, (0, 1))
    assert counts.sum(1).tolist() == [120, 120] and counts[0].tolist() == [60, 60]
    assert abs(counts[1][0] - 120 * ratio / (ratio + 1)) <= 1  # node 2 normal:abnormal = r:1
    sizes = nodes.make_partition(quantity, pool, 0).counts(pool.labels, (0, 1)).sum(1)
    assert sizes.sum() == 240 and abs(sizes[0] - 240 * ratio / (ratio + 1)) <= 1


def test_sweep_runs_one_study_per_ratio_and_writes_table_and_plot(tmp_path, monkeypatch):
  calls = []

  def fake_study(config, workdir, programs):
    """A study whose AUC for method m at node k is a known function of the ratio."""
    calls.append((config.data.ratio, config.sweep, pathlib.Path(workdir).name))
    nodes = ["node1_1:1", f"node2_{config.data.ratio:g}:1"]
    per_node = [
      dict(
        method=m,
        node=n,
        metric=metric,
        mean=auc,
        t_low=auc - 0.1,
        t_high=auc + 0.1,
        pooled=auc,
        boot_low=auc - 0.1,
        boot_high=auc + 0.1,
        repeats=5,
      )
      for m, base in (("hsl", 0.9), ("fedavg", 0.7))
      for k, n in enumerate(nodes)
      for metric, auc in (("auc", base - 0.001 * k * config.data.ratio), ("accuracy", 0.5))
    ]
    return dict(nodes=nodes, per_node=per_node)

  monkeypatch.setattr(hsl, "run_study", fake_study)
  summary = hsl.run(_config("smoke,sweep=label"), tmp_path)
  ratios = hsl.SWEEP_RATIOS["label"]
  assert calls == [(r, "", f"ratio_{r:g}") for r in ratios]
  rows = _read_csv(tmp_path / "sweep.csv")
  assert len(rows) == len(ratios) * 2 * 2 == len(summary["rows"])  # ratios x methods x nodes
  for row in rows:
    base = 0.9 if row["method"] == "hsl" else 0.7
    k = int(row["node"][-1]) - 1
    assert float(row["mean"]) == pytest.approx(base - 0.001 * k * float(row["ratio"]), abs=1e-4)
  assert (tmp_path / "sweep_auc.png").stat().st_size > 0


def test_manifest_patient_column_keeps_each_patient_in_one_split(tmp_path):
  rng = np.random.default_rng(8)
  rows, sat_rows = ["image,client,label,patient"], ["image,label"]
  for i in range(20):  # 10 patients x 2 images at one site, 5 benign and 5 malignant patients
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    rows.append(f"{i}.png,site_a,{('benign', 'malignant')[i // 2 % 2]},p{i // 2}")
  for i, label in enumerate(["normal", "normal", "abnormal", "abnormal"]):
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(tmp_path / f"s{i}.png")
    sat_rows.append(f"s{i}.png,{label}")
  (tmp_path / "nodes.csv").write_text("\n".join(rows) + "\n")
  (tmp_path / "sat.csv").write_text("\n".join(sat_rows) + "\n")
  config = _config(
    scenario="natural",
    **{
      "data.source": "manifest",
      "data.manifest": str(tmp_path / "nodes.csv"),
      "data.sat_manifest": str(tmp_path / "sat.csv"),
      "data.patient_column": "patient",
      "data.positive_labels": ("malignant", "abnormal"),
      "data.sat_per_class": 2,
      "data.image_size": 8,
    },
  )
  hsl.validate(config)
  pool, _ = nodes.load_data(config)
  assert sorted(set(pool.patients.tolist())) == sorted(f"p{i}" for i in range(10))
  split = nodes.make_split(config, pool, 0)
  owners = [set(pool.patients[idx[0]].tolist()) for idx in (split.train, split.val, split.test)]
  assert sum(len(o) for o in owners) == 10 and len(set().union(*owners)) == 10  # disjoint
  assert [len(o) for o in owners] == [4, 2, 4]  # per class of 5 patients: 2 / 1 / 2
  with pytest.raises(configlib.ConfigError, match="data.patient_column='patient' is a CSV"):
    hsl.validate(
      _config(scenario="natural", **{"data.source": "folder", "data.patient_column": "patient"})
    )


def test_fit_stops_before_the_round_the_strategy_refuses():
  """The strategy's stop_reason (DP-FedAvg's spent budget) ends a cell before that round: the
  rounds already run are kept, no further round is trained."""
  config = _config(**{"train.patience_epochs": 0, "fed.num_rounds": 4})
  trained = []

  def do_round(state, r):
    trained.append(r)
    return state + 1, np.full(2, float(r))

  refuse_from = 2
  chosen, history = hsl.fit(
    config,
    "unit",
    0,
    do_round,
    lambda s: s,
    None,
    None,
    None,
    [np.arange(3), np.arange(3)],
    np.random.default_rng(0),
    stop_reason=lambda done: "budget spent" if done >= refuse_from else None,
  )
  assert trained == [0, 1] and chosen == 2
  np.testing.assert_array_equal(history["losses"], [[0.0, 0.0], [1.0, 1.0]])
