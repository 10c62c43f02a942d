"""Downstream fine-tuning and evaluation: diagnosis (classification) and segmentation studies.

The script, in order:
  1. check the config; load the task (phantom | CSV manifest | class folders), split by patient;
  2. for every (pretraining variant, training fraction, seed) cell of the study, in its own
     folder `<variant>/frac_<f>/seed_<s>` (a finished cell is read back, not rerun):
       build the model (global-pool / cls-token ViT classifier, or ViT + pyramid decoder),
       load the variant's encoder (an ultrajax pretraining workdir or a timm / MAE file; heads
       start fresh; parameters and optimizer state laid out by config.sharding_rules as in
       pretraining), train with AdamW + layer-wise lr decay + warmup/cosine, on-device
       augmentation (crop, flip, RandAugment, mixup/cutmix, label smoothing; flips/rotations
       for segmentation); evaluate on the validation split every few epochs and keep the best
       parameters (the test split is never looked at for selection); finally test them,
       with bootstrap 95% CIs, ROC / PR / confusion / overlay PNGs, the test outputs
       (test_outputs.npz), t-SNE of the test features (first cell of a variant), the metrics
       under test-time blur (eval.blur_sigmas) and results.json;
  3. summarise: mean and Student-t 95% CI over seeds per (variant, fraction), clipped to the
     metric's range, and p-values against the reference variant (scratch, else the first):
     paired t-test over seeds, per-seed paired bootstrap and DeLong (eval/significance.py);
     summary.csv, the label-efficiency curve, and a table in the log.
An epoch is one pass over the training images, or several where `train.min_steps` asks for more
optimizer steps than num_epochs passes give (small datasets; `passes_per_epoch`). Each cell
checkpoints every `ckpt_every_epochs` (params, optimizer state, best-so-far) and every random
draw is keyed by (seed, epoch, step), so a killed study resumes bitwise. Metric tables and the
study summary live in eval/downstream.py, the losses in train/losses.py.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import parameter_overview, periodic_actions
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ultrajax import configlib
from ultrajax.data import augment, tasks
from ultrajax.eval import downstream, metrics
from ultrajax.interop import load as interop_load
from ultrajax.models import heads, mae, vit
from ultrajax.train import (
  checkpoint,
  divergence,
  loop,
  losses,
  optimizer,
  resume,
  sharding,
  tree,
  writers,
)
from ultrajax.viz import embedding, plots

MODES = ("finetune", "linear_probe")
# Classification loss weights: 'none' | 'balanced' (n / (K n_k) over the training images).
CLASS_WEIGHTS = ("none", "balanced")


# ----------------------------------------------------------------------------- config
def validate(config) -> None:
  c = configlib
  c.check_choice(config, "task_type", tasks.TASK_TYPES)
  c.check_choice(config, "mode", MODES)
  c.check_choice(config, "model.dtype", vit.DTYPES)
  c.check_choice(config, "model.pool", ("gap", "cls"))
  c.check_range(config, "model.drop_path_rate", 0.0, 1.0, high_inclusive=False)
  vit.compute_options(config.model, "config.model")
  c.check_choice(config, "data.source", tasks.SOURCES)
  c.check_choice(config, "data.mask_mode", tasks.MASK_MODES)
  c.check_range(config, "num_seeds", 1)
  c.check_range(config, "train.batch_size", 1)
  c.check_range(config, "train.num_epochs", 1)
  min_steps = config.train.min_steps
  c.check(
    isinstance(min_steps, int) and not isinstance(min_steps, bool) and min_steps >= 0,
    f"config.train.min_steps={min_steps!r} must be a whole number of steps >= 0 (0: off)",
  )
  c.check_range(config, "train.eval_every_epochs", 1)
  c.check_range(config, "ckpt_every_epochs", 1)
  c.check_range(config, "optim.base_lr", 0.0, low_inclusive=False)
  c.check_range(config, "optim.min_lr", 0.0)
  resume.validate(config)
  sharding.check_rules(config.sharding_rules)
  c.check_range(config, "eval.nsd_tolerance", 0.0)
  c.check_range(config, "optim.layer_decay", 0.0, 1.0, low_inclusive=False)
  c.check_range(config, "aug.label_smoothing", 0.0, 1.0, high_inclusive=False)
  c.check_range(config, "aug.reprob", 0.0, 1.0)
  c.check_choice(config, "loss.class_weights", CLASS_WEIGHTS)
  for f in config.fractions:
    c.check(
      isinstance(f, (int, float)) and 0.0 < f <= 1.0,
      f"config.fractions has {f!r}; every training fraction must be in (0, 1]",
    )
  allowed = downstream.CLS_METRICS if config.task_type == "cls" else downstream.SEG_METRICS
  c.check(
    config.train.select_metric in allowed,
    f"config.train.select_metric={config.train.select_metric!r} is not one of {allowed}",
  )
  if config.data.source == "manifest":
    c.check(bool(config.data.manifest), "config.data.manifest must name a CSV file")
  if config.data.source == "folders":
    c.check(bool(config.data.root), "config.data.root must name a folder of class folders")
  if config.data.source == "tfds":
    c.check_one_tfds_name(config)
  for s in config.eval.blur_sigmas:
    c.check(
      isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s <= 50,
      f"config.eval.blur_sigmas has {s!r}; each blur sigma must be a number in [0, 50] "
      "(input pixels)",
    )
  lo, hi = config.aug.crop_scale
  c.check(
    0 < lo <= hi <= 1,
    f"config.aug.crop_scale={tuple(config.aug.crop_scale)} is not 0 < low <= high <= 1",
  )


# Which cells a study has, not what one cell computes (a cell's folder names its variant,
# fraction and seed): left out of the config saved with each cell.
STUDY_FIELDS = ("fractions", "num_seeds", "variants", "init_from", "seed")


def variants(config) -> list[tuple[str, str]]:
  """[(name, init path or '')] from config.variants 'name=path,...' or else config.init_from."""
  if config.variants:
    out = []
    for item in filter(None, (v.strip() for v in config.variants.split(","))):
      name, sep, path = item.partition("=")
      configlib.check(
        bool(sep) and bool(name),
        f"config.variants item {item!r} is not 'name=path' (use 'scratch=' for no pretraining)",
      )
      out.append((name, path))
    return out
  if config.init_from:
    return [(pathlib.Path(config.init_from).name or "init", config.init_from)]
  return [("scratch", "")]


# ----------------------------------------------------------------------------- model
def build_model(config, num_classes: int, seed: int):
  """The fine-tuning model for `num_classes` classes, initialised from `seed`."""
  width, depth, heads_, patch = vit.model_dims(config.model)
  m = config.model
  encoder = dict(
    width=width,
    depth=depth,
    num_heads=heads_,
    patch_size=patch,
    image_size=m.image_size,
    drop_path_rate=m.drop_path_rate,
    dtype=vit.DTYPES[m.dtype],
    **vit.compute_options(m, "config.model"),
    rngs=nnx.Rngs(seed),
  )
  if config.task_type == "cls":
    return vit.ViT(pool=m.pool, num_classes=num_classes, **encoder)
  return heads.Segmenter(
    num_outputs=1 if num_classes == 2 else num_classes,
    feature_blocks=tuple(m.feature_blocks),
    channels=m.decoder_channels,
    **encoder,
  )


def trainable_mask(params, mode: str):
  """None for full fine-tuning; for linear probing True only on the classifier head."""
  if mode == "finetune":
    return None
  return tree.map_with_path(lambda path, _: path.split("/")[0] == "head", params)


# ----------------------------------------------------------------------------- objectives
def make_loss_fn(graphdef, config, num_classes: int):
  aug = config.aug

  def loss_fn(params, images_u8, targets, key, class_weights):
    """class_weights: [K] on the classification loss (ones unless loss.class_weights)."""
    k_aug, k_mix, k_drop = jax.random.split(key, 3)
    k_erase = jax.random.fold_in(k_aug, 1)
    model = nnx.merge(graphdef, params)
    x = images_u8.astype(jnp.float32) / 255.0
    keys = jax.random.split(k_aug, x.shape[0])
    if config.task_type == "cls":
      x = mae.normalize(jax.vmap(lambda k, im: augment.cls_example(k, im, aug))(keys, x))
      if aug.reprob > 0:  # per image, after normalisation and before mixing (as timm)
        x = jax.vmap(lambda k, im: augment.random_erasing(k, im, aug.reprob))(
          jax.random.split(k_erase, x.shape[0]), x
        )
      soft = augment.smooth_one_hot(targets, num_classes, aug.label_smoothing)
      # Mixing is affine with weights summing to 1, so it commutes with the normalisation.
      x, soft = augment.mixup_cutmix(
        k_mix,
        x,
        soft,
        mixup_alpha=aug.mixup_alpha,
        cutmix_alpha=aug.cutmix_alpha,
        prob=aug.mix_prob,
      )
      logits = model(x, key=k_drop)
      return losses.weighted_soft_cross_entropy(logits, soft, class_weights)
    x, t = jax.vmap(lambda k, im, m: augment.seg_example(k, im, m, aug))(keys, x, targets)
    return losses.seg_loss(model(mae.normalize(x), key=k_drop), t, config.loss.dice_weight)

  return loss_fn


# ----------------------------------------------------------------------------- programs
# The config fields the compiled programs read (Setup's methods and train_step). Setup holds
# only these, so cells that differ elsewhere (data, organ, seed, evaluation) share one compile;
# reading any other field from Setup.config raises instead of reusing a stale program.
PROGRAM_FIELDS = (
  "task_type",
  "mode",
  "model",
  "aug",
  "loss",
  "optim",
  "train",
  "on_nonfinite",
  "sharding_rules",
)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the jitted programs depend on beyond their array arguments: one study shape. Hashable,
  it is their static argument, so JAX's compilation cache compiles each shape once for all its
  cells (seeds, variants, fractions with the same steps). Derived pieces are built on first use.
  """

  config: ml_collections.FrozenConfigDict
  num_classes: int
  steps_per_epoch: int  # optimizer steps per epoch of the schedule (passes x batches per pass)
  batch: int
  mesh: Mesh

  @functools.cached_property
  def _split(self):
    abstract = nnx.eval_shape(lambda: build_model(self.config, self.num_classes, 0))
    graphdef, params = nnx.split(abstract, nnx.Param)
    return graphdef, nnx.to_pure_dict(params)

  @property
  def graphdef(self):
    return self._split[0]

  @property
  def abstract_params(self):
    return self._split[1]

  @functools.cached_property
  def peak_lr(self) -> float:
    optim = self.config.optim
    return optim.base_lr * (self.batch / 256 if optim.scale_lr_by_batch else 1.0)

  @functools.cached_property
  def schedule(self):
    """Warmup then cosine over the run's optimizer steps (epochs x steps_per_epoch)."""
    total = self.steps_per_epoch * self.config.train.num_epochs
    warmup = min(int(self.config.optim.warmup_epochs * self.steps_per_epoch), total - 1)
    return optax.warmup_cosine_decay_schedule(
      0.0,
      self.peak_lr,
      warmup_steps=warmup,
      decay_steps=max(total, warmup + 1),
      end_value=self.config.optim.min_lr,
    )

  @functools.cached_property
  def tx(self):
    params = self.abstract_params
    return optimizer.finetune_adamw(
      self.config.optim,
      params,
      schedule=self.schedule,
      depth=vit.model_dims(self.config.model)[1],
      trainable=trainable_mask(params, self.config.mode),
    )

  @functools.cached_property
  def param_sharding(self):
    """config.sharding_rules over the parameter paths (train/sharding.py), as pretraining."""
    rules = [tuple(r) for r in self.config.sharding_rules]
    return sharding.tree_shardings(self.abstract_params, self.mesh, rules, False)

  @functools.cached_property
  def abstract_opt(self):
    return jax.eval_shape(self.tx.init, self.abstract_params)

  @functools.cached_property
  def opt_sharding(self):
    rules = [tuple(r) for r in self.config.sharding_rules]
    return sharding.tree_shardings(self.abstract_opt, self.mesh, rules, False)

  @property
  def replicated(self):
    return sharding.replicated(self.mesh)

  @property
  def data_sharding(self):
    return NamedSharding(self.mesh, P("data"))

  def apply(self, fn, params, images_u8: np.ndarray) -> np.ndarray:
    """fn (predict or features) over host images [N, S, S, 3] in batches -> host outputs [N, ...]."""
    return downstream.predict_batches(
      functools.partial(fn, self), params, images_u8, self.batch, self.data_sharding
    )


