"""HeteroSync Learning (HSL) and federated baselines on heterogeneous nodes: a whole study.

The script, in order:
  1. check the config; load the primary-task pool (phantom organs, or folder / CSV nodes) and
     the shared anchor task (SAT: one dataset, 1:1 labels, identical at every node);
  2. for each repeat r (the paper's five): partition the pool into nodes with the scenario's
     partitioner (ultrajax/data/partition.py) seeded by (seed, r), split every node into
     train / val / test (the paper: 60/10/30), stratified by label, by patient where the data
     name one;
  3. for each method: initialise from key(seed, r) and train up to `rounds` rounds of
     `local_epochs` local epochs per node (ultrajax/fed/local.py: vmap over nodes of a scan over
     steps, then the strategy's aggregation); after every round validate each node's model on
     its validation set, keep each node's best-validation-AUC model and stop once no node has
     improved for `patience_epochs` epochs; evaluate each node's best model on its test set
     and write the predictions atomically to runs/<method>/repeat_<r>.npz;
  4. report: per-node AUC / accuracy / recall / precision with a t-interval over repeats and a
     bootstrap CI over the pooled predictions of all repeats (the paper's statistic), the
     fairness summary (worst node, spread, gain over local-only training) and box plots.
A sweep (config.sweep = 'label' | 'quantity') runs steps 1-4 once per ratio of Fig. 2 and adds
a table and a plot of AUC against the ratio per method and node.

Protocols (configs/hsl.py PROTOCOLS): 'paper' as above, with Adam and a per-epoch cosine
learning rate restarted every 10 epochs; 'legacy' splits 70/30, evaluates the last round and
keeps the learning rate constant (AdamW), the protocol of the first published tables.

Methods. 'hsl' trains models/mmoe.py on (primary, SAT) batch pairs with BCE on both towers and
averages ALL parameters and BatchNorm statistics unweighted after each round (the paper's
equation 1; strategy 'fedavg_uniform'). The paper's ablations (Methods, Fig. 1C / 3A) keep that
fusion: 'no_sat' removes the SAT data but keeps the auxiliary learning architecture (the MMoE
with one encoder, the experts, one gate and one tower, on the primary task alone); 'no_al'
removes the architecture, so the SAT plays no role (the single-task model below, averaged
unweighted). Every other method trains the single-task baseline (ResNet-18 + linear logit,
BCE) under the federated strategy of the same name (ultrajax/fed/strategies.py); 'central'
pools every node's training data into one client (and validation data into one validation
set) and evaluates that one model on each node's test set.

Resume. A finished (method, repeat) is one small results file, written to a temporary name and
renamed, so a killed study continues at the first missing file; the round loop of one
(method, repeat) is short (minutes on CPU) and is redone whole rather than checkpointed.

Inferred where the paper and the official code are silent: a test image's prediction comes
with a SAT test image in the second branch (cycled in a fixed order; the primary logit depends
on it through the shared softmax). Validation (the paper: "every 5 epochs before parameter
aggregation") scores the model each node would be evaluated with, i.e. after the round's
aggregation (for HSL and FedAvg the fused model), so the selected model is the one tested. A
node whose validation set lacks a class has no AUC: it is evaluated at the last round and does
not hold up stopping. The paper's further rule (">= 3 consecutive plateaus with < 0.5%
improvement") is not applied: patience alone ends training.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import pathlib
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import parameter_overview, periodic_actions
from flax import nnx
from PIL import Image

from ultrajax import configlib
from ultrajax.data import partition, phantom, sources
from ultrajax.eval import metrics, significance
from ultrajax.fed import local, strategies
from ultrajax.models import mmoe
from ultrajax.train import resume
from ultrajax.viz import boxplots
from ultrajax.viz import partition as partition_plot

# method -> federated strategy. 'hsl' is the MMoE + SAT objective; the rest are single-task.
METHODS = {
    "hsl": "fedavg_uniform",
    "no_sat": "fedavg_uniform",
    "no_al": "fedavg_uniform",
    "local": "local",
    "central": "central",
    "fedavg": "fedavg",
    "fedavg_uniform": "fedavg_uniform",
    "fedprox": "fedprox",
    "fedbn": "fedbn",
    "personalized": "personalized",
    "fedadam": "fedadam",
    "fedyogi": "fedyogi",
    "fedadagrad": "fedadagrad",
    "scaffold": "scaffold",
}
# SplitAVG trains a split single-task model (client: ResNet stem + first stages; server: the
# rest and the logit) with fed/local.py's split-learning round instead of parameter mixing.
METHODS["splitavg"] = "splitavg"
SCENARIOS = ("feature", "label", "quantity", "combined", "natural")
METRICS = ("auc", "accuracy", "recall", "precision")
# Fig. 2 B / C: node 2's normal:abnormal ratio (node 1 stays 1:1) and the n1:n2 quantity ratio.
SWEEP_RATIOS = {"label": (2, 4, 6, 8, 10, 20, 40, 60, 80, 100),
                "quantity": (1, 2, 4, 6, 8, 10, 20, 40, 60, 80)}
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("cosine_restarts", "cosine", "constant")
PIXEL_MEAN, PIXEL_STD = 0.5, 0.25


# ----------------------------------------------------------------------------- config
def parse_methods(config) -> list[str]:
  names = [m.strip() for m in str(config.methods).split(",") if m.strip()]
  unknown = [m for m in names if m not in METHODS]
  configlib.check(not unknown, f"config.methods: unknown method(s) {unknown}; valid methods are "
                  f"{sorted(METHODS)}")
  configlib.check(bool(names), "config.methods names no method")
  configlib.check(len(set(names)) == len(names), f"config.methods repeats a method: {names}")
  return names


def validate(config) -> list[str]:
  """Fails at start-up naming the field at fault; returns the methods to run."""
  c = configlib
  c.check_choice(config, "scenario", SCENARIOS)
  c.check_choice(config, "data.source", ("phantom", "folder", "manifest"))
  c.check_choice(config, "model.encoder", mmoe.ENCODERS)
  c.check_range(config, "repeats", 1)
  c.check_range(config, "data.image_size", 8)
  c.check_range(config, "data.test_fraction", 0.0, 1.0, low_inclusive=False,
                high_inclusive=False)
  c.check_range(config, "data.val_fraction", 0.0, 1.0, high_inclusive=False)
  c.check(config.data.val_fraction + config.data.test_fraction < 1.0,
          f"config.data.val_fraction + test_fraction = {config.data.val_fraction} + "
          f"{config.data.test_fraction} leaves no training data")
  c.check_choice(config, "train.optimizer", OPTIMIZERS)
  c.check_choice(config, "train.lr_schedule", LR_SCHEDULES)
  c.check_range(config, "train.cosine_period_epochs", 1)
  c.check_range(config, "train.min_lr", 0.0, config.train.lr)
  c.check_range(config, "train.patience_epochs", 0)
  c.check(config.train.patience_epochs == 0 or config.data.val_fraction > 0,
          f"config.train.patience_epochs={config.train.patience_epochs} needs a validation "
          "split: set config.data.val_fraction > 0 (or patience_epochs=0)")
  c.check_range(config, "data.min_class_count", 1)
  c.check_choice(config, "sweep", ("", *SWEEP_RATIOS))
  if config.sweep:
    c.check(config.scenario == config.sweep, f"config.sweep={config.sweep!r} varies the "
            f"{config.sweep} scenario's ratio; config.scenario is {config.scenario!r}")
    ratios = tuple(config.sweep_ratios)
    c.check(all(float(r) >= 1 for r in ratios) and len(set(ratios)) == len(ratios),
            f"config.sweep_ratios={ratios} must be distinct ratios >= 1 (() = the paper's)")
  c.check_range(config, "data.ratio", 1.0)
  c.check_range(config, "data.sat_per_class", 2)
  c.check_range(config, "model.temperature", 0.0, low_inclusive=False)
  for name in ("rounds", "local_epochs", "batch_size", "eval_batch_size"):
    c.check_range(config, f"train.{name}", 1)
  c.check_range(config, "report.bootstrap_samples", 1)
  c.check_range(config, "strategy.splitavg_cut", 1, 4)
  c.check_choice(config, "strategy.splitavg_cut_grad", ("average", "own"))
  c.check(not config.data.patient_column or config.data.source == "manifest",
          f"config.data.patient_column={config.data.patient_column!r} is a CSV column; "
          f"data.source={config.data.source!r} has no patient ids (each image is its own)")
  c.check(bool(config.data.positive_labels),
          "config.data.positive_labels must name at least one label")
  if config.data.source == "phantom":
    bad = [o for o in (*config.data.organs, config.data.single_organ, config.data.sat_organ)
           if o not in phantom.ORGANS]
    c.check(not bad,
            f"config.data.organs / single_organ / sat_organ: {bad} not in {phantom.ORGANS}")
    bad = [l for l in config.data.positive_labels if l not in phantom.LABELS]
    c.check(not bad, f"config.data.positive_labels: {bad} not in {phantom.LABELS}")
  else:
    c.check(config.scenario == "natural", f"config.scenario={config.scenario!r}: folder and "
            "manifest data keep their own nodes, use scenario='natural'")
    what = "root" if config.data.source == "folder" else "manifest"
    c.check(bool(config.data[what]) and bool(config.data[f"sat_{what}"]),
            f"config.data.{what} and config.data.sat_{what} must be set for "
            f"data.source={config.data.source!r}")
  methods = parse_methods(config)
  c.check("splitavg" not in methods or config.model.encoder == "resnet18",
          "config.methods: 'splitavg' splits a ResNet between client and server; it needs "
          "config.model.encoder='resnet18'")
  return methods


# ----------------------------------------------------------------------------- data
class Pool(NamedTuple):
  """Labelled grey images: images uint8 [N, S, S], labels int [N] in {0, 1}, groups [N] str,
  patients [N] str or None (every image its own patient)."""
  images: np.ndarray
  labels: np.ndarray
  groups: np.ndarray
  patients: np.ndarray | None = None

  def take(self, idx) -> Pool:
    return Pool(*(None if a is None else a[idx] for a in self))


def _phantom_pool(organs, per_organ: int, size: int, seed: int, positive) -> Pool:
  images, labels, groups = [], [], []
  for organ in organs:
    probe = sources.ORGAN_PROBE[organ]
    for i in range(per_organ):
      record = phantom.generate(np.random.default_rng([seed, phantom.ORGANS.index(organ), i]),
                                organ, probe, size)
      images.append(record["image"])
      labels.append(int(phantom.LABELS[record["label"]] in positive))
      groups.append(organ)
  return Pool(np.stack(images), np.asarray(labels), np.asarray(groups))


def _balanced(pool: Pool, per_class: int, seed: int, what: str) -> Pool:
  rng = np.random.default_rng(seed)
  picks = []
  for c in (0, 1):
    idx = np.flatnonzero(pool.labels == c)
    if len(idx) < per_class:
      raise ValueError(f"{what}: {per_class} examples of class {c} needed, {len(idx)} available")
    picks.append(rng.choice(idx, per_class, replace=False))
  return pool.take(np.sort(np.concatenate(picks)))


def _grey(image: np.ndarray, size: int) -> np.ndarray:
  img = Image.fromarray(image)
  return np.asarray(img.convert("L").resize((size, size), Image.BILINEAR))


def _file_pool(records, size: int, positive, what: str, patients: bool = False) -> Pool:
  """records: (image uint8 [H, W(, 3)], label name, node, patient id or '') -> grey, resized
  Pool; with `patients` the ids are kept (an empty id is a patient of its own)."""
  images, labels, groups, patients = [], [], [], []
  for image, label, group, patient in records:
    images.append(_grey(image, size))
    labels.append(int(label in positive))
    groups.append(group)
    patients.append(patient or f"image-{len(patients)}")
  if not images:
    raise ValueError(f"{what}: no images")
  return Pool(np.stack(images), np.asarray(labels), np.asarray(groups),
              np.asarray(patients) if patients else None)


def _labelled_records(config, root_or_csv: str, folder: bool, patients: bool = False):
  """(image, label name, node, patient) per record of a folder tree root/<node>/<label>/...
  (or, for the SAT, root/<label>/...), or of a CSV manifest with image / client / label
  columns (and data.patient_column when `patients`; '' otherwise)."""
  d = config.data
  if folder:
    for client in sources.folder_clients(root_or_csv):
      for i in range(len(client)):
        record = client[i]
        rel = os.path.relpath(record["path"], os.path.join(root_or_csv, client.name))
        # root/<node>/<label>/x.png, or root/<label>/x.png for a single-level tree (the SAT).
        label = rel.split(os.sep)[0] if os.sep in rel else client.name
        yield record["image"], label, client.name, ""
  else:
    patient = d.patient_column if patients and d.patient_column else ""
    extra = (d.label_column, patient) if patient else (d.label_column,)
    for client in sources.manifest_clients(root_or_csv, d.image_column, d.client_column,
                                           extra_columns=extra):
      for i in range(len(client)):
        record = client[i]
        yield (record["image"], record[d.label_column], client.name,
               record[patient] if patient else "")


def load_data(config) -> tuple[Pool, Pool]:
  """(primary pool, SAT) with the SAT balanced 1:1, sat_per_class of each class."""
  d = config.data
  positive = tuple(d.positive_labels)
  if d.source == "phantom":
    organs = ((d.single_organ,) if config.scenario in ("label", "quantity")
              else tuple(d.organs))
    need = _pool_size(config, len(organs))
    pool = _phantom_pool(organs, need, d.image_size, config.seed, positive)
    # The SAT draws from its own seed stream so it is the same whatever the scenario.
    sat_all = _phantom_pool((d.sat_organ,), 4 * d.sat_per_class, d.image_size,
                            config.seed + 7919, positive)
  else:
    folder = d.source == "folder"
    patients = bool(d.patient_column)
    pool = _file_pool(_labelled_records(config, d.root if folder else d.manifest, folder,
                                        patients), d.image_size, positive,
                      f"config.data.{'root' if folder else 'manifest'}", patients)
    sat_all = _file_pool(_labelled_records(config, d.sat_root if folder else d.sat_manifest,
                                           folder), d.image_size, positive,
                         f"config.data.sat_{'root' if folder else 'manifest'}")
  return pool, _balanced(sat_all, d.sat_per_class, config.seed, "SAT")


def _combined_nodes(config) -> list[partition.NodeSpec]:
  """The paper's five nodes at combined_scale, each node's rarer class raised to at least
  min_class_count examples (so a 1:2000 region keeps a case for training, validation and
  test)."""
  d = config.data
  nodes = []
  for node in partition.COMBINED_NODES:
    size = max(2 * d.min_class_count, int(round(node.size * d.combined_scale)))
    ratio = np.asarray(node.ratio, np.float64)
    rare = int(np.argmin(ratio))
    share = d.min_class_count / size
    if ratio[rare] / ratio.sum() < share:
      ratio[rare] = share * ratio[1 - rare] / (1 - share)
    nodes.append(node._replace(size=size, ratio=tuple(ratio)))
  return nodes


def _pool_size(config, num_organs: int) -> int:
  """Phantom images to draw per organ: enough of each class for the scenario's nodes (the
  phantom draws 40% normal), with a margin so every repeat can re-draw."""
  d = config.data
  if config.scenario == "feature":
    per_class = d.feature_node_size / 2
  elif config.scenario == "label":
    per_class = d.label_node_size * (0.5 + d.ratio / (d.ratio + 1))
  elif config.scenario == "quantity":
    per_class = d.quantity_total / 2
  else:
    per_class = sum(n.size * max(n.ratio) / sum(n.ratio) for n in _combined_nodes(config))
    per_class /= num_organs
  return int(math.ceil(per_class / phantom.LABEL_PROBS[0] * 1.3)) + 8


def make_partition(config, pool: Pool, seed: int) -> partition.Partition:
  d = config.data
  if config.scenario == "feature":
    return partition.feature_skew(pool.labels, pool.groups, d.feature_node_size, seed,
                                  group_values=list(d.organs), classes=(0, 1))
  if config.scenario == "label":
    return partition.label_ratios(pool.labels, [d.label_node_size] * 2, [(1, 1), (d.ratio, 1)],
                                  seed, classes=(0, 1), names=["node1_1:1", f"node2_{d.ratio:g}:1"])
  if config.scenario == "quantity":
    return partition.quantity_ratios(pool.labels, (d.ratio, 1), d.quantity_total, seed,
                                     classes=(0, 1), names=[f"node1_x{d.ratio:g}", "node2_x1"])
  if config.scenario == "combined":
    return partition.draw(pool.labels, _combined_nodes(config), seed, classes=(0, 1))
  return partition.natural(pool.groups)


def split_node(labels, indices, val_fraction: float, test_fraction: float, seed: int,
               patients=None):
  """One node's indices [n] -> sorted (train, val, test) index arrays, disjoint.

  Stratified per class over units: patients (the label of a patient's first image decides its
  class) or, with patients=None, single images. Of a class's n units, round(test_fraction * n)
  go to test and round(val_fraction * n) to validation, each at least 1 while the class keeps
  a unit for training (a single unit stays in training). val_fraction=0 gives the legacy 70/30
  split exactly. A patient's images all land in one split.
  """
  indices = np.asarray(indices)
  rng = np.random.default_rng(seed)
  if patients is None:
    units, unit_of = indices, indices
  else:
    unit_of = np.asarray(patients)[indices]
    units, first = np.unique(unit_of, return_index=True)
    units = units[np.argsort(first, kind="stable")]  # order of first appearance
  unit_label = labels[indices] if patients is None else np.asarray(
      [labels[indices[unit_of == u][0]] for u in units])
  parts = ([], [], [])  # train, val, test units
  for c in (0, 1):
    idx = rng.permutation(units[unit_label == c])
    n = len(idx)
    k_test = 0 if n < 2 else min(n - 1, max(1, int(round(test_fraction * n))))
    left = n - k_test
    k_val = 0 if val_fraction == 0 or left < 2 else min(left - 1, max(1, int(round(
        val_fraction * n))))
    parts[2].append(idx[:k_test])
    parts[1].append(idx[k_test:k_test + k_val])
    parts[0].append(idx[k_test + k_val:])
  out = []
  for chosen in parts:
    chosen = np.concatenate(chosen)
    out.append(np.sort(chosen if patients is None else indices[np.isin(unit_of, chosen)]))
  return tuple(out)


# ----------------------------------------------------------------------------- model
def objective(method: str) -> str:
  """What a method trains: 'hsl' (MMoE on primary + SAT), 'no_sat' (one-task MMoE) or
  'single' (the single-task baseline); methods with one objective share compiled programs."""
  return method if method in ("hsl", "no_sat") else "single"


def build_model(config, method: str, key):
  m = config.model
  encoder_kwargs = dict(resnet_width=m.resnet_width, resnet_blocks=tuple(m.resnet_blocks),
                        resnet_norm=m.resnet_norm, resnet_stem=m.resnet_stem,
                        vit_width=m.vit_width, vit_depth=m.vit_depth, vit_heads=m.vit_heads,
                        vit_patch=m.vit_patch)
  rngs = nnx.Rngs(key)
  if objective(method) != "single":
    return mmoe.MMoE(num_tasks=2 if method == "hsl" else 1, encoder=m.encoder, image_size=config.data.image_size,
                     feature_dim=m.feature_dim, num_experts=m.num_experts,
                     expert_hidden=m.expert_hidden, expert_dim=m.expert_dim,
                     tower_hidden=m.tower_hidden, temperature=m.temperature,
                     expert_dropout=m.expert_dropout, tower_dropout=m.tower_dropout,
                     encoder_kwargs=encoder_kwargs, rngs=rngs)
  return mmoe.Classifier(encoder=m.encoder, image_size=config.data.image_size,
                         encoder_kwargs=encoder_kwargs, rngs=rngs)


def make_strategy(config, method: str):
  s = config.strategy
  name = METHODS[method]
  options = {"fedprox": dict(mu=s.fedprox_mu), "personalized": dict(alpha=s.personalized_alpha),
             "fedadam": dict(server_lr=s.server_lr), "fedyogi": dict(server_lr=s.server_lr),
             "fedadagrad": dict(server_lr=s.server_lr),
             # Option II's control update divides by the local step size: Adam's is ~lr.
             "scaffold": dict(local_lr=config.train.lr),
             "splitavg": dict(cut_grad=s.splitavg_cut_grad)}.get(name, {})
  return strategies.make_strategy(name, **options)


def epoch_lr(train_config, epoch):
  """The learning rate of local epoch `epoch` (0-based, counted over all rounds; int or
  array) under train.lr_schedule, with eta_max = lr, eta_min = min_lr, period P epochs:
  cosine_restarts: eta_min + (eta_max - eta_min) (1 + cos(pi (epoch mod P) / P)) / 2
  cosine:          the same without the mod (torch's CosineAnnealingLR(T_max=P) past T_max)
  constant:        eta_max."""
  t = train_config
  if t.lr_schedule == "constant":
    return jnp.full(jnp.shape(epoch), t.lr, jnp.float32)
  period = t.cosine_period_epochs
  phase = jnp.mod(epoch, period) if t.lr_schedule == "cosine_restarts" else epoch
  cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.asarray(phase, jnp.float32) / period))
  return (t.min_lr + (t.lr - t.min_lr) * cosine).astype(jnp.float32)


class EpochScheduleState(NamedTuple):
  """count: optimizer steps taken; steps_per_epoch: this client's steps per local epoch."""
  count: jax.Array
  steps_per_epoch: jax.Array


def scale_by_epoch_lr(schedule) -> optax.GradientTransformation:
  """updates -> -schedule(count // steps_per_epoch) * updates: a learning rate stepped once per
  epoch, as a torch scheduler stepped per epoch. Nodes differ in steps per epoch, so the value
  lives in the state (1 after init; set it with set_steps_per_epoch)."""

  def init(params):
    del params
    return EpochScheduleState(jnp.zeros([], jnp.int32), jnp.ones([], jnp.int32))

  def update(updates, state, params=None):
    del params
    lr = schedule(state.count // state.steps_per_epoch)
    updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
    return updates, state._replace(count=state.count + 1)

  return optax.GradientTransformation(init, update)


def set_steps_per_epoch(opt_state, steps_per_epoch):
  """opt_state (any optimizer state, possibly with a leading client axis) with every
  EpochScheduleState's steps_per_epoch set to `steps_per_epoch` (scalar or [C])."""
  def fill(s):
    if not isinstance(s, EpochScheduleState):
      return s
    value = jnp.broadcast_to(jnp.asarray(steps_per_epoch, jnp.int32), s.count.shape)
    return s._replace(steps_per_epoch=value)
  return jax.tree.map(fill, opt_state, is_leaf=lambda s: isinstance(s, EpochScheduleState))


def make_optimizer(config) -> optax.GradientTransformation:
  """Adam with weight decay and train.lr_schedule. 'adam': torch's Adam (the paper), the decay
  an L2 term added to the gradient before the moments; 'adamw': decoupled decay (the official
  code's AdamW; with a constant rate exactly optax.adamw)."""
  t = config.train
  decay = optax.add_decayed_weights(t.weight_decay)
  lr = (optax.scale_by_learning_rate(t.lr) if t.lr_schedule == "constant"
        else scale_by_epoch_lr(functools.partial(epoch_lr, t)))
  if t.optimizer == "adamw":
    return optax.chain(optax.scale_by_adam(), decay, lr)
  return optax.chain(decay, optax.scale_by_adam(), lr)


def preprocess(images, key, hflip: bool):
  """uint8 [B, S, S] grey -> normalised float [B, S, S, 3], randomly mirrored when key given."""
  x = (images.astype(jnp.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD
  if key is not None and hflip:
    flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1))
    x = jnp.where(flip, x[:, :, ::-1], x)
  return jnp.repeat(x[..., None], 3, axis=-1)


def make_loss_fn(graphdef, config, method: str):
  """loss_fn(params, model_state, batch, key) -> (loss, (model_state, aux)) for fed/local.py.

  batch: image uint8 [B, S, S], label [B]; HSL adds sat_image [B, S, S] and sat_label [B].
  """
  hflip, sat_weight = config.train.hflip, config.model.sat_weight
  kind = objective(method)

  def loss_fn(params, model_state, batch, key):
    model = nnx.merge(graphdef, params, model_state)
    k_img, k_sat, k_drop = jax.random.split(key, 3)
    x = preprocess(batch["image"], k_img, hflip)
    if kind == "hsl":
      logits = model([x, preprocess(batch["sat_image"], k_sat, hflip)], train=True, key=k_drop)
      primary = optax.sigmoid_binary_cross_entropy(logits[:, 0], batch["label"]).mean()
      sat = optax.sigmoid_binary_cross_entropy(logits[:, 1], batch["sat_label"]).mean()
      loss, aux = primary + sat_weight * sat, dict(primary=primary, sat=sat)
    else:
      logits = model([x], train=True, key=k_drop) if kind == "no_sat" else model(x, train=True)
      loss = optax.sigmoid_binary_cross_entropy(logits[:, 0], batch["label"]).mean()
      aux = dict(primary=loss)
    return loss, (nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), aux)

  return loss_fn


def make_predict_fn(graphdef, method: str):
  """predict(params, model_state, images uint8 [B, S, S], sat uint8 [B, S, S]) -> p [B]."""

  kind = objective(method)

  def predict(params, model_state, images, sat_images):
    model = nnx.merge(graphdef, params, model_state)
    x = preprocess(images, None, False)
    if kind == "hsl":
      logits = model([x, preprocess(sat_images, None, False)])
    else:
      logits = model([x]) if kind == "no_sat" else model(x)
    return jax.nn.sigmoid(logits[:, 0])

  return jax.jit(predict)


# ----------------------------------------------------------------------------- training
def round_batches(rng, pool: Pool, sat: Pool, train_sets, epochs: int, batch: int, hsl: bool,
                  equal_steps: bool = False):
  """Host batches of one round: every client's `epochs` shuffled passes, the last batch of
  an epoch filled from the epoch's start. -> (batch pytree [C, S, B, ...], num_steps [C]).

  equal_steps: every client makes as many steps as the largest one, cycling its data (split
  learning needs a batch from every client at every step, as SplitAVG's code cycles loaders).
  """
  steps = np.array([epochs * math.ceil(len(t) / batch) for t in train_sets])
  if equal_steps:
    steps[:] = steps.max()
  size = pool.images.shape[1]
  out = dict(image=np.zeros((len(train_sets), steps.max(), batch, size, size), np.uint8),
             label=np.zeros((len(train_sets), steps.max(), batch), np.float32))
  if hsl:
    out.update(sat_image=np.zeros_like(out["image"]), sat_label=np.zeros_like(out["label"]))
  for c, train in enumerate(train_sets):
    per_epoch = steps[c] // epochs
    order = np.concatenate([np.resize(rng.permutation(train), per_epoch * batch)
                            for _ in range(epochs)]).reshape(steps[c], batch)
    out["image"][c, :steps[c]] = pool.images[order]
    out["label"][c, :steps[c]] = pool.labels[order]
    if hsl:
      # Each local batch is paired with a batch of the SAT, drawn by the same rule.
      sat_order = np.resize(np.concatenate(
          [rng.permutation(len(sat.labels)) for _ in range(
              math.ceil(steps[c] * batch / len(sat.labels)))]), (steps[c], batch))
      out["sat_image"][c, :steps[c]] = sat.images[sat_order]
      out["sat_label"][c, :steps[c]] = sat.labels[sat_order]
  return out, steps


@dataclasses.dataclass
class Split:
  """One repeat's nodes: names, and train / val / test indices into the pool per node."""
  names: list
  train: list
  val: list
  test: list


def make_split(config, pool: Pool, repeat: int) -> Split:
  seed = config.seed * 1000 + repeat
  d = config.data
  parts = make_partition(config, pool, seed)
  train, val, test = zip(*[split_node(pool.labels, idx, d.val_fraction, d.test_fraction,
                                      seed + k, pool.patients)
                           for k, idx in enumerate(parts.indices)])
  return Split(list(parts.names), list(train), list(val), list(test))


class EarlyStopping:
  """Best validation AUC per slot (node, or the one central model) over rounds.

  update(aucs [K], r) records round r's AUCs (nan = undefined, never an improvement) and
  returns which slots improved; should_stop(r) is true once no slot has improved for
  patience_epochs epochs (rounds x local_epochs), never when patience_epochs = 0.
  best_round [K]: the round of each slot's best AUC, -1 if it never had one.
  """

  def __init__(self, num_slots: int, local_epochs: int, patience_epochs: int):
    self.best = np.full(num_slots, -np.inf)
    self.best_round = np.full(num_slots, -1)
    self.local_epochs, self.patience_epochs = local_epochs, patience_epochs

  def update(self, aucs, r: int) -> np.ndarray:
    aucs = np.asarray(aucs, np.float64)
    improved = np.isfinite(aucs) & (aucs > self.best)
    self.best[improved] = aucs[improved]
    self.best_round[improved] = r
    return improved

  def should_stop(self, r: int) -> bool:
    waited = (r - self.best_round) * self.local_epochs
    return self.patience_epochs > 0 and bool(np.all(waited >= self.patience_epochs))


def _where(mask, a, b):
  """Per slot: a where mask [K] else b (pytrees with a leading slot axis K)."""
  mask = jnp.asarray(mask)
  return jax.tree.map(lambda x, y: jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x, y),
                      a, b)


