"""HeteroSync Learning (HSL) and federated baselines on heterogeneous nodes: a whole study.

The script, in order:
  1. check the config; load the primary-task pool (phantom organs, or folder / CSV nodes) and
     the shared anchor task (SAT: one dataset, 1:1 labels, identical at every node)
     (ultrajax/data/nodes.py);
  2. for each repeat r (the paper's five): partition the pool into nodes with the scenario's
     partitioner (ultrajax/data/partition.py) seeded by (seed, r), split every node into
     train / val / test (the paper: 60/10/30), stratified by label, by patient where the data
     name one;
  3. for each method: initialise from key(seed, r) and train up to `fed.num_rounds` rounds of
     `fed.local_epochs` local epochs per node on the federated engine (ultrajax/fed/rounds.py,
     one lane per node; the method's strategy does the rest); after every round validate each
     node's model on its validation set, keep each node's best-validation-AUC model and stop
     once no node has improved for `patience_epochs` epochs; evaluate each node's best model on
     its test set and write the predictions atomically to runs/<method>/repeat_<r>.npz;
  4. report: per-node AUC / accuracy / recall / precision with a t-interval over repeats and a
     bootstrap CI over the pooled predictions of all repeats (the paper's statistic), the
     fairness summary (worst node, spread, gain over local-only training) and box plots
     (ultrajax/eval/node_tables.py, ultrajax/viz/).
A sweep (config.sweep = 'label' | 'quantity') runs steps 1-4 once per ratio of Fig. 2 and adds
a table and a plot of AUC against the ratio per method and node.

Protocols: configs/hsl.py PROTOCOLS ('paper' as above; 'legacy' as in the first published tables).

Methods. 'hsl' trains models/mmoe.py on (primary, SAT) batch pairs with BCE on both towers and
averages ALL parameters and BatchNorm statistics unweighted after each round (the paper's
equation 1; strategy 'fedavg_uniform'). The paper's ablations (Methods, Fig. 1C / 3A) keep that
fusion: 'no_sat' removes the SAT data but keeps the auxiliary learning architecture (the MMoE
with one encoder, the experts, one gate and one tower, on the primary task alone); 'no_al'
removes the architecture, so the SAT plays no role (the single-task model below, averaged
unweighted). Every other method is a federated strategy's name (fed/strategies.py, options in
fed.strategy_options) training the single-task baseline (ResNet-18 + linear logit, BCE);
'central' pools every node's training data into one client (and validation data into one
validation set) and evaluates that one model on each node's test set; 'splitavg' runs
fed/local.py's split-learning driver.

Resume: a killed study continues at the first missing results file, a killed (method, repeat)
at its last checkpointed round, bitwise (`fit`, `run_cell`).

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
import functools
import json
import math
import pathlib
import shutil
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import parameter_overview, periodic_actions
from flax import nnx

from ultrajax import configlib
from ultrajax.configs import hsl as hsl_config
from ultrajax.data import nodes, partition, phantom
from ultrajax.eval import downstream, node_tables
from ultrajax.fed import aggregate, local, participation, rounds, strategies
from ultrajax.models import mmoe, vit
from ultrajax.train import checkpoint, loop, resume
from ultrajax.viz import boxplots, partition as partition_plot, sweep

# Methods that are not a strategy's name -> the strategy they train under (module docstring:
# any other method is a registered strategy, so a new strategy is a new method).
METHODS = {"hsl": "fedavg_uniform", "no_sat": "fedavg_uniform", "no_al": "fedavg_uniform"}
# Fig. 2 B / C: node 2's normal:abnormal ratio (node 1 stays 1:1) and the n1:n2 quantity ratio.
SWEEP_RATIOS = {
  "label": (2, 4, 6, 8, 10, 20, 40, 60, 80, 100),
  "quantity": (1, 2, 4, 6, 8, 10, 20, 40, 60, 80),
}
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("cosine_restarts", "cosine", "constant")
PIXEL_MEAN, PIXEL_STD = 0.5, 0.25


# ----------------------------------------------------------------------------- config
def strategy_name(method: str) -> str:
  return METHODS.get(method, method)


def all_methods() -> list[str]:
  return sorted({*METHODS, *strategies.STRATEGIES})


def parse_methods(config) -> list[str]:
  names = [m.strip() for m in str(config.methods).split(",") if m.strip()]
  unknown = [m for m in names if m not in all_methods()]
  configlib.check(
    not unknown, f"config.methods: unknown method(s) {unknown}; valid methods are {all_methods()}"
  )
  configlib.check(bool(names), "config.methods names no method")
  configlib.check(len(set(names)) == len(names), f"config.methods repeats a method: {names}")
  return names


def validate(config) -> list[str]:
  """Fails at start-up naming the field at fault; returns the methods to run."""
  c = configlib
  for old, (new, _) in hsl_config.RENAMED.items():
    group, name = old.split(".")
    c.check(
      config.get(group, {}).get(name) is None,
      f"config.{old} is now config.{new} (the federated block shared with pretraining)",
    )
  c.check_choice(config, "scenario", hsl_config.SCENARIOS)
  c.check_choice(config, "data.source", ("phantom", "folder", "manifest"))
  c.check_choice(config, "model.encoder", mmoe.ENCODERS)
  options = vit.compute_options(config.model, "config.model")
  c.check(
    config.model.encoder == "vit" or options == vit.COMPUTE_OPTIONS,
    f"config.model's {', '.join(f'{k}={v!r}' for k, v in options.items())} apply to the "
    f"ViT encoder only; config.model.encoder is {config.model.encoder!r}",
  )
  c.check_range(config, "repeats", 1)
  c.check_range(config, "data.image_size", 8)
  c.check_range(config, "data.test_fraction", 0.0, 1.0, low_inclusive=False, high_inclusive=False)
  c.check_range(config, "data.val_fraction", 0.0, 1.0, high_inclusive=False)
  c.check(
    config.data.val_fraction + config.data.test_fraction < 1.0,
    f"config.data.val_fraction + test_fraction = {config.data.val_fraction} + "
    f"{config.data.test_fraction} leaves no training data",
  )
  c.check_choice(config, "train.optimizer", OPTIMIZERS)
  c.check_choice(config, "train.lr_schedule", LR_SCHEDULES)
  c.check_range(config, "train.cosine_period_epochs", 1)
  c.check_range(config, "train.min_lr", 0.0, config.train.lr)
  c.check_range(config, "train.patience_epochs", 0)
  c.check(
    config.train.patience_epochs == 0 or config.data.val_fraction > 0,
    f"config.train.patience_epochs={config.train.patience_epochs} needs a validation "
    "split: set config.data.val_fraction > 0 (or patience_epochs=0)",
  )
  c.check_range(config, "data.min_class_count", 1)
  c.check_choice(config, "sweep", ("", *SWEEP_RATIOS))
  if config.sweep:
    c.check(
      config.scenario == config.sweep,
      f"config.sweep={config.sweep!r} varies the "
      f"{config.sweep} scenario's ratio; config.scenario is {config.scenario!r}",
    )
    ratios = tuple(config.sweep_ratios)
    c.check(
      all(float(r) >= 1 for r in ratios) and len(set(ratios)) == len(ratios),
      f"config.sweep_ratios={ratios} must be distinct ratios >= 1 (() = the paper's)",
    )
  c.check_range(config, "data.ratio", 1.0)
  c.check_range(config, "data.sat_per_class", 2)
  c.check_range(config, "model.temperature", 0.0, low_inclusive=False)
  for name in ("fed.num_rounds", "fed.local_epochs", "train.batch_size", "train.eval_batch_size"):
    c.check_range(config, name, 1)
  c.check_range(config, "ckpt_every_rounds", 0)
  c.check_range(config, "report.bootstrap_samples", 1)
  c.check_range(config, "fed.splitavg_cut", 1, 4)
  try:
    participation.check(config.fed.clients_per_round, config.fed.sampling, config.fed.dropout)
  except ValueError as e:
    raise configlib.ConfigError(f"config.fed.{e}") from None
  c.check(
    not config.data.patient_column or config.data.source == "manifest",
    f"config.data.patient_column={config.data.patient_column!r} is a CSV column; "
    f"data.source={config.data.source!r} has no patient ids (each image is its own)",
  )
  c.check(
    bool(config.data.positive_labels), "config.data.positive_labels must name at least one label"
  )
  d = config.data
  if d.source == "phantom":
    bad = [o for o in (*d.organs, d.single_organ, d.sat_organ) if o not in phantom.ORGANS]
    c.check(
      not bad, f"config.data.organs / single_organ / sat_organ: {bad} not in {phantom.ORGANS}"
    )
    bad = [x for x in d.positive_labels if x not in phantom.LABELS]
    c.check(not bad, f"config.data.positive_labels: {bad} not in {phantom.LABELS}")
  else:
    c.check(
      config.scenario == "natural",
      f"config.scenario={config.scenario!r}: folder and "
      "manifest data keep their own nodes, use scenario='natural'",
    )
    what = "root" if d.source == "folder" else "manifest"
    c.check(
      bool(d[what]) and bool(d[f"sat_{what}"]),
      f"config.data.{what} and config.data.sat_{what} must be set for data.source={d.source!r}",
    )
  methods = parse_methods(config)
  for method in methods:
    make_strategy(config, method)  # names the option at fault
  c.check(
    "splitavg" not in methods or config.model.encoder == "resnet18",
    "config.methods: 'splitavg' splits a ResNet between client and server; it needs "
    "config.model.encoder='resnet18'",
  )
  return methods


# ----------------------------------------------------------------------------- model
def objective(method: str) -> str:
  """What a method trains: 'hsl' (MMoE on primary + SAT), 'no_sat' (one-task MMoE) or
  'single' (the single-task baseline); methods with one objective share compiled programs."""
  return method if method in ("hsl", "no_sat") else "single"


def build_model(config, method: str, key):
  m = config.model
  common = dict(
    encoder=m.encoder,
    image_size=config.data.image_size,
    # mmoe.make_encoder's arguments: the config's resnet_* and vit_* fields, by name, and the
    # ViT's compute options (remat, scan_layers, attention_impl, as in the other jobs).
    encoder_kwargs={
      **{k: v for k, v in m.items() if k.startswith(("resnet_", "vit_"))},
      **vit.compute_options(m, "config.model"),
    },
    rngs=nnx.Rngs(key),
  )
  if objective(method) == "single":
    return mmoe.Classifier(**common)
  return mmoe.MMoE(
    num_tasks=2 if method == "hsl" else 1,
    feature_dim=m.feature_dim,
    num_experts=m.num_experts,
    expert_hidden=m.expert_hidden,
    expert_dim=m.expert_dim,
    tower_hidden=m.tower_hidden,
    temperature=m.temperature,
    expert_dropout=m.expert_dropout,
    tower_dropout=m.tower_dropout,
    **common,
  )


def strategy_options(config) -> dict:
  """config.fed.strategy_options "name: k=v, ...; name2: ..." -> {name: {k: v}}."""
  out = {}
  for group in str(config.fed.strategy_options).split(";"):
    if not group.strip():
      continue
    name, sep, options = group.partition(":")
    name = name.strip()
    configlib.check(
      bool(sep) and name in strategies.STRATEGIES,
      f"config.fed.strategy_options: {group.strip()!r} is not 'strategy: k=v, ...' "
      f"with a strategy of {sorted(strategies.STRATEGIES)}",
    )
    try:
      out[name] = strategies.parse_options(options)
    except ValueError as e:
      raise configlib.ConfigError(f"config.fed.strategy_options ({name}): {e}") from None
  return out


def make_strategy(config, method: str):
  name = strategy_name(method)
  # Option II's control update divides by the local step size: Adam's is ~lr.
  defaults = {"scaffold": dict(local_lr=config.train.lr)}.get(name, {})
  try:
    return strategies.make_strategy(name, **{**defaults, **strategy_options(config).get(name, {})})
  except ValueError as e:
    raise configlib.ConfigError(f"config.fed.strategy_options: {e}") from None


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
  lr = (
    optax.scale_by_learning_rate(t.lr)
    if t.lr_schedule == "constant"
    else scale_by_epoch_lr(functools.partial(epoch_lr, t))
  )
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


def model_inputs(kind: str, x, sat_x):
  """What objective `kind`'s model takes: HSL's MMoE [primary, SAT], no_sat's [primary]; the
  single-task model the primary batch itself."""
  return [x, sat_x] if kind == "hsl" else [x] if kind == "no_sat" else x


def make_loss_fn(graphdef, config, method: str):
  """loss_fn(params, model_state, batch, key) -> (loss, (model_state, aux)) for fed/rounds.py.

  batch: image uint8 [B, S, S], label [B]; HSL adds sat_image [B, S, S] and sat_label [B].
  """
  hflip, sat_weight = config.train.hflip, config.model.sat_weight
  kind = objective(method)

  def loss_fn(params, model_state, batch, key):
    model = nnx.merge(graphdef, params, model_state)
    k_img, k_sat, k_drop = jax.random.split(key, 3)
    x = preprocess(batch["image"], k_img, hflip)
    sat_x = preprocess(batch["sat_image"], k_sat, hflip) if kind == "hsl" else None
    logits = model(model_inputs(kind, x, sat_x), train=True, key=k_drop)
    loss = optax.sigmoid_binary_cross_entropy(logits[:, 0], batch["label"]).mean()
    aux = dict(primary=loss)
    if kind == "hsl":
      aux["sat"] = optax.sigmoid_binary_cross_entropy(logits[:, 1], batch["sat_label"]).mean()
      loss = loss + sat_weight * aux["sat"]
    return loss, (nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), aux)

  return loss_fn


def make_predict_fn(graphdef, method: str):
  """predict(params, model_state, images uint8 [B, S, S], sat uint8 [B, S, S]) -> p [B]."""

  kind = objective(method)

  def predict(params, model_state, images, sat_images):
    model = nnx.merge(graphdef, params, model_state)
    sat_x = preprocess(sat_images, None, False) if kind == "hsl" else None
    logits = model(model_inputs(kind, preprocess(images, None, False), sat_x))
    return jax.nn.sigmoid(logits[:, 0])

  return jax.jit(predict)


# ----------------------------------------------------------------------------- training
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


# Fields that do not change a (method, repeat) cell: a cell checkpoint stays valid when they
# change (e.g. a method added to the study).
CELL_INDEPENDENT = ("methods", "repeats", "report", "sweep_ratios", "ckpt_every_rounds")


def fit(
  config,
  label: str,
  state,
  do_round,
  models,
  predict,
  pool: nodes.Pool,
  sat_test: nodes.Pool,
  val_sets,
  rng: np.random.Generator,
  cell: checkpoint.Checkpointer | None = None,
  stop_reason=lambda rounds_done: None,
):
  """Up to fed.num_rounds rounds of do_round(state, r) -> (state, per-node losses [C]), fewer
  when stop_reason(rounds done) names a reason (the strategy's: a spent privacy budget). With
  patience_epochs > 0, after each round validates models(state) = (params, model_state)
  [K, ...] on val_sets (one index array per slot), keeps each slot's best model and stops
  early (EarlyStopping). `rng` is the host generator do_round draws batches from.

  With a `cell` (the (method, repeat)'s Checkpointer; None when ckpt_every_rounds = 0),
  everything the loop carries (the federated state, the best models, the early-stopping record,
  the losses and `rng`'s position) is checkpointed every ckpt_every_rounds rounds and the loop
  resumes from the newest checkpoint, bitwise.

  Returns (chosen (params, model_state) [K, ...]: each slot's best-validation model, or the
  last round's where validation is off or never defined; history dict of losses [R, C],
  val_auc [R, K] (R = rounds run; [0, K] without validation) and best_round [K])."""
  t, f = config.train, config.fed
  stopper = EarlyStopping(len(val_sets), f.local_epochs, t.patience_epochs)
  best, losses, val_aucs, start = None, [], [], 0
  if cell is not None:
    like_carry = dict(
      round=np.zeros((), np.int32), best=jax.eval_shape(models, state) if t.patience_epochs else {}
    )
    start, state, carry = loop.resume_or_init(
      cell,
      state,
      like_carry,
      lambda: (state, like_carry),
      config=config,
      snapshot=resume.snapshot(config, exclude=CELL_INDEPENDENT),
    )
    if start:
      best = carry["best"] if t.patience_epochs else None
      meta = cell.read_meta(start)
      losses = [np.asarray(x, np.float32) for x in meta["losses"]]
      val_aucs = meta["val_auc"]
      stopper.best = np.asarray(meta["best_auc"], np.float64)
      stopper.best_round = np.asarray(meta["best_round"], np.int64)
      rng.bit_generator.state = meta["rng"]
      logging.info("%s: resumed after round %d", label, start)
  progress = periodic_actions.ReportProgress(num_train_steps=f.num_rounds, every_steps=1)  # ETA
  stopped = start > 0 and stopper.should_stop(start - 1)
  for r in range(start, f.num_rounds):
    why = stop_reason(r)
    if why:
      logging.warning("%s: stopping before round %d: %s", label, r + 1, why)
      stopped = True
    if stopped:
      break
    state, round_losses = do_round(state, r)
    losses.append(np.asarray(round_losses, np.float32))
    node_losses = np.array2string(losses[-1], precision=3)
    logging.info("%s round %d/%d  loss per node %s", label, r + 1, f.num_rounds, node_losses)
    progress(r + 1)
    if t.patience_epochs:
      current = models(state)
      slot = lambda k: jax.tree.map(lambda x: x[k], current)
      out = evaluate(config, predict, slot, pool, sat_test, val_sets)
      node = lambda k: node_tables.node_metrics(out[f"labels_{k}"], out[f"probs_{k}"])
      aucs = [node(k)["auc"] for k in range(len(val_sets))]
      improved = stopper.update(aucs, r)
      best = current if best is None else rounds.select(improved, current, best)
      val_aucs.append(aucs)
      logging.info("%s round %d  validation AUC %s", label, r + 1, np.round(aucs, 3).tolist())
      stopped = stopper.should_stop(r)
      if stopped:
        logging.info(
          "%s: no validation AUC improved for %d epochs; stopped after round %d",
          label,
          t.patience_epochs,
          r + 1,
        )
    if cell is not None and (
      stopped or loop.itstime(r + 1, config.ckpt_every_rounds, f.num_rounds)
    ):
      carry = dict(round=np.asarray(r + 1, np.int32), best=best if t.patience_epochs else {})
      meta = dict(
        round=r + 1,
        config=resume.snapshot(config, exclude=CELL_INDEPENDENT),
        losses=[x.tolist() for x in losses],
        val_auc=[list(map(float, a)) for a in val_aucs],
        best_auc=stopper.best.tolist(),
        best_round=stopper.best_round.tolist(),
        rng=rng.bit_generator.state,
      )
      cell.save(r + 1, state, carry, None, meta)
  chosen = models(state)
  if best is not None:
    chosen = rounds.select(stopper.best_round >= 0, best, chosen)
  history = dict(
    losses=np.stack(losses),
    best_round=stopper.best_round,
    val_auc=np.asarray(val_aucs, np.float64).reshape(-1, len(val_sets)),
  )
  return chosen, history


class FedRun(NamedTuple):
  """What a federated (method, repeat) carries between rounds (checkpointed whole): the server
  model (strategies.Server), every node's optimizer state [C, ...] and the strategy's state."""

  server: strategies.Server
  opt_state: object
  strategy_state: object


def _programs(cache: dict, config, method: str, graphdef, tx, strategy, num_clients: int):
  """Jitted (start, chunk, finish, node models, predict) of fed/rounds.py for a method,
  compiled once per (objective, strategy) and shared by the studies of a sweep."""
  kind = objective(method)
  if ("chunk", kind, strategy) not in cache:
    cache[("chunk", kind, strategy)] = jax.jit(
      rounds.make_chunk(make_loss_fn(graphdef, config, method), tx, strategy)
    )
  if ("rounds", strategy, num_clients) not in cache:
    cache[("rounds", strategy, num_clients)] = (
      jax.jit(
        lambda server, opt, sstate: rounds.start_round(
          strategy, server, opt, sstate, num_clients, num_clients
        )
      ),
      jax.jit(functools.partial(rounds.finish_round, strategy)),
      jax.jit(lambda sstate, server: rounds.client_models(strategy, sstate, server, num_clients)),
    )
  if ("predict", kind) not in cache:
    cache[("predict", kind)] = make_predict_fn(graphdef, method)
  return (
    cache[("chunk", kind, strategy)],
    *cache[("rounds", strategy, num_clients)],
    cache[("predict", kind)],
  )


def train_and_evaluate(
  config,
  method: str,
  pool: nodes.Pool,
  sat_train: nodes.Pool,
  sat_test: nodes.Pool,
  split: nodes.Split,
  repeat: int,
  programs: dict,
  cell: checkpoint.Checkpointer | None = None,
) -> dict:
  """Trains `method` on this repeat's nodes; returns per-node test labels and probabilities
  (probs_k, labels_k) with the training history (fit). cell: per-round checkpoints.

  A round runs on fed/rounds.py with one lane per node (one chunk of the largest node's
  local steps), so the strategy's hooks do everything federated; nodes left out by
  fed.clients_per_round / dropout train no step and are not averaged."""
  t, f = config.train, config.fed
  key = jax.random.fold_in(jax.random.key(config.seed), repeat)
  init_key, train_key = jax.random.split(key)
  model = build_model(config, method, init_key)
  graphdef, params, model_state = nnx.split(model, nnx.Param, nnx.BatchStat)
  params, model_state = nnx.to_pure_dict(params), nnx.to_pure_dict(model_state)
  if repeat == 0:
    parameter_overview.log_parameter_overview(
      params, include_stats=False, msg=f"{method} model parameters"
    )
  strategy = make_strategy(config, method)
  tx = make_optimizer(config)
  rng = np.random.default_rng([config.seed, repeat, 1])
  central = method == "central"
  if method == "splitavg":
    state, do_round, models, predict = _splitavg(
      config, graphdef, params, model_state, strategy, tx, pool, split, train_key, programs, rng
    )
  else:
    train_sets = [np.concatenate(split.train)] if central else split.train
    num_clients = len(train_sets)
    num_examples = [len(s) for s in train_sets]
    # The federation's size and sampling, for strategies that account for them (DP).
    strategy = strategy.for_run(num_clients, f.clients_per_round, f.sampling)
    steps_per_epoch = [math.ceil(n / t.batch_size) for n in num_examples]
    init_opt = lambda: set_steps_per_epoch(
      jax.vmap(tx.init)(aggregate.broadcast(params, num_clients)), steps_per_epoch
    )
    state = FedRun(
      strategies.Server(params, model_state),
      init_opt(),
      strategy.init(params, num_clients, model_state),
    )
    weights = jnp.asarray(strategy.client_weights(num_examples), jnp.float32)
    chunk, start_round, finish_round, node_models, predict = _programs(
      programs, config, method, graphdef, tx, strategy, num_clients
    )

    def do_round(state: FedRun, r):
      batches, steps = nodes.round_batches(
        rng, pool, sat_train, train_sets, f.local_epochs, t.batch_size, method == "hsl"
      )
      drawn = participation.draw(
        num_examples, r, config.seed, f.clients_per_round, f.sampling, f.dropout
      )
      plan = rounds.plan_round(steps * drawn.participants, num_clients, steps.max())
      take = np.maximum(plan.client_ids, 0), plan.step_ids  # lane l, step s: its node's batch
      lane_batches = jax.tree.map(lambda x: x[take], batches)
      opt_state = init_opt() if f.reset_client_optimizer else state.opt_state
      lanes = start_round(state.server, opt_state, state.strategy_state)
      round_key = rounds.round_key(train_key, r)
      steps_dev = jnp.asarray(steps, jnp.float32)
      lanes, metrics = chunk(
        state.server, lanes, lane_batches, plan, steps_dev, weights, r, round_key
      )
      state = FedRun(*finish_round(lanes, state.server, round_key))
      report = strategy.report(state.strategy_state, r + 1)  # e.g. dp/epsilon
      if report:
        logging.info("repeat %d %s round %d  %s", repeat, method, r + 1, report)
      return state, rounds.client_losses(np.asarray(metrics["loss"]), plan.client_ids, num_clients)

    models = lambda s: node_models(s.strategy_state, s.server)
  val_sets = [np.concatenate(split.val)] if central else split.val
  chosen, history = fit(
    config,
    f"repeat {repeat} {method:<14}",
    state,
    do_round,
    models,
    predict,
    pool,
    sat_test,
    val_sets,
    rng,
    cell,
    strategy.stop_reason,
  )
  node_model = lambda k: jax.tree.map(lambda x: x[0 if central else k], chosen)
  return dict(**history, **evaluate(config, predict, node_model, pool, sat_test, split.test))


def evaluate(
  config, predict, node_model, pool: nodes.Pool, sat_test: nodes.Pool, index_sets
) -> dict:
  """probs_k / labels_k of index_sets[k] (e.g. node k's test set) under node_model(k) =
  (params, model_state)."""
  batch = config.train.eval_batch_size
  out = {}
  for k, test in enumerate(index_sets):
    params_k, stats_k = node_model(k)

    def probs(rows):  # rows [batch]: positions in `test` (downstream.padded_batches)
      images = pool.images[test[rows]]
      # The SAT branch sees SAT test images in a fixed cycle (module docstring); other
      # models ignore the argument.
      sat_images = images if sat_test is None else sat_test.images[rows % len(sat_test.labels)]
      return predict(params_k, stats_k, images, sat_images)

    out[f"probs_{k}"] = (
      downstream.padded_batches(probs, len(test), batch) if len(test) else np.zeros(0, np.float32)
    )
    out[f"labels_{k}"] = pool.labels[test]
  return out


def _splitavg(
  config, graphdef, params, model_state, strategy, tx, pool, split, train_key, programs, rng
):
  """(state, do_round, models, predict) of SplitAVG: each node's client sub-network, one shared
  server sub-network, trained with fed/local.py's split-learning round; node k is evaluated
  with its client part + the server."""
  t, f, cut = config.train, config.fed, config.fed.splitavg_cut
  split_tree, join_tree = mmoe.split_classifier_tree, mmoe.join_classifier_tree
  client_p, server_p = split_tree(params, cut)
  client_s, server_s = split_tree(model_state, cut)
  num_clients = len(split.train)
  state = local.init_split_state(tx, tx, client_p, server_p, num_clients, client_s, server_s)
  # Every client makes as many steps as the largest one (round_batches' equal_steps).
  per_epoch = max(math.ceil(len(s) / t.batch_size) for s in split.train)
  state = set_steps_per_epoch(state, per_epoch)  # the client and the server optimizer states
  if ("splitavg", num_clients) not in programs:
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    hflip = t.hflip

    def client_fn(p, ms, batch, key):
      # The server's leaves are placeholders: merging needs the whole model's state.
      model = nnx.merge(graphdef, join_tree(p, zeros(server_p)), join_tree(ms, zeros(server_s)))
      feats = model.encoder.stages(preprocess(batch["image"], key, hflip), train=True, stop=cut)
      return feats, split_tree(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), cut)[0]

    def server_loss_fn(p, ms, feats, batch, key):
      del key
      model = nnx.merge(graphdef, join_tree(zeros(client_p), p), join_tree(zeros(client_s), ms))
      h = model.encoder.stages(feats, train=True, start=cut).mean(axis=(1, 2))
      loss = optax.sigmoid_binary_cross_entropy(model.fc(h)[:, 0], batch["label"]).mean()
      return loss, (split_tree(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), cut)[1], {})

    programs[("splitavg", num_clients)] = jax.jit(
      local.make_splitavg_round(client_fn, server_loss_fn, tx, tx, strategy.cut_grad)
    )
  if ("predict", "single") not in programs:
    programs[("predict", "single")] = make_predict_fn(graphdef, "splitavg")
  round_fn, predict = programs[("splitavg", num_clients)], programs[("predict", "single")]

  def do_round(state, r):
    batches, _ = nodes.round_batches(
      rng, pool, None, split.train, f.local_epochs, t.batch_size, False, equal_steps=True
    )
    state, round_metrics = round_fn(state, batches, jax.random.fold_in(train_key, r))
    return state, np.full(num_clients, float(np.mean(round_metrics["loss"])))

  def node_models(state):
    """Each node's client part joined with the shared server part, stacked [C, ...]."""
    server = lambda tree: aggregate.broadcast(tree, num_clients)
    return (
      join_tree(state.client_params, server(state.server_params)),
      join_tree(state.client_model_state, server(state.server_model_state)),
    )

  return state, do_round, node_models, predict


# ----------------------------------------------------------------------------- report
def report(config, workdir: pathlib.Path, methods, node_names, results) -> dict:
  """Tables (eval/node_tables.py), fairness summary and box plots from
  results[method][repeat] (train_and_evaluate's dicts). Returns the summary written to
  results.json."""
  rows, per_node, fairness, values = node_tables.study_tables(
    {m: results[m] for m in methods},
    node_names,
    bootstrap_samples=config.report.bootstrap_samples,
    alpha=config.report.alpha,
    seed=config.seed,
  )
  for name, table in (("runs", rows), ("per_node", per_node), ("fairness", fairness)):
    downstream.write_csv(workdir / f"{name}.csv", table)
  protocol = dict(
    name=config.protocol,
    **{k: config.data[k] for k in ("val_fraction", "test_fraction", "patient_column")},
    rounds=config.fed.num_rounds,
    local_epochs=config.fed.local_epochs,
    **{
      k: config.train[k]
      for k in (
        "optimizer",
        "lr",
        "weight_decay",
        "lr_schedule",
        "cosine_period_epochs",
        "min_lr",
        "patience_epochs",
      )
    },
  )
  summary = dict(
    scenario=config.scenario,
    methods=list(methods),
    nodes=list(node_names),
    repeats=config.repeats,
    protocol=protocol,
    per_node=per_node,
    fairness=fairness,
    runs=rows,
  )
  loop.atomic_write(workdir / "results.json", json.dumps(summary, indent=1, default=float))
  for name in ("auc", "accuracy"):
    boxplots.per_node_boxplots(
      workdir / f"boxplots_{name}.png",
      {m: [values[(m, n, name)] for n in node_names] for m in methods},
      node_names,
      metric=name.upper() if name == "auc" else name,
      title=f"{config.scenario} skew: {name} over {config.repeats} repeats",
    )
  return summary


# ----------------------------------------------------------------------------- sweep
def sweep_ratios(config) -> tuple:
  """The ratios of config.sweep: config.sweep_ratios, or the paper's 10 steps."""
  return tuple(float(r) for r in config.sweep_ratios or SWEEP_RATIOS[config.sweep])


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
  rows = node_tables.sweep_rows(summaries)
  downstream.write_csv(workdir / "sweep.csv", rows)
  what = "node 2 normal:abnormal" if config.sweep == "label" else "n1:n2"
  title = f"{config.sweep} skew sweep ({what}), AUC over {config.repeats} repeats"
  sweep.sweep_lines(workdir / "sweep_auc.png", rows, title=title)
  summary = dict(sweep=config.sweep, ratios=list(summaries), rows=rows)
  loop.atomic_write(workdir / "sweep.json", json.dumps(summary, indent=1, default=float))
  return summary


# ----------------------------------------------------------------------------- run
def run(config, workdir) -> dict:
  """One study (run_study) or, with config.sweep, one per ratio (run_sweep). One process per
  workdir: a second one stops at the workdir lock (train/resume.py)."""
  validate(config)
  with resume.WorkdirLock(workdir):
    return run_sweep(config, workdir) if config.sweep else run_study(config, workdir)


def run_cell(
  config, workdir: pathlib.Path, method: str, repeat: int, run_args: tuple, programs: dict
) -> dict:
  """One (method, repeat): its results file runs/<method>/repeat_<r>.npz, trained (resuming
  from the cell's per-round checkpoints in runs/<method>/repeat_<r>/) unless it exists."""
  path = workdir / "runs" / method / f"repeat_{repeat}.npz"
  cell_dir = path.with_suffix("")
  if not path.exists():
    t1 = time.perf_counter()
    cell = checkpoint.Checkpointer(cell_dir, keep=2) if config.ckpt_every_rounds else None
    try:
      out = train_and_evaluate(config, method, *run_args, repeat, programs, cell)
    finally:
      if cell is not None:
        cell.close()
    loop.atomic_write(path, out)
    seconds = time.perf_counter() - t1
    node = lambda k: node_tables.node_metrics(out[f"labels_{k}"], out[f"probs_{k}"])
    aucs = [round(node(k)["auc"], 3) for k in range(len(run_args[-1].names))]
    logging.info("repeat %d %-14s done in %.1f s: AUC per node %s", repeat, method, seconds, aucs)
  # The results file is the cell's record from now on: its checkpoints are not needed.
  shutil.rmtree(cell_dir, ignore_errors=True)
  with np.load(path) as f:
    return dict(f)


def run_study(config, workdir, programs: dict | None = None) -> dict:
  """Runs every (method, repeat) not yet in workdir/runs, then writes the report. programs:
  a cache of compiled programs to share between studies (a sweep)."""
  methods = validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  pool, sat = nodes.load_data(config)
  sat_train, _, sat_test = (
    sat.take(i)
    for i in partition.split_node(
      sat.labels, np.arange(len(sat.labels)), 0.0, config.data.test_fraction, config.seed
    )
  )
  logging.info(
    "Data: %d primary-task images (%.0f%% positive), SAT %d train / %d test, %.1f s",
    len(pool.labels),
    100 * pool.labels.mean(),
    len(sat_train.labels),
    len(sat_test.labels),
    time.perf_counter() - t0,
  )
  results = {m: [] for m in methods}
  programs = {} if programs is None else programs
  for repeat in range(config.repeats):
    split = nodes.make_split(config, pool, repeat)
    if repeat == 0:
      node_sets = list(zip(split.train, split.val, split.test))
      counts = np.array(
        [np.bincount(pool.labels[np.concatenate(s)], minlength=2) for s in node_sets]
      )
      for name, count, sets in zip(split.names, counts, node_sets):
        sizes = [len(s) for s in sets]
        logging.info(
          "node %-22s %5d negative %5d positive  %5d train %4d val %5d test", name, *count, *sizes
        )
      partition_plot.plot_partition(
        counts,
        split.names,
        ("negative", "positive"),
        workdir / "partition.png",
        title=f"{config.scenario} skew (repeat 0)",
      )
    for method in methods:
      results[method].append(
        run_cell(config, workdir, method, repeat, (pool, sat_train, sat_test, split), programs)
      )
  summary = report(config, workdir, methods, split.names, results)  # same nodes every repeat
  for row in summary["fairness"]:
    if row["metric"] == "auc":
      logging.info(
        "%(method)-14s AUC node mean %(node_mean).3f  worst %(worst).3f (%(worst_node)s)  "
        "spread %(spread).3f",
        row,
      )
  logging.info("Study done in %.1f s; tables and plots in %s", time.perf_counter() - t0, workdir)
  return summary