@functools.partial(jax.jit, static_argnums=0)
def init_opt(setup: Setup, params):
  return jax.lax.with_sharding_constraint(setup.tx.init(params), setup.opt_sharding)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 2))
def train_step(setup: Setup, params, opt_state, images, targets, idx, key, class_weights):
  """One step on the training images at `idx` [B]; the loss is NaN where it or the gradient was
  not finite (with on_nonfinite='skip' that update is dropped, train/divergence.py)."""
  config = setup.config
  x = jax.lax.with_sharding_constraint(images[idx], setup.data_sharding)
  y = jax.lax.with_sharding_constraint(targets[idx], setup.data_sharding)
  loss_fn = make_loss_fn(setup.graphdef, config, setup.num_classes)
  loss, grads = jax.value_and_grad(loss_fn)(params, x, y, key, class_weights)
  finite = divergence.finite_and_norm(loss, grads)[0]
  new_params, new_opt = divergence.apply_update(
    setup.tx, grads, opt_state, params, finite, config.on_nonfinite
  )
  new_params = jax.lax.with_sharding_constraint(new_params, setup.param_sharding)
  new_opt = jax.lax.with_sharding_constraint(new_opt, setup.opt_sharding)
  return new_params, new_opt, jnp.where(finite, loss, jnp.nan)