def _slot(tree, k: int):
  return jax.tree.map(lambda x: x[k], tree)


def _auc(labels, probs) -> float:
  return metrics.auroc(labels, probs) if 0 < np.sum(labels) < len(labels) else math.nan


def fit(config, label: str, do_round, models, predict, pool: Pool, sat_test: Pool, val_sets):
  """Up to train.rounds rounds of do_round(r) -> per-node losses [C]. With patience_epochs > 0,
  after each round validates models() = (params, model_state) [K, ...] on val_sets (one index
  array per slot), keeps each slot's best model and stops early (EarlyStopping).

  Returns (chosen (params, model_state) [K, ...]: each slot's best-validation model, or the
  last round's where validation is off or never defined; history dict of losses [R, C],
  val_auc [R, K] (R = rounds run; [0, K] without validation) and best_round [K])."""
  t = config.train
  stopper = EarlyStopping(len(val_sets), t.local_epochs, t.patience_epochs)
  best, losses, val_aucs = None, [], []
  progress = periodic_actions.ReportProgress(num_train_steps=t.rounds, every_steps=1)  # ETA
  for r in range(t.rounds):
    losses.append(np.asarray(do_round(r)))
    logging.info("%s round %d/%d  loss per node %s", label, r + 1, t.rounds,
                 np.array2string(losses[-1], precision=3))
    progress(r + 1)
    if not t.patience_epochs:
      continue
    current = models()
    out = evaluate(config, predict, functools.partial(_slot, current), pool, sat_test, val_sets)
    aucs = [_auc(out[f"labels_{k}"], out[f"probs_{k}"]) for k in range(len(val_sets))]
    improved = stopper.update(aucs, r)
    best = current if best is None else _where(improved, current, best)
    val_aucs.append(aucs)
    logging.info("%s round %d  validation AUC %s", label, r + 1, np.round(aucs, 3).tolist())
    if stopper.should_stop(r):
      logging.info("%s: no validation AUC improved for %d epochs; stopped after round %d",
                   label, t.patience_epochs, r + 1)
      break
  chosen = models()
  if best is not None:
    chosen = _where(stopper.best_round >= 0, best, chosen)
  history = dict(losses=np.stack(losses), best_round=stopper.best_round,
                 val_auc=np.asarray(val_aucs, np.float64).reshape(-1, len(val_sets)))
  return chosen, history


