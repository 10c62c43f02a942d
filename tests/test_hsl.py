"""HeteroSync Learning: ResNet-18 against torchvision, the MMoE against numpy, the study job."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import nnx

from ultrajax.models import mmoe, resnet

TORCH_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var",
               "kernel": "weight", "downsample_conv": "downsample.0",
               "downsample_bn": "downsample.1"}


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


@pytest.mark.parametrize("num_classes", [1000, 1])
def test_resnet18_parameter_count_matches_torchvision(num_classes):
  ours = nnx.eval_shape(lambda: resnet.ResNet(num_classes=num_classes, rngs=nnx.Rngs(0)))
  theirs = torchvision.models.resnet18(num_classes=num_classes)
  count = sum(x.size for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
  assert count == sum(p.numel() for p in theirs.parameters())
  buffers = sum(x.size for x in jax.tree.leaves(nnx.state(ours, nnx.BatchStat)))
  assert buffers == sum(b.numel() for n, b in theirs.named_buffers() if "running" in n)


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
  np.testing.assert_allclose(new_stats["bn1"]["mean"][...],
                             theirs.bn1.running_mean.numpy(), rtol=1e-4, atol=1e-5)
  # torch updates running_var with the unbiased batch variance, Flax with the biased one: the
  # stem's 4 x 24 x 24 values per channel make the factor n / (n - 1) negligible.
  np.testing.assert_allclose(new_stats["bn1"]["var"][...], theirs.bn1.running_var.numpy(),
                             rtol=1e-3)
  # The input state is untouched: updated statistics exist only in the returned state.
  assert not np.allclose(stats["bn1"]["mean"][...], new_stats["bn1"]["mean"][...])


# ----------------------------------------------------------------------------- MMoE
TINY_HEAD = dict(num_tasks=2, feature_dim=6, num_experts=3, expert_hidden=5, expert_dim=4,
                 tower_hidden=3)
TINY_ENCODER = dict(resnet_width=4, resnet_stem="cifar")


def _tiny_mmoe(temperature=3.0, encoder="resnet18", **kw):
  kwargs = dict(vit_width=16, vit_depth=1, vit_heads=2, vit_patch=8) if encoder == "vit" \
      else TINY_ENCODER
  model = mmoe.MMoE(**TINY_HEAD, encoder=encoder, image_size=16, temperature=temperature,
                    encoder_kwargs=kwargs, rngs=nnx.Rngs(1), **kw)
  # Noise on every parameter, so zero biases count in the comparison too.
  rng = np.random.default_rng(0)
  nnx.update(model, jax.tree.map(lambda x: x + jnp.asarray(0.3 * rng.normal(size=x.shape),
                                                             x.dtype), nnx.state(model, nnx.Param)))
  return model


def _numpy_head(model, feats, temperature):
  """The MMoE head of research/seed_systems.md 4.1 in float64 numpy, from the model's params."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(
      nnx.state(model, nnx.Param)))
  lin = lambda layer, x: x @ layer["kernel"] + layer["bias"]
  softmax = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(
      z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
  feats = [np.asarray(f, np.float64) for f in feats]
  emb = softmax(np.concatenate(feats, -1) / temperature)
  experts = np.stack([np.maximum(emb @ p["expert_w1"][k] + p["expert_b1"][k], 0)
                      @ p["expert_w2"][k] + p["expert_b2"][k]
                      for k in range(p["expert_w1"].shape[0])], axis=1)  # [B, E, O]
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
  feats = [np.maximum(np.asarray(_jit_call(model.encoders[t], images[t]), np.float64)
                      @ np.asarray(p["fc"][t]["kernel"]) + np.asarray(p["fc"][t]["bias"]), 0)
           for t in range(2)]
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
    np.testing.assert_allclose(logits, _numpy_head(model, feats, temperature)[0], rtol=1e-5,
                               atol=1e-5)
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
  np.testing.assert_allclose(inner["task_features"][:, 1], inner["experts"][:, 2] + residual,
                             rtol=1e-5, atol=1e-5)


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
import csv  # noqa: E402
import pathlib  # noqa: E402

from PIL import Image  # noqa: E402
from sklearn import metrics as sk_metrics  # noqa: E402

from ultrajax import configlib  # noqa: E402
from ultrajax.jobs import hsl  # noqa: E402

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _config(arg="smoke", **overrides):
  config = configlib.load_config_module(CONFIGS / "hsl.py").get_config(arg)
  config.update_from_flattened_dict(overrides)  # 'a.b' -> config.a.b
  return config


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
  """configs/hsl.py:smoke through hsl.run: every method, one repeat, combined scenario.

  XLA's optimisations are off while it runs: compiling the vmapped ResNet rounds dominates
  this tiny study, and the results only need to be consistent, not fast.
  """
  workdir = tmp_path_factory.mktemp("hsl_smoke")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    summary = hsl.run(_config(), workdir)
  finally:
    jax.config.update("jax_disable_most_optimizations", False)
  return workdir, summary


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_smoke_runs_every_method_and_writes_tables_and_plots(smoke_study):
  workdir, summary = smoke_study
  methods = hsl.parse_methods(_config())
  assert set(methods) == set(hsl.METHODS)  # the smoke preset runs every method
  nodes = summary["nodes"]
  assert len(nodes) == 5 and nodes[0] == "screening_centre"
  for name in ("per_node.csv", "runs.csv", "fairness.csv", "results.json", "partition.png",
               "boxplots_auc.png", "boxplots_accuracy.png"):
    assert (workdir / name).stat().st_size > 0, name
  assert sorted(p.parent.name for p in (workdir / "runs").glob("*/repeat_0.npz")) == sorted(
      methods)
  per_node = _read_csv(workdir / "per_node.csv")
  assert len(per_node) == len(methods) * len(nodes) * len(hsl.METRICS)

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
    assert float(row["accuracy"]) == pytest.approx(sk_metrics.accuracy_score(labels, preds),
                                                   abs=1e-4)
    assert float(row["recall"]) == pytest.approx(
        sk_metrics.recall_score(labels, preds, zero_division=0), abs=1e-4)
    assert float(row["precision"]) == pytest.approx(
        sk_metrics.precision_score(labels, preds, zero_division=0), abs=1e-4)
    if 0 < labels.sum() < len(labels):
      assert float(row["auc"]) == pytest.approx(sk_metrics.roc_auc_score(labels, probs),
                                                abs=1e-4)

  # Fairness: worst node and spread of the per-node mean AUC; local's gain over itself is 0.
  fairness = {(r["method"], r["metric"]): r for r in _read_csv(workdir / "fairness.csv")}
  for method in ("hsl", "local"):
    means = []
    for node in nodes:
      v = [float(r["auc"]) for r in runs if r["method"] == method and r["node"] == node
           and r["auc"] != "nan"]
      means.append(np.mean(v) if v else np.nan)
    row = fairness[(method, "auc")]
    assert float(row["worst"]) == pytest.approx(np.nanmin(means), abs=1e-3)
    assert float(row["spread"]) == pytest.approx(np.nanmax(means) - np.nanmin(means), abs=1e-3)
  assert all(float(fairness[("local", "auc")][f"gain_{n}"]) == 0.0 for n in nodes
             if fairness[("local", "auc")][f"gain_{n}"] != "nan")


def test_killed_study_resumes_with_the_missing_run_only(smoke_study):
  workdir, _ = smoke_study
  missing = workdir / "runs" / "fedavg" / "repeat_0.npz"
  with np.load(missing) as f:
    before = dict(f)
  missing.unlink()
  others = {p: p.stat().st_mtime_ns for p in (workdir / "runs").glob("*/*.npz")}
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    hsl.run(_config(), workdir)
  finally:
    jax.config.update("jax_disable_most_optimizations", False)
  assert {p: p.stat().st_mtime_ns for p in others} == others  # nothing else retrained
  with np.load(missing) as f:  # the redone run reproduces the lost one exactly
    for key, value in before.items():
      np.testing.assert_array_equal(f[key], value, err_msg=key)


def test_unknown_method_is_an_error_naming_the_valid_ones():
  with pytest.raises(configlib.ConfigError, match=r"unknown method\(s\) \['fedsgd'\].*'hsl'"):
    hsl.validate(_config(methods="hsl,fedsgd"))
  with pytest.raises(configlib.ConfigError, match="config.scenario='iid' is not one of"):
    hsl.validate(_config(scenario="iid"))


def test_ratios_the_data_cannot_meet_raise_the_partition_error():
  # 30 negatives and 3 positives cannot give node 2 of the label scenario 20 images at 1:1.
  pool = hsl.Pool(np.zeros((33, 8, 8), np.uint8), np.array([0] * 30 + [1] * 3),
                  np.array(["thyroid"] * 33))
  config = _config(scenario="label", **{"data.label_node_size": 20, "data.ratio": 1.0})
  with pytest.raises(ValueError, match=r"node 'node1_1:1' needs 10 examples of class 1"):
    hsl.make_partition(config, pool, seed=0)


@pytest.mark.parametrize("name", ["fedprox", "scaffold", "fedavg", "personalized"])
def test_shared_local_transform_equals_the_strategy(name):
  """The job compiles one local-training program for all single-task strategies; its
  transform must equal each strategy's own (fed/strategies.py)."""
  rng = np.random.default_rng(4)
  tree = lambda: {"a": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                  "b": {"c": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}}
  strategy = hsl.make_strategy(_config(), name)
  server = jax.tree.map(lambda x: x[0], tree())
  state = strategy.init(server, 3)
  if name == "scaffold":  # non-zero controls, so c - c_i matters
    state = {"c": jax.tree.map(lambda x: x[0], tree()), "c_clients": tree()}
  grads, params, start = tree(), tree(), tree()
  ctx = hsl.local_context(strategy, state, params)
  theirs_ctx = strategy.local_context(state)
  for c in range(3):
    pick = lambda t: jax.tree.map(lambda x: x[c], t)
    expected = strategy.local_grad_transform(
        pick(grads), pick(params), pick(start), None if theirs_ctx is None else pick(theirs_ctx))
    got = hsl._AnyLocalTransform().local_grad_transform(pick(grads), pick(params), pick(start),
                                                        pick(ctx))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 got, expected)