@functools.partial(jax.jit, static_argnums=0)
def predict(setup: Setup, params, images_u8):
  """cls: probabilities [B, K]; seg: class maps [B, S, S] uint8; replicated."""
  out = nnx.merge(setup.graphdef, params)(mae.normalize(images_u8.astype(jnp.float32) / 255.0))
  if out.ndim == 2:
    out = jax.nn.softmax(out)
  elif out.shape[-1] == 1:
    out = (out[..., 0] > 0).astype(jnp.uint8)
  else:
    out = jnp.argmax(out, axis=-1).astype(jnp.uint8)
  return jax.lax.with_sharding_constraint(out, setup.replicated)


@functools.partial(jax.jit, static_argnums=0)
def features(setup: Setup, params, images_u8):
  """cls: what the head sees [B, D] (for t-SNE); replicated."""
  model = nnx.merge(setup.graphdef, params)
  out = model.features(mae.normalize(images_u8.astype(jnp.float32) / 255.0))
  return jax.lax.with_sharding_constraint(out, setup.replicated)


def run_epoch(setup: Setup, params, opt_state, images, targets, order, epoch_key, class_weights):
  """One epoch over `order` [steps, B] of training indices; returns the step losses [steps].

  A host loop over a jitted step rather than a `lax.scan`: XLA:CPU ran the scanned
  segmentation step about 15x slower than the same step on its own (measured), and the
  per-step dispatch is negligible next to a training step.
  """
  losses = []
  for i in range(order.shape[0]):
    key = jax.random.fold_in(epoch_key, i)
    params, opt_state, loss = train_step(
      setup, params, opt_state, images, targets, order[i], key, class_weights
    )
    losses.append(loss)
  return params, opt_state, jnp.stack(losses)