def train_and_evaluate(config, method: str, pool: Pool, sat_train: Pool, sat_test: Pool,
                       split: Split, repeat: int, programs: dict) -> dict:
  """Trains `method` on this repeat's nodes; returns per-node test labels and probabilities
  (probs_k, labels_k) with the training history (fit)."""
  t = config.train
  key = jax.random.fold_in(jax.random.key(config.seed), repeat)
  init_key, train_key = jax.random.split(key)
  model = build_model(config, method, init_key)
  graphdef, params, model_state = nnx.split(model, nnx.Param, nnx.BatchStat)
  params, model_state = nnx.to_pure_dict(params), nnx.to_pure_dict(model_state)
  if repeat == 0:
    parameter_overview.log_parameter_overview(params, include_stats=False,
                                              msg=f"{method} model parameters")
  strategy = make_strategy(config, method)
  tx = make_optimizer(config)
  if method == "splitavg":
    return _train_and_evaluate_split(config, graphdef, params, model_state, strategy, tx, pool,
                                     sat_test, split, repeat, train_key, programs)
  central = method == "central"
  train_sets = [np.concatenate(split.train)] if central else split.train
  num_clients = len(train_sets)
  state = local.init_state(strategy, tx, params, num_clients, model_state)
  state = state._replace(opt_state=set_steps_per_epoch(
      state.opt_state, [math.ceil(len(s) / t.batch_size) for s in train_sets]))
  weights = strategy.client_weights([len(s) for s in train_sets])
  local_train, aggregate, predict = _programs(programs, config, method, graphdef, tx, strategy,
                                              num_clients)
  rng = np.random.default_rng([config.seed, repeat, 1])

  def do_round(r):
    nonlocal state
    batches, steps = round_batches(rng, pool, sat_train, train_sets, t.local_epochs,
                                   t.batch_size, method == "hsl")
    state, round_metrics = _round(state, strategy, local_train, aggregate, batches, steps,
                                  weights, jax.random.fold_in(train_key, r))
    return round_metrics["loss"]

  val_sets = [np.concatenate(split.val)] if central else split.val
  chosen, history = fit(config, f"repeat {repeat} {method:<14}", do_round,
                        lambda: (state.params, state.model_state), predict, pool, sat_test,
                        val_sets)
  node_model = lambda k: jax.tree.map(lambda x: x[0 if central else k], chosen)
  return dict(**history, **evaluate(config, predict, node_model, pool, sat_test, split.test))