def test_folder_nodes_and_sat_load_with_their_labels(tmp_path):
  rng = np.random.default_rng(5)
  layout = {"nodes/site_a/malignant": 2, "nodes/site_a/benign": 3, "nodes/site_b/benign": 1,
            "nodes/site_b/malignant": 1, "sat/normal": 2, "sat/abnormal": 2}
  for folder, n in layout.items():
    (tmp_path / folder).mkdir(parents=True)
    for i in range(n):
      Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(
          tmp_path / folder / f"{i}.png")
  config = _config(scenario="natural", **{
      "data.source": "folder", "data.root": str(tmp_path / "nodes"),
      "data.sat_root": str(tmp_path / "sat"), "data.positive_labels": ("malignant", "abnormal"),
      "data.sat_per_class": 2, "data.image_size": 16})
  hsl.validate(config)
  pool, sat = hsl.load_data(config)
  assert pool.images.shape == (7, 16, 16) and sat.images.shape == (4, 16, 16)
  assert sorted(zip(pool.groups.tolist(), pool.labels.tolist())) == sorted(
      [("site_a", 1)] * 2 + [("site_a", 0)] * 3 + [("site_b", 0), ("site_b", 1)])
  assert sat.labels.tolist().count(1) == 2
  assert hsl.make_partition(config, pool, 0).names == ["site_a", "site_b"]
  with pytest.raises(configlib.ConfigError, match="use scenario='natural'"):
    hsl.validate(_config(scenario="label", **{"data.source": "folder"}))