def passes_per_epoch(batches_per_pass: int, num_epochs: int, min_steps: int) -> int:
  """How many passes over the training images make one epoch of the schedule, so that the run
  has at least `min_steps` optimizer steps: ceil(min_steps / (batches_per_pass x num_epochs)),
  at least 1. Small training sets (a few labelled patients) otherwise get too few updates from
  an epoch count sized for large ones; every epoch-counted field (warmup, evaluation,
  checkpoints) keeps its meaning, with epochs made of several passes."""
  return max(1, math.ceil(min_steps / (batches_per_pass * num_epochs)))


def epoch_order(seed: int, epoch: int, num_images: int, batch: int, passes: int) -> np.ndarray:
  """[passes x (num_images // batch), batch] training indices of one epoch: `passes` fresh
  permutations from one generator keyed by (seed, epoch), each cut to whole batches (drop_last,
  as MAE's fine-tuning loader); so a resumed epoch draws the same order."""
  rng = np.random.default_rng([seed, epoch])
  per_pass = num_images // batch * batch
  order = np.concatenate([rng.permutation(num_images)[:per_pass] for _ in range(passes)])
  return order.reshape(-1, batch)


# ----------------------------------------------------------------------------- evaluation
def test_cell(
  config,
  setup: Setup,
  params,
  data: tasks.TaskData,
  test_idx: np.ndarray,
  run_dir: pathlib.Path,
  seed: int,
  first_cell: bool,
) -> tuple[dict, dict]:
  """(report, extras) of a cell's test split: the report with bootstrap CIs
  (downstream.test_report) and what a cell adds beside it: test_outputs.npz (what the study's
  paired tests read), the ROC, confusion and precision-recall plots (UltraFedFM Fig. 6) or the
  segmentation overlays, t-SNE of the test features in the first cell of each variant (URFM
  Fig. 6), and the metrics under test-time blur (UltraFedFM Fig. 5e-f, eval.blur_sigmas) with
  blur.png. extras: the entries to add to results.json."""
  targets, spacing = data.targets[test_idx], _spacing(data, test_idx)
  images, names = data.images[test_idx], data.class_names
  outputs = setup.apply(predict, params, images)
  report = downstream.test_report(
    config.task_type,
    targets,
    outputs,
    data.num_classes,
    config.eval.bootstrap_samples,
    seed,
    spacing,
    config.eval.nsd_tolerance,
  )
  variant = run_dir.parent.parent.name
  if config.task_type == "cls":
    loop.atomic_write(
      run_dir / "test_outputs.npz", dict(test_index=test_idx, targets=targets, probs=outputs)
    )
    roc_title = f"test ROC ({variant}, seed {seed})"
    plots.roc_curves(run_dir / "roc.png", targets, outputs, names, title=roc_title)
    matrix = metrics.confusion_matrix(targets, outputs.argmax(1), data.num_classes)
    plots.confusion(run_dir / "confusion.png", matrix, names)
    pr_title = f"test precision-recall ({variant})"
    plots.pr_curves(run_dir / "pr.png", targets, outputs, names, title=pr_title)
    if first_cell:
      feats = setup.apply(features, params, images)
      tsne_title = f"t-SNE of test features ({variant})"
      embedding.save_tsne(run_dir / "tsne.png", feats, targets, names, title=tsne_title)
  else:
    per_image = downstream.seg_per_image(
      targets, outputs, data.num_classes, spacing, config.eval.nsd_tolerance
    )
    table = np.stack([per_image[name] for name in downstream.SEG_METRICS], axis=1)  # [N, M]
    loop.atomic_write(run_dir / "test_outputs.npz", dict(test_index=test_idx, per_image=table))
    plots.seg_overlays(run_dir / "overlays.png", images, targets, outputs, scores=per_image["dice"])
  sigmas = [float(x) for x in config.eval.blur_sigmas]
  if not sigmas:
    return report, {}
  blur = {}
  for sigma in sigmas:
    out = setup.apply(predict, params, downstream.blurred(images, sigma))
    blur[f"{sigma:g}"] = _scores(config, data, test_idx, out)
  select = config.train.select_metric
  xs = sorted({0.0, *sigmas})
  plots.metric_curve(
    run_dir / "blur.png",
    xs,
    {select: [report[select][0] if x == 0 else blur[f"{x:g}"][select] for x in xs]},
    xlabel="test-time Gaussian blur sigma (pixels)",
    ylabel=f"test {select}",
    title=f"blur stability ({variant})",
  )
  return report, {"blur": blur}