def evaluate(config, predict, node_model, pool: Pool, sat_test: Pool, index_sets) -> dict:
  """probs_k / labels_k of index_sets[k] (e.g. node k's test set) under node_model(k) =
  (params, model_state)."""
  batch = config.train.eval_batch_size
  out = {}
  for k, test in enumerate(index_sets):
    params_k, stats_k = node_model(k)
    probs = []
    for start in range(0, len(test), batch):
      idx = test[start:start + batch]
      images = np.pad(pool.images[idx], ((0, batch - len(idx)), (0, 0), (0, 0)))
      # The SAT branch sees SAT test images in a fixed cycle (module docstring); other
      # models ignore the argument.
      sat_images = images if sat_test is None else sat_test.images[
          np.arange(start, start + batch) % len(sat_test.labels)]
      probs.append(np.asarray(predict(params_k, stats_k, images, sat_images))[:len(idx)])
    out[f"probs_{k}"] = np.concatenate(probs) if probs else np.zeros(0, np.float32)
    out[f"labels_{k}"] = pool.labels[test]
  return out


def _split_tree(tree: dict, cut: int) -> tuple[dict, dict]:
  """A single-task ResNet tree -> (client part: stem + layer1..layer{cut-1}, server part)."""
  client_keys = {"conv1", "bn1", *(f"layer{i}" for i in range(1, cut))}
  enc = tree.get("encoder", {})
  client = {"encoder": {k: v for k, v in enc.items() if k in client_keys}}
  server = {k: v for k, v in tree.items() if k != "encoder"}
  server["encoder"] = {k: v for k, v in enc.items() if k not in client_keys}
  return client, server