def _spacing(data: tasks.TaskData, idx: np.ndarray):
  """[len(idx), 2] mm per input pixel of those images, or None where the task has no pixel size."""
  return None if data.spacing is None else data.spacing[idx]


def _scores(config, data: tasks.TaskData, idx: np.ndarray, outputs: np.ndarray) -> dict:
  """downstream.split_scores of outputs [len(idx), ...] against the targets of the images at idx."""
  spacing, tolerance = _spacing(data, idx), config.eval.nsd_tolerance
  return downstream.split_scores(
    config.task_type, data.targets[idx], outputs, data.num_classes, spacing, tolerance
  )


# ----------------------------------------------------------------------------- one run
def _init(config, setup: Setup, seed: int, init_path: str):
  """(params, train state) of a fresh cell: the model from `seed`, its encoder from init_path."""
  params = nnx.to_pure_dict(nnx.state(build_model(config, setup.num_classes, seed), nnx.Param))
  if init_path:
    prefix = ("encoder",) if config.task_type == "seg" else ()
    params = interop_load.load_encoder(init_path, params, prefix=prefix)
  else:
    logging.info("No init_from: training from scratch.")
  params = loop.put_global(params, setup.param_sharding)
  return params, _train_state(
    setup, init_opt(setup, params), jax.tree.map(jnp.copy, params), math.nan, 0
  )