def _join_tree(client: dict, server: dict) -> dict:
  return {**server, "encoder": {**client["encoder"], **server["encoder"]}}


def _train_and_evaluate_split(config, graphdef, params, model_state, strategy, tx, pool,
                              sat_test, split, repeat, train_key, programs) -> dict:
  """SplitAVG: each node's client sub-network, one shared server sub-network, trained with
  fed/local.py's split-learning round; node k is evaluated with its client part + the server."""
  t, cut = config.train, config.strategy.splitavg_cut
  (client_p, server_p), (client_s, server_s) = (_split_tree(params, cut),
                                                _split_tree(model_state, cut))
  num_clients = len(split.train)
  state = local.init_split_state(tx, tx, client_p, server_p, num_clients, client_s, server_s)
  # Every client makes as many steps as the largest one (round_batches' equal_steps).
  per_epoch = max(math.ceil(len(s) / t.batch_size) for s in split.train)
  state = state._replace(client_opt_state=set_steps_per_epoch(state.client_opt_state, per_epoch),
                         server_opt_state=set_steps_per_epoch(state.server_opt_state, per_epoch))
  if ("splitavg", num_clients) not in programs:
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    hflip = t.hflip

    def client_fn(p, ms, batch, key):
      # The server's leaves are placeholders: merging needs the whole model's state.
      model = nnx.merge(graphdef, _join_tree(p, zeros(server_p)), _join_tree(ms, zeros(server_s)))
      feats = model.encoder.stages(preprocess(batch["image"], key, hflip), train=True, stop=cut)
      return feats, _split_tree(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), cut)[0]

    def server_loss_fn(p, ms, feats, batch, key):
      del key
      model = nnx.merge(graphdef, _join_tree(zeros(client_p), p), _join_tree(zeros(client_s), ms))
      h = model.encoder.stages(feats, train=True, start=cut).mean(axis=(1, 2))
      loss = optax.sigmoid_binary_cross_entropy(model.fc(h)[:, 0], batch["label"]).mean()
      return loss, (_split_tree(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), cut)[1], {})

    programs[("splitavg", num_clients)] = jax.jit(local.make_splitavg_round(
        client_fn, server_loss_fn, tx, tx, strategy.cut_grad))
  if ("predict", "single") not in programs:
    programs[("predict", "single")] = make_predict_fn(graphdef, "splitavg")
  round_fn, predict = programs[("splitavg", num_clients)], programs[("predict", "single")]
  rng = np.random.default_rng([config.seed, repeat, 1])

  def do_round(r):
    nonlocal state
    batches, _ = round_batches(rng, pool, None, split.train, t.local_epochs, t.batch_size,
                               False, equal_steps=True)
    state, round_metrics = round_fn(state, batches, jax.random.fold_in(train_key, r))
    return np.full(num_clients, float(np.mean(round_metrics["loss"])))

  def node_models():
    """Each node's client part joined with the shared server part, stacked [C, ...]."""
    server = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape),
                                       tree)
    return (_join_tree(state.client_params, server(state.server_params)),
            _join_tree(state.client_model_state, server(state.server_model_state)))

  chosen, history = fit(config, f"repeat {repeat} splitavg      ", do_round, node_models,
                        predict, pool, None, split.val)
  node_model = lambda k: jax.tree.map(lambda x: x[k], chosen)
  return dict(**history, **evaluate(config, predict, node_model, pool, None, split.test))


@dataclasses.dataclass(frozen=True)
class _AnyLocalTransform:
  """FedProx's and SCAFFOLD's local gradient transforms with runtime coefficients:
  g + mu * (w - w_start) + drift, with ctx = dict(mu=scalar, drift=tree). mu = 0 and drift = 0
  is plain local training; (mu, 0) is FedProx; (0, c - c_i) is SCAFFOLD (fed/strategies.py).
  One compiled local-training program then serves every single-task strategy."""

  def local_grad_transform(self, grads, params, start_params, ctx):
    return jax.tree.map(lambda g, w, w0, d: g + (ctx["mu"] * (w - w0) + d).astype(g.dtype),
                        grads, params, start_params, ctx["drift"])


def local_context(strategy, strategy_state, client_params) -> dict:
  """The [C, ...] ctx of _AnyLocalTransform that reproduces `strategy`'s local transform."""
  num_clients = jax.tree.leaves(client_params)[0].shape[0]
  mu = getattr(strategy, "mu", 0.0) if isinstance(strategy, strategies.FedProx) else 0.0
  drift = strategy.local_context(strategy_state)
  if drift is None:
    drift = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), client_params)
  return dict(mu=jnp.full((num_clients,), mu, jnp.float32), drift=drift)


def _programs(cache: dict, config, method: str, graphdef, tx, strategy, num_clients: int):
  """Jitted (local_train, aggregate, predict) for a method, shared where the computation is.

  Compiling local training dominates a small study's time; with _AnyLocalTransform it
  depends only on the objective (HSL, No-SAT or single-task) and the client count, so a study
  compiles it four times (HSL, No-SAT, the single-task federated methods, central).
  Aggregation is a separate, cheap program per method.
  """
  kind = objective(method)
  if (kind, num_clients) not in cache:
    cache[(kind, num_clients)] = jax.jit(local.make_local_train(
        make_loss_fn(graphdef, config, method), tx, _AnyLocalTransform()))
  if ("aggregate", method, num_clients) not in cache:
    def aggregate(params, start, model_state, weights, strategy_state, num_steps):
      params, strategy_state = strategy.aggregate(params, start, weights, strategy_state,
                                                  num_steps)
      return params, strategy.aggregate_state(model_state, weights), strategy_state
    cache[("aggregate", method, num_clients)] = jax.jit(aggregate)
  if ("predict", kind) not in cache:
    cache[("predict", kind)] = make_predict_fn(graphdef, method)
  return (cache[(kind, num_clients)], cache[("aggregate", method, num_clients)],
          cache[("predict", kind)])