def _train_state(setup: Setup, opt_state, best_params, best: float, best_epoch: int) -> dict:
  """What a checkpoint keeps beside the params (a copy of the best: `params` is donated)."""
  return {
    "opt_state": opt_state,
    "best_params": best_params,
    "best": loop.put_global(np.float32(best), setup.replicated),
    "best_epoch": loop.put_global(np.int32(best_epoch), setup.replicated),
  }


def train_one(
  config,
  data: tasks.TaskData,
  run_dir: pathlib.Path,
  *,
  init_path: str,
  fraction: float,
  seed: int,
  mesh,
) -> dict:
  """Trains and tests one cell of the study; returns (and writes) its results."""
  run_dir.mkdir(parents=True, exist_ok=True)
  train_idx = tasks.train_subset(data, fraction, config.data.split_seed)
  val_idx, test_idx = data.indices("val"), data.indices("test")
  devices = mesh.shape["data"]
  batch = min(config.train.batch_size, len(train_idx)) // devices * devices
  if batch < 1:
    raise configlib.ConfigError(
      f"{len(train_idx)} training images (fraction {fraction}) cannot "
      f"fill one batch over {devices} devices"
    )
  num_epochs = config.train.num_epochs
  batches_per_pass = len(train_idx) // batch  # drop_last, as MAE's fine-tuning loader
  passes = passes_per_epoch(batches_per_pass, num_epochs, config.train.min_steps)
  program_config = ml_collections.FrozenConfigDict({k: config[k] for k in PROGRAM_FIELDS})
  setup = Setup(program_config, data.num_classes, batches_per_pass * passes, batch, mesh)

  ckpt = checkpoint.Checkpointer(run_dir, keep=1)
  like_params = checkpoint.abstract_like(setup.abstract_params, setup.param_sharding)
  like_opt = checkpoint.abstract_like(setup.abstract_opt, setup.opt_sharding)
  like_train = _train_state(setup, like_opt, like_params, math.nan, 0)
  cell = resume.snapshot(config, exclude=STUDY_FIELDS)
  start, params, state = loop.resume_or_init(
    ckpt,
    like_params,
    like_train,
    lambda: _init(config, setup, seed, init_path),
    config=config,
    snapshot=cell,
  )
  opt_state, best_params = state["opt_state"], state["best_params"]
  best, best_epoch = float(state["best"]), int(state["best_epoch"])
  train_images = loop.put_global(data.images[train_idx], setup.replicated)
  train_targets = loop.put_global(data.targets[train_idx], setup.replicated)
  class_weights = np.ones(data.num_classes, np.float32)
  if config.task_type == "cls" and config.loss.class_weights == "balanced":
    class_weights = losses.balanced_class_weights(data.targets[train_idx], data.num_classes)
    named = dict(zip(data.class_names, np.round(class_weights, 3).tolist()))
    logging.info("Class weights (balanced over the training images): %s", named)
  class_weights = loop.put_global(class_weights, setup.replicated)
  select = config.train.select_metric
  writers.truncate_jsonl(run_dir / "metrics.jsonl", start, key="epoch")
  writer = writers.create_writer(run_dir)
  run_key = jax.random.key(seed)
  logging.info(
    "%s: %d train (fraction %g) / %d val / %d test images, batch %d, %d steps per "
    "epoch (%d passes), %d epochs, peak lr %.3g",
    run_dir,
    len(train_idx),
    fraction,
    len(val_idx),
    len(test_idx),
    batch,
    setup.steps_per_epoch,
    passes,
    num_epochs,
    setup.peak_lr,
  )
  # Epochs per second and this cell's ETA in the log (from the second epoch on).
  progress = periodic_actions.ReportProgress(num_train_steps=num_epochs, every_steps=1)
  try:
    for epoch in range(start, num_epochs):
      t0 = time.time()
      order = jnp.asarray(epoch_order(seed, epoch, len(train_idx), batch, passes))
      epoch_key = jax.random.fold_in(run_key, epoch)
      params, opt_state, step_losses = run_epoch(
        setup, params, opt_state, train_images, train_targets, order, epoch_key, class_weights
      )
      step_losses = np.asarray(step_losses)
      valid = divergence.screen(
        step_losses,
        np.ones(step_losses.shape, bool),
        where=f"{run_dir}: epoch {epoch + 1}",
        mode=config.on_nonfinite,
      )
      loss = float(step_losses[valid].mean())
      done = epoch + 1
      row = {
        "epoch": done,
        "train_loss": loss,
        "lr": float(setup.schedule(done * setup.steps_per_epoch - 1)),
        "img_per_s": setup.steps_per_epoch * batch / (time.time() - t0),
      }
      if config.on_nonfinite == "skip":
        row["skipped_steps"] = int(step_losses.size - valid.sum())
      if loop.itstime(done, config.train.eval_every_epochs, num_epochs):
        outputs = setup.apply(predict, params, data.images[val_idx])
        val = _scores(config, data, val_idx, outputs)
        row.update({f"val_{k}": v for k, v in val.items()})
        if downstream.better(select, val[select], best):
          best, best_epoch = val[select], done
          best_params = jax.tree.map(jnp.copy, params)
      writer.write_scalars(done, row)
      vals = "".join(f", {k} {v:.4f}" for k, v in row.items() if k.startswith("val_"))
      logging.info("%s epoch %d/%d: loss %.4f%s", run_dir.name, done, num_epochs, loss, vals)
      progress(done)
      if loop.itstime(done, config.ckpt_every_epochs, num_epochs):
        train_state = _train_state(setup, opt_state, best_params, best, best_epoch)
        ckpt.save(done, params, train_state, None, {"epoch": done, "config": json.dumps(cell)})
  finally:  # a crash still finishes the last save and releases the checkpoint manager
    ckpt.close()
    writer.close()
  if best_epoch == 0:  # validation never gave a finite score: test the last parameters
    best_params = params

  first_cell = seed == config.seed and fraction == config.fractions[0]
  report, extras = test_cell(config, setup, best_params, data, test_idx, run_dir, seed, first_cell)
  results = {
    "test": report,
    "best_val": best,
    "best_epoch": best_epoch,
    "select_metric": select,
    "num_train": int(len(train_idx)),
    "num_val": int(len(val_idx)),
    "num_test": int(len(test_idx)),
    "train_steps": num_epochs * setup.steps_per_epoch,
    "fraction": fraction,
    "seed": seed,
    "init_from": init_path,
    "class_names": list(data.class_names),
    "config": cell,
    **extras,
  }
  loop.atomic_write(run_dir / "results.json", results)
  return results