def _round(state: local.FedState, strategy, local_train, aggregate, batches, num_steps, weights,
           key):
  """fed/local.py's make_round in two compiled halves: local epochs, then aggregation."""
  num_steps = jnp.asarray(num_steps, jnp.int32)
  weights = jnp.asarray(weights, jnp.float32)
  params, model_state, opt_state, round_metrics = local_train(
      state.params, state.model_state, state.opt_state,
      local_context(strategy, state.strategy_state, state.params), batches, num_steps, key)
  params, model_state, strategy_state = aggregate(params, state.params, model_state, weights,
                                                  state.strategy_state, num_steps)
  return local.FedState(params, model_state, opt_state, strategy_state), round_metrics


def _save_atomic(path: pathlib.Path, arrays: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.stem + ".tmp.npz")
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- report
def node_metrics(labels, probs) -> dict:
  """AUC and, at the paper's fixed 0.5 threshold, accuracy, recall and precision."""
  labels = np.asarray(labels, np.int64)
  if labels.size == 0:
    return {m: math.nan for m in METRICS}
  preds = (np.asarray(probs) >= 0.5).astype(np.int64)
  auc = metrics.auroc(labels, probs) if 0 < labels.sum() < labels.size else math.nan
  return dict(auc=auc, accuracy=metrics.accuracy(labels, preds),
              recall=metrics.recall(labels, preds, average="binary"),
              precision=metrics.precision(labels, preds, average="binary"))


def _metric_fn(name: str):
  def fn(labels, probs):
    return node_metrics(labels, probs)[name]
  return fn


def report(config, workdir: pathlib.Path, methods, node_names, results) -> dict:
  """Tables, fairness summary and box plots from results[method][repeat] (train_and_evaluate's
  dicts). Returns the summary written to results.json."""
  rep = config.report
  rows, per_node = [], []
  values = {}  # (method, node, metric) -> [repeats]
  for method in methods:
    for r, out in enumerate(results[method]):
      for k, node in enumerate(node_names):
        m = node_metrics(out[f"labels_{k}"], out[f"probs_{k}"])
        rows.append(dict(method=method, repeat=r, node=node, n_test=len(out[f"labels_{k}"]),
                         positives=int(out[f"labels_{k}"].sum()), **m))
        for name, v in m.items():
          values.setdefault((method, node, name), []).append(v)
  for method in methods:
    for k, node in enumerate(node_names):
      labels = np.concatenate([out[f"labels_{k}"] for out in results[method]])
      probs = np.concatenate([out[f"probs_{k}"] for out in results[method]])
      for name in METRICS:
        v = np.asarray(values[(method, node, name)], np.float64)
        finite = v[np.isfinite(v)]
        mean, lo, hi = (metrics.mean_ci(finite, rep.alpha, bounds=metrics.metric_range(name))
                        if finite.size else (math.nan,) * 3)
        if labels.size and (name != "auc" or 0 < labels.sum() < labels.size):
          est, blo, bhi = metrics.bootstrap_ci(_metric_fn(name), labels, probs,
                                               num_samples=rep.bootstrap_samples,
                                               alpha=rep.alpha, seed=config.seed)
        else:
          est, blo, bhi = (math.nan,) * 3
        # Every baseline against HSL on the same test cases (HSL paper: paired bootstrap).
        versus = {} if method == "hsl" or "hsl" not in results else significance.versus_reference(
            _metric_fn(name), values[(method, node, name)], values[("hsl", node, name)], labels,
            probs, np.concatenate([out[f"probs_{k}"] for out in results["hsl"]]),
            num_samples=rep.bootstrap_samples, alpha=rep.alpha, seed=config.seed)
        per_node.append(dict(method=method, node=node, metric=name, mean=mean, t_low=lo,
                             t_high=hi, pooled=est, boot_low=blo, boot_high=bhi,
                             repeats=int(finite.size),
                             **{f"{k}_vs_hsl": v for k, v in versus.items()}))
  fairness = []
  for method in methods:
    for name in ("auc", "accuracy"):
      means = np.array([np.nanmean(values[(method, n, name)]) if np.isfinite(
          values[(method, n, name)]).any() else np.nan for n in node_names])
      row = dict(method=method, metric=name, node_mean=float(np.nanmean(means)),
                 worst=float(np.nanmin(means)), worst_node=node_names[int(np.nanargmin(means))],
                 spread=float(np.nanmax(means) - np.nanmin(means)),
                 std=float(np.nanstd(means)))
      if "local" in methods:
        local_means = np.array([np.nanmean(values[("local", n, name)]) if np.isfinite(
            values[("local", n, name)]).any() else np.nan for n in node_names])
        gains = means - local_means
        row.update({f"gain_{n}": float(g) for n, g in zip(node_names, gains)})
        row["nodes_worse_than_local"] = int(np.sum(gains < 0))
      fairness.append(row)
  _write_csv(workdir / "runs.csv", rows)
  _write_csv(workdir / "per_node.csv", per_node)
  _write_csv(workdir / "fairness.csv", fairness)
  protocol = dict(name=config.protocol, **{k: config.data[k] for k in (
      "val_fraction", "test_fraction", "patient_column")}, **{k: config.train[k] for k in (
          "rounds", "local_epochs", "optimizer", "lr", "weight_decay", "lr_schedule",
          "cosine_period_epochs", "min_lr", "patience_epochs")})
  summary = dict(scenario=config.scenario, methods=list(methods), nodes=list(node_names),
                 repeats=config.repeats, protocol=protocol, per_node=per_node,
                 fairness=fairness, runs=rows)
  (workdir / "results.json").write_text(json.dumps(summary, indent=1, default=float))
  for name in ("auc", "accuracy"):
    boxplots.per_node_boxplots(
        workdir / f"boxplots_{name}.png",
        {m: [values[(m, n, name)] for n in node_names] for m in methods}, node_names,
        metric=name.upper() if name == "auc" else name,
        title=f"{config.scenario} skew: {name} over {config.repeats} repeats")
  return summary


def _write_csv(path: pathlib.Path, rows: list[dict]) -> None:
  import csv
  columns = list(dict.fromkeys(k for row in rows for k in row))
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})


# ----------------------------------------------------------------------------- sweep
def sweep_ratios(config) -> tuple:
  """The ratios of config.sweep: config.sweep_ratios, or the paper's 10 steps."""
  return tuple(float(r) for r in config.sweep_ratios) or tuple(
      float(r) for r in SWEEP_RATIOS[config.sweep])


def sweep_rows(summaries: dict, metric: str = "auc") -> list[dict]:
  """{ratio: run_study summary} -> one row per (ratio, method, node position) of `metric`
  (node1 / node2: node names carry the ratio, positions do not)."""
  rows = []
  for ratio, summary in summaries.items():
    for row in summary["per_node"]:
      if row["metric"] == metric:
        position = summary["nodes"].index(row["node"]) + 1
        rows.append(dict(ratio=float(ratio), method=row["method"], node=f"node{position}",
                         node_name=row["node"], **{k: row[k] for k in (
                             "mean", "t_low", "t_high", "pooled", "boot_low", "boot_high",
                             "repeats")}))
  return rows


def plot_sweep(path, rows: list[dict], *, metric: str = "AUC", title: str = "") -> pathlib.Path:
  """Fig. 2 B2 / C2: per node a panel of the metric's mean over repeats (t-interval bars)
  against the ratio, one line per method."""
  import matplotlib.pyplot as plt  # the Agg backend is set by ultrajax.viz.boxplots

  nodes = list(dict.fromkeys(r["node"] for r in rows))
  methods = list(dict.fromkeys(r["method"] for r in rows))
  ratios = sorted({r["ratio"] for r in rows})
  fig, axes = plt.subplots(1, len(nodes), figsize=(5 * len(nodes), 3.6), squeeze=False,
                           sharey=True)
  for ax, node in zip(axes[0], nodes):
    for method in methods:
      pts = sorted((r["ratio"], r["mean"], r["t_low"], r["t_high"]) for r in rows
                   if r["node"] == node and r["method"] == method)
      x, y, lo, hi = (np.asarray(v, np.float64) for v in zip(*pts))
      ax.errorbar(x, y, yerr=np.nan_to_num(np.stack([y - lo, hi - y])), marker="o", ms=3,
                  capsize=2, label=method)
    ax.set_xscale("log")
    ax.set_xticks(ratios, [f"{r:g}:1" for r in ratios], rotation=60, fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("ratio")
    ax.set_title(node, fontsize=9)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel(metric)
  axes[0][-1].legend(fontsize=7, loc="best")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return pathlib.Path(path)


def run_sweep(config, workdir) -> dict:
  """One study per ratio of config.sweep in workdir/ratio_<r>/ (each resumable as a single
  study), then sweep.csv, sweep.json and sweep_auc.png in workdir."""
  workdir = pathlib.Path(workdir)
  programs: dict = {}  # compiled once for all ratios
  summaries = {}
  for ratio in sweep_ratios(config):
    study = copy.deepcopy(config)
    study.sweep, study.data.ratio = "", ratio
    logging.info("%s sweep: ratio %g:1", config.sweep, ratio)
    summaries[ratio] = run_study(study, workdir / f"ratio_{ratio:g}", programs)
  rows = sweep_rows(summaries)
  _write_csv(workdir / "sweep.csv", rows)
  what = "node 2 normal:abnormal" if config.sweep == "label" else "n1:n2"
  plot_sweep(workdir / "sweep_auc.png", rows,
             title=f"{config.sweep} skew sweep ({what}), AUC over {config.repeats} repeats")
  summary = dict(sweep=config.sweep, ratios=list(summaries), rows=rows)
  (workdir / "sweep.json").write_text(json.dumps(summary, indent=1, default=float))
  return summary


# ----------------------------------------------------------------------------- run
def run(config, workdir) -> dict:
  """One study (run_study) or, with config.sweep, one per ratio (run_sweep). One process per
  workdir: a second one stops at the workdir lock (train/resume.py)."""
  validate(config)
  with resume.WorkdirLock(workdir):
    return run_sweep(config, workdir) if config.sweep else run_study(config, workdir)


def run_study(config, workdir, programs: dict | None = None) -> dict:
  """Runs every (method, repeat) not yet in workdir/runs, then writes the report. programs:
  a cache of compiled programs to share between studies (a sweep)."""
  methods = validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  pool, sat = load_data(config)
  sat_train, _, sat_test = (sat.take(i) for i in split_node(
      sat.labels, np.arange(len(sat.labels)), 0.0, config.data.test_fraction, config.seed))
  logging.info("Data: %d primary-task images (%.0f%% positive), SAT %d train / %d test, "
               "%.1f s", len(pool.labels), 100 * pool.labels.mean(), len(sat_train.labels),
               len(sat_test.labels), time.perf_counter() - t0)
  results = {m: [] for m in methods}
  programs = {} if programs is None else programs
  node_names = None
  for repeat in range(config.repeats):
    split = make_split(config, pool, repeat)
    node_names = split.names
    if repeat == 0:
      counts = np.array([[np.sum(pool.labels[np.concatenate(sets)] == c) for c in (0, 1)]
                         for sets in zip(split.train, split.val, split.test)])
      for name, (n0, n1), tr, va, te in zip(split.names, counts, split.train, split.val,
                                            split.test):
        logging.info("node %-22s %5d negative %5d positive  %5d train %4d val %5d test", name,
                     n0, n1, len(tr), len(va), len(te))
      partition_plot.plot_partition(counts, split.names, ("negative", "positive"),
                                    workdir / "partition.png",
                                    title=f"{config.scenario} skew (repeat 0)")
    for method in methods:
      path = workdir / "runs" / method / f"repeat_{repeat}.npz"
      if not path.exists():
        t1 = time.perf_counter()
        out = train_and_evaluate(config, method, pool, sat_train, sat_test, split, repeat,
                                 programs)
        _save_atomic(path, out)
        logging.info("repeat %d %-14s done in %.1f s: AUC per node %s", repeat, method,
                     time.perf_counter() - t1, [round(node_metrics(
                         out[f"labels_{k}"], out[f"probs_{k}"])["auc"], 3)
                         for k in range(len(split.names))])
      with np.load(path) as f:
        results[method].append(dict(f))
  summary = report(config, workdir, methods, node_names, results)
  for row in summary["fairness"]:
    if row["metric"] == "auc":
      logging.info("%-14s AUC node mean %.3f  worst %.3f (%s)  spread %.3f", row["method"],
                   row["node_mean"], row["worst"], row["worst_node"], row["spread"])
  logging.info("Study done in %.1f s; tables and plots in %s", time.perf_counter() - t0,
               workdir)
  return summary