def read_or_train(config, data: tasks.TaskData, run_dir: pathlib.Path, **cell) -> dict:
  """A cell's results.json when it finished earlier (refused if its config differs beyond
  resume.allowed_changes), else train_one(config, data, run_dir, **cell)."""
  done = run_dir / "results.json"
  if not done.exists():
    return train_one(config, data, run_dir, **cell)
  result = json.loads(done.read_text())
  resume.check_config(
    result.get("config"),
    resume.snapshot(config, exclude=STUDY_FIELDS),
    where=str(done),
    allow=resume.allowed_changes(config),
  )
  logging.info("%s: finished earlier, read back", run_dir)
  return result


# ----------------------------------------------------------------------------- study
def write_summary(workdir: pathlib.Path, rows: list[dict], select: str) -> None:
  downstream.write_csv(workdir / "summary.csv", rows, decimals=None)
  if len({r["fraction"] for r in rows}) > 1:
    curves = {}
    for r in rows:
      if r["metric"] == select:
        point = (r["fraction"], r["mean"], r["ci_low"], r["ci_high"])
        curves.setdefault(r["variant"], []).append(point)
    plots.label_efficiency(workdir / "label_efficiency.png", curves, select)


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs the whole study; returns the summary rows (also in workdir/summary.csv).

  One process per workdir: a second one stops at the workdir lock (train/resume.py). A cell
  finished or checkpointed under another config is refused with the differing fields.
  """
  validate(config)
  with resume.WorkdirLock(workdir):
    return _run(config, pathlib.Path(workdir))


def _run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> list[dict]:
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(clients=1, data=config.mesh.data)
  data = tasks.load_task(config.data, config.task_type, config.model.image_size)
  abstract = nnx.eval_shape(lambda: build_model(config, data.num_classes, 0))
  parameter_overview.log_parameter_overview(
    nnx.to_pure_dict(nnx.state(abstract, nnx.Param)),
    include_stats=False,
    msg="Fine-tuning model parameters",
  )
  study = variants(config)
  for name, path in study:
    if path and not pathlib.Path(path).exists():
      raise FileNotFoundError(f"pretraining variant {name!r}: nothing at {path}")
  seeds = range(config.seed, config.seed + config.num_seeds)
  grid = list(itertools.product(study, config.fractions, seeds))
  cells = []
  for i, ((name, path), fraction, seed) in enumerate(grid, 1):
    run_dir = workdir / name / f"frac_{fraction:g}" / f"seed_{seed}"
    logging.info(
      "Study cell %d of %d: variant %s, fraction %g, seed %d", i, len(grid), name, fraction, seed
    )
    result = read_or_train(
      config, data, run_dir, init_path=path, fraction=fraction, seed=seed, mesh=mesh
    )
    cells.append({"variant": name, "run_dir": str(run_dir), **result})
    cis = [
      f"{k} {v[0]:.4f} [{v[1]:.4f}, {v[2]:.4f}]"
      for k, v in result["test"].items()
      if isinstance(v, list)
    ]
    logging.info("  test: %s", ", ".join(cis))
  names = downstream.CLS_METRICS if config.task_type == "cls" else downstream.SEG_METRICS
  rows = downstream.summarise(
    cells, names, downstream.reference_variant(study), config.eval.bootstrap_samples
  )
  if jax.process_index() == 0:
    write_summary(workdir, rows, config.train.select_metric)
  logging.info("Test metrics, mean [95%% CI] over %d seed(s):", config.num_seeds)
  for r in rows:
    logging.info(
      "  %(variant)-12s frac %(fraction)-4g %(metric)-18s %(mean).4f [%(ci_low).4f, %(ci_high).4f]",
      r,
    )
  return rows
