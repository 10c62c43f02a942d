"""Downstream fine-tuning and evaluation: diagnosis (classification) and segmentation studies.

The script, in order:
  1. check the config; load the task (phantom | CSV manifest | class folders), split by patient;
  2. for every (pretraining variant, training fraction, seed) cell of the study, in its own
     folder `<variant>/frac_<f>/seed_<s>` (a finished cell is read back, not rerun):
       build the model (global-pool / cls-token ViT classifier, or ViT + pyramid decoder),
       load the variant's encoder (an ultrajax pretraining workdir or a timm / MAE file; heads
       start fresh), train with AdamW + layer-wise lr decay + warmup/cosine, on-device
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
Each cell checkpoints every `ckpt_every_epochs` (params, optimizer state, best-so-far) and every
random draw is keyed by (seed, epoch, step), so a killed study resumes bitwise.
"""
from __future__ import annotations

import csv
import functools
import json
import math
import os
import pathlib
import time
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import parameter_overview, periodic_actions
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ultrajax import configlib
from ultrajax.data import augment, tasks
from ultrajax.eval import metrics, significance
from ultrajax.interop import load as interop_load
from ultrajax.models import heads, mae, vit
from ultrajax.train import checkpoint, divergence, optimizer, resume, sharding, tree, writers
from ultrajax.ultramim import corruption
from ultrajax.viz import embedding, plots

MODES = ("finetune", "linear_probe")
# Classification loss weights: 'none' | 'balanced' (n / (K n_k) over the training images).
CLASS_WEIGHTS = ("none", "balanced")
CLS_METRICS = ("auroc", "average_precision", "accuracy", "f1", "precision", "recall",
               "specificity", "npv", "ece")
# Distances (hd95, asd; nsd's tolerance) in mm where the task knows the pixel size, else pixels.
SEG_METRICS = ("dice", "iou", "hd95", "asd", "nsd")
LOWER_IS_BETTER = ("hd95", "asd", "ece")


# ----------------------------------------------------------------------------- config
def validate(config) -> None:
  c = configlib
  c.check_choice(config, "task_type", tasks.TASK_TYPES)
  c.check_choice(config, "mode", MODES)
  c.check_choice(config, "model.dtype", vit.DTYPES)
  c.check_choice(config, "model.pool", ("gap", "cls"))
  c.check_range(config, "model.drop_path_rate", 0.0, 1.0, high_inclusive=False)
  c.check_choice(config, "data.source", tasks.SOURCES)
  c.check_choice(config, "data.mask_mode", tasks.MASK_MODES)
  c.check_range(config, "num_seeds", 1)
  c.check_range(config, "train.batch_size", 1)
  c.check_range(config, "train.num_epochs", 1)
  c.check_range(config, "train.eval_every_epochs", 1)
  c.check_range(config, "ckpt_every_epochs", 1)
  c.check_range(config, "optim.base_lr", 0.0, low_inclusive=False)
  c.check_range(config, "optim.min_lr", 0.0)
  resume.validate(config)
  c.check_range(config, "eval.nsd_tolerance", 0.0)
  c.check_range(config, "optim.layer_decay", 0.0, 1.0, low_inclusive=False)
  c.check_range(config, "aug.label_smoothing", 0.0, 1.0, high_inclusive=False)
  c.check_range(config, "aug.reprob", 0.0, 1.0)
  c.check_choice(config, "loss.class_weights", CLASS_WEIGHTS)
  for f in config.fractions:
    c.check(isinstance(f, (int, float)) and 0.0 < f <= 1.0,
            f"config.fractions has {f!r}; every training fraction must be in (0, 1]")
  allowed = CLS_METRICS if config.task_type == "cls" else SEG_METRICS
  c.check(config.train.select_metric in allowed,
          f"config.train.select_metric={config.train.select_metric!r} is not one of {allowed}")
  if config.data.source == "manifest":
    c.check(bool(config.data.manifest), "config.data.manifest must name a CSV file")
  if config.data.source == "folders":
    c.check(bool(config.data.root), "config.data.root must name a folder of class folders")
  if config.data.source == "tfds":
    c.check("," not in config.data.tfds_name and bool(config.data.tfds_name.strip()),
            f"config.data.tfds_name={config.data.tfds_name!r} must name one prepared TFDS dataset")
  for s in config.eval.blur_sigmas:
    c.check(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s <= 50,
            f"config.eval.blur_sigmas has {s!r}; each blur sigma must be a number in [0, 50] "
            "(input pixels)")
  lo, hi = config.aug.crop_scale
  c.check(0 < lo <= hi <= 1, f"config.aug.crop_scale={tuple(config.aug.crop_scale)} is not "
          "0 < low <= high <= 1")


# Which cells a study has, not what one cell computes (a cell's folder names its variant,
# fraction and seed): left out of the config saved with each cell.
STUDY_FIELDS = ("fractions", "num_seeds", "variants", "init_from", "seed")


def cell_config(config) -> dict:
  """The config one cell's results depend on, as saved with its checkpoints and results.json."""
  return {k: v for k, v in resume.snapshot(config).items() if k not in STUDY_FIELDS}


def variants(config) -> list[tuple[str, str]]:
  """[(name, init path or '')] from config.variants 'name=path,...' or else config.init_from."""
  if config.variants:
    out = []
    for item in filter(None, (v.strip() for v in config.variants.split(","))):
      name, sep, path = item.partition("=")
      configlib.check(bool(sep) and bool(name), f"config.variants item {item!r} is not "
                      "'name=path' (use 'scratch=' for no pretraining)")
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
  rngs = nnx.Rngs(seed)
  if config.task_type == "cls":
    return vit.ViT(width=width, depth=depth, num_heads=heads_, patch_size=patch,
                   image_size=m.image_size, pool=m.pool, num_classes=num_classes,
                   drop_path_rate=m.drop_path_rate, dtype=vit.DTYPES[m.dtype], rngs=rngs)
  return heads.Segmenter(width=width, depth=depth, num_heads=heads_, patch_size=patch,
                         image_size=m.image_size, num_outputs=1 if num_classes == 2 else num_classes,
                         feature_blocks=tuple(m.feature_blocks), channels=m.decoder_channels,
                         drop_path_rate=m.drop_path_rate, dtype=vit.DTYPES[m.dtype], rngs=rngs)


def trainable_mask(params, mode: str):
  """None for full fine-tuning; for linear probing True only on the classifier head."""
  if mode == "finetune":
    return None
  return tree.map_with_path(lambda path, _: path.split("/")[0] == "head", params)


# ----------------------------------------------------------------------------- objectives
def augment_cls(key, image01, aug):
  """One training image [S, S, 3] in [0, 1]: random resized crop + flip, then RandAugment."""
  size = image01.shape[0]
  k_crop, k_flip, k_ra = jax.random.split(key, 3)
  matrix = augment.random_resized_crop(k_crop, size, tuple(aug.crop_scale))
  if aug.hflip:
    matrix = matrix @ augment.hflip(jax.random.bernoulli(k_flip), size)
  image = augment.warp(image01, matrix)
  if aug.randaug_ops:
    image = augment.rand_augment_one(k_ra, image, aug.randaug_ops, aug.randaug_magnitude)
  return image


def augment_seg(key, image01, target, aug):
  """A training image and its class map, flipped and rotated together (mask: nearest)."""
  size = image01.shape[0]
  k_flip, k_rot, k_scale = jax.random.split(key, 3)
  angle = jax.random.uniform(k_rot, (), minval=-1.0, maxval=1.0) * math.radians(aug.rotate_deg)
  scale = jnp.exp(jax.random.uniform(k_scale, (), minval=-1.0, maxval=1.0)
                  * math.log(aug.scale_jitter))
  matrix = augment.rotation(angle, size) @ augment.about_centre(jnp.eye(2) / scale, size)
  if aug.hflip:
    matrix = matrix @ augment.hflip(jax.random.bernoulli(k_flip), size)
  image = augment.warp(image01, matrix)
  target = augment.warp(target[..., None].astype(jnp.float32), matrix, order=0)[..., 0]
  return image, target.astype(jnp.int32)


def soft_dice_loss(probs, onehot):
  """1 - soft Dice per image and class, averaged.  probs, onehot: [B, S, S, K] (K foreground)."""
  inter = (probs * onehot).sum(axis=(1, 2))
  total = probs.sum(axis=(1, 2)) + onehot.sum(axis=(1, 2))
  return (1.0 - (2.0 * inter + 1.0) / (total + 1.0)).mean()


def seg_loss(logits, target, dice_weight: float):
  """BCE + Dice (one output: binary) or cross-entropy + Dice over the foreground classes.

  logits: [B, S, S, 1 | K]; target: [B, S, S] int. The sigmoid / softmax is taken once and the
  cross-entropy is computed from the logits (no double sigmoid).
  """
  if logits.shape[-1] == 1:
    t = (target > 0).astype(jnp.float32)[..., None]
    ce = optax.sigmoid_binary_cross_entropy(logits, t).mean()
    return ce + dice_weight * soft_dice_loss(jax.nn.sigmoid(logits), t)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
  onehot = jax.nn.one_hot(target, logits.shape[-1])[..., 1:]
  return ce + dice_weight * soft_dice_loss(jax.nn.softmax(logits)[..., 1:], onehot)


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """n / (K n_k) per class k (scikit-learn's 'balanced'), 0 for a class absent from `labels`.

  labels: int [n] -> float32 [K]; with every class present the weighted class shares sum to 1,
  so the loss keeps its scale."""
  counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
  return np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0).astype(
      np.float32)


def weighted_soft_cross_entropy(logits, soft, class_weights):
  """mean_b -sum_k w_k y_bk log softmax(logits)_bk (torch's CrossEntropyLoss(weight) with soft
  targets).  logits, soft: [B, K]; class_weights: [K] (ones: plain cross-entropy)."""
  return -(class_weights * soft * jax.nn.log_softmax(logits)).sum(-1).mean()


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
      x = mae.normalize(jax.vmap(lambda k, im: augment_cls(k, im, aug))(keys, x))
      if aug.reprob > 0:  # per image, after normalisation and before mixing (as timm)
        x = jax.vmap(lambda k, im: augment.random_erasing(k, im, aug.reprob))(
            jax.random.split(k_erase, x.shape[0]), x)
      soft = augment.smooth_one_hot(targets, num_classes, aug.label_smoothing)
      # Mixing is affine with weights summing to 1, so it commutes with the normalisation.
      x, soft = augment.mixup_cutmix(k_mix, x, soft, mixup_alpha=aug.mixup_alpha,
                                     cutmix_alpha=aug.cutmix_alpha, prob=aug.mix_prob)
      logits = model(x, key=k_drop)
      return weighted_soft_cross_entropy(logits, soft, class_weights)
    x, t = jax.vmap(lambda k, im, m: augment_seg(k, im, m, aug))(keys, x, targets)
    return seg_loss(model(mae.normalize(x), key=k_drop), t, config.loss.dice_weight)

  return loss_fn


def make_predict_fn(graphdef):
  def predict(params, images_u8):
    """cls: probabilities [B, K]; seg: class maps [B, S, S] uint8."""
    out = nnx.merge(graphdef, params)(mae.normalize(images_u8.astype(jnp.float32) / 255.0))
    if out.ndim == 2:
      return jax.nn.softmax(out)
    if out.shape[-1] == 1:
      return (out[..., 0] > 0).astype(jnp.uint8)
    return jnp.argmax(out, axis=-1).astype(jnp.uint8)
  return predict


def make_features_fn(graphdef):
  def features(params, images_u8):
    """cls: what the head sees [B, D] (for t-SNE)."""
    return nnx.merge(graphdef, params).features(mae.normalize(images_u8.astype(jnp.float32) / 255.0))
  return features


# ----------------------------------------------------------------------------- evaluation
def evaluate(predict, params, images: np.ndarray, batch_size: int, data_sharding) -> np.ndarray:
  """Predictions for every image, in batches (the last one padded)."""
  outs = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
    out = np.asarray(jax.device_get(predict(params, jax.device_put(chunk, data_sharding))))
    outs.append(out[:batch_size - pad])
  return np.concatenate(outs)


def cls_scores(labels: np.ndarray, probs: np.ndarray) -> dict:
  """Every classification metric on one split (two classes: the positive class's probability)."""
  k = probs.shape[1]
  s = probs[:, 1] if k == 2 else probs
  preds = probs.argmax(axis=1)
  avg = "binary" if k == 2 else "macro"
  return {"auroc": metrics.auroc(labels, s), "average_precision": metrics.average_precision(labels, s),
          "accuracy": metrics.accuracy(labels, preds),
          "f1": metrics.f1(labels, preds, average=avg, num_classes=k),
          "precision": metrics.precision(labels, preds, average=avg, num_classes=k),
          "recall": metrics.recall(labels, preds, average=avg, num_classes=k),
          "specificity": metrics.specificity(labels, preds, average=avg, num_classes=k),
          "npv": metrics.npv(labels, preds, average=avg, num_classes=k),
          "ece": metrics.expected_calibration_error(labels, probs)}


def seg_per_image(targets: np.ndarray, preds: np.ndarray, num_classes: int, spacing=None,
                  nsd_tolerance: float = 2.0) -> dict:
  """Per-image SEG_METRICS, each averaged over the foreground classes. [N] each.

  spacing: [N, 2] (row, column) mm per input pixel (TaskData.spacing), so hd95 / asd are in mm
  and the surface Dice tolerance is `nsd_tolerance` mm; None: all three in input pixels.
  """
  spacing = (1.0, 1.0) if spacing is None else spacing
  out = {name: [] for name in SEG_METRICS}
  for c in range(1, num_classes):
    p, t = preds == c, targets == c
    out["dice"].append(metrics.dice(p, t))
    out["iou"].append(metrics.iou(p, t))
    out["hd95"].append(metrics.hd95(p, t, spacing))
    out["asd"].append(metrics.average_surface_distance(p, t, spacing))
    out["nsd"].append(metrics.surface_dice(p, t, nsd_tolerance, spacing))
  with warnings.catch_warnings():  # nanmean of all-nan columns (hd95 with one mask empty)
    warnings.simplefilter("ignore", RuntimeWarning)
    return {k: np.nanmean(np.stack(v), axis=0) for k, v in out.items()}


def split_scores(task_type, targets, outputs, num_classes, spacing=None,
                 nsd_tolerance: float = 2.0) -> dict:
  if task_type == "cls":
    return cls_scores(targets, outputs)
  per_image = seg_per_image(targets, outputs, num_classes, spacing, nsd_tolerance)
  return {k: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
          for k, v in per_image.items()}


def test_report(task_type, targets, outputs, num_classes, num_samples: int, seed: int,
                spacing=None, nsd_tolerance: float = 2.0) -> dict:
  """{metric: [estimate, low, high]} with percentile-bootstrap 95% CIs over test images, every
  metric scored on the same resampled images (one bootstrap for all)."""
  if task_type == "cls":
    cis = metrics.bootstrap_cis(cls_scores, targets, outputs, num_samples=num_samples, seed=seed)
    return {name: list(v) for name, v in cis.items()}
  per_image = seg_per_image(targets, outputs, num_classes, spacing, nsd_tolerance)
  table = np.stack([per_image[name] for name in SEG_METRICS], axis=1)  # [N, M]
  report = {name: list(v) for name, v in metrics.bootstrap_cis(
      seg_means, table, num_samples=num_samples, seed=seed).items()}
  report["hd95_undefined_images"] = int(np.sum(~np.isfinite(per_image["hd95"])))
  report["distance_unit"] = "px" if spacing is None else "mm"
  return report


def seg_means(table: np.ndarray) -> dict:
  """{metric: mean over images} of a per-image table [N, len(SEG_METRICS)]; images where a
  metric is undefined (nan: one mask empty) are left out."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return dict(zip(SEG_METRICS, np.nanmean(table, axis=0)))


def blurred(images_u8: np.ndarray, sigma: float, chunk: int = 64) -> np.ndarray:
  """[N, S, S, 3] uint8 under a Gaussian blur of `sigma` input pixels (scipy's reflect borders),
  rounded back to uint8; sigma 0 returns the images."""
  if sigma == 0:
    return images_u8
  return np.concatenate([np.clip(np.round(np.asarray(corruption.gaussian_blur(
      jnp.asarray(images_u8[i:i + chunk], jnp.float32), float(sigma)))), 0, 255).astype(np.uint8)
      for i in range(0, len(images_u8), chunk)])


def test_extras(config, programs, params, data: tasks.TaskData, test_idx: np.ndarray,
                outputs: np.ndarray, report: dict, run_dir: pathlib.Path, batch: int,
                first_cell: bool) -> dict:
  """What a cell adds beside its test report: test_outputs.npz (what the study's paired tests
  read), the precision-recall curve (UltraFedFM Fig. 6), t-SNE of the test features in the first
  cell of each variant (URFM Fig. 6), and the metrics under test-time blur (UltraFedFM Fig. 5e-f,
  eval.blur_sigmas) with blur.png. Returns the entries to add to results.json."""
  targets, spacing = data.targets[test_idx], _spacing(data, test_idx)
  if config.task_type == "cls":
    np.savez(run_dir / "test_outputs.npz", test_index=test_idx, targets=targets, probs=outputs)
    plots.pr_curves(run_dir / "pr.png", targets, outputs, data.class_names,
                    title=f"test precision-recall ({run_dir.parent.parent.name})")
    if first_cell:
      feats = evaluate(jax.jit(make_features_fn(programs.graphdef)), params,
                       data.images[test_idx], batch, programs.data_sharding)
      embedding.save_tsne(run_dir / "tsne.png", feats, targets, data.class_names,
                          title=f"t-SNE of test features ({run_dir.parent.parent.name})")
  else:
    per_image = seg_per_image(targets, outputs, data.num_classes, spacing,
                              config.eval.nsd_tolerance)
    np.savez(run_dir / "test_outputs.npz", test_index=test_idx,
             per_image=np.stack([per_image[name] for name in SEG_METRICS], axis=1))
  sigmas = [float(x) for x in config.eval.blur_sigmas]
  if not sigmas:
    return {}
  blur = {}
  for sigma in sigmas:
    out = evaluate(programs.predict, params, blurred(data.images[test_idx], sigma), batch,
                   programs.data_sharding)
    blur[f"{sigma:g}"] = split_scores(config.task_type, targets, out, data.num_classes, spacing,
                                      config.eval.nsd_tolerance)
  select = config.train.select_metric
  xs = sorted({0.0, *sigmas})
  plots.metric_curve(run_dir / "blur.png", xs, {select: [
      report[select][0] if x == 0 else blur[f"{x:g}"][select] for x in xs]},
      xlabel="test-time Gaussian blur sigma (pixels)", ylabel=f"test {select}",
      title=f"blur stability ({run_dir.parent.parent.name})")
  return {"blur": blur}


def _spacing(data: tasks.TaskData, idx: np.ndarray):
  """[len(idx), 2] mm per input pixel of those images, or None where the task has no pixel size."""
  return None if data.spacing is None else data.spacing[idx]


def better(metric: str, new: float, old: float) -> bool:
  if not math.isfinite(new):
    return False
  if not math.isfinite(old):
    return True
  return new < old if metric in LOWER_IS_BETTER else new > old


# ----------------------------------------------------------------------------- one run
def _replicate(x, mesh):
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding.replicated(mesh), lambda i: x[i])


def _atomic_json(path: pathlib.Path, obj) -> None:
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(obj, indent=1))
  os.replace(tmp, path)


class Programs:
  """The jitted epoch and prediction functions of one (config, classes, steps, batch, mesh).

  Cells of a study that differ only in seed, variant or label fraction with the same number of
  steps share them, so a study compiles once per shape rather than once per cell.
  """
  _cache: dict = {}

  @classmethod
  def get(cls, config, num_classes: int, steps_per_epoch: int, batch: int, mesh) -> "Programs":
    key = (config.to_json(), num_classes, steps_per_epoch, batch, mesh)
    if key not in cls._cache:
      cls._cache.clear()  # one study shape at a time; old executables are not kept alive
      cls._cache[key] = cls(config, num_classes, steps_per_epoch, batch, mesh)
    return cls._cache[key]

  def __init__(self, config, num_classes: int, steps_per_epoch: int, batch: int, mesh):
    abstract = nnx.eval_shape(lambda: build_model(config, num_classes, 0))
    graphdef, params = nnx.split(abstract, nnx.Param)
    self.graphdef = graphdef
    params = nnx.to_pure_dict(params)
    # Once per study shape (cells of one shape share these programs).
    parameter_overview.log_parameter_overview(params, include_stats=False,
                                              msg="Fine-tuning model parameters")
    _, depth, _, _ = vit.model_dims(config.model)
    total_steps = steps_per_epoch * config.train.num_epochs
    self.peak_lr = config.optim.base_lr * (batch / 256 if config.optim.scale_lr_by_batch else 1.0)
    warmup_steps = min(int(config.optim.warmup_epochs * steps_per_epoch), total_steps - 1)
    self.schedule = optax.warmup_cosine_decay_schedule(
        0.0, self.peak_lr, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=config.optim.min_lr)
    self.tx = tx = optimizer.finetune_adamw(config.optim, params, schedule=self.schedule,
                                            depth=depth,
                                            trainable=trainable_mask(params, config.mode))
    self.replicated = sharding.replicated(mesh)
    self.data_sharding = data_sharding = NamedSharding(mesh, P("data"))
    loss_fn = make_loss_fn(graphdef, config, num_classes)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, images, targets, idx, key, class_weights):
      """One step on the training images at `idx` [B]."""
      x = jax.lax.with_sharding_constraint(images[idx], data_sharding)
      y = jax.lax.with_sharding_constraint(targets[idx], data_sharding)
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y, key, class_weights)
      finite = divergence.all_finite((loss, grads))
      updates, new_opt = tx.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      if config.on_nonfinite == "skip":  # drop the update (train/divergence.py)
        new_params, new_opt = divergence.keep_if(finite, (new_params, new_opt),
                                                 (params, opt_state))
      return new_params, new_opt, jnp.where(finite, loss, jnp.nan)

    def run_epoch(params, opt_state, images, targets, order, epoch_key, class_weights):
      """One epoch over `order` [steps, B] of training indices; returns the step losses
      [steps] (NaN where the loss or gradient was not finite).

      A host loop over a jitted step rather than a `lax.scan`: XLA:CPU ran the scanned
      segmentation step about 15x slower than the same step on its own (measured), and the
      per-step dispatch is negligible next to a training step.
      """
      losses = []
      for i in range(order.shape[0]):
        params, opt_state, loss = train_step(params, opt_state, images, targets, order[i],
                                             jax.random.fold_in(epoch_key, i), class_weights)
        losses.append(loss)
      return params, opt_state, jnp.stack(losses)

    self.run_epoch = run_epoch
    self.predict = jax.jit(make_predict_fn(graphdef))


def train_one(config, data: tasks.TaskData, run_dir: pathlib.Path, *, init_path: str,
              fraction: float, seed: int, mesh) -> dict:
  """Trains and tests one cell of the study; returns (and writes) its results."""
  run_dir.mkdir(parents=True, exist_ok=True)
  train_idx = tasks.train_subset(data, fraction, config.data.split_seed)
  val_idx, test_idx = data.indices("val"), data.indices("test")
  devices = mesh.shape["data"]
  batch = min(config.train.batch_size, len(train_idx)) // devices * devices
  if batch < 1:
    raise configlib.ConfigError(f"{len(train_idx)} training images (fraction {fraction}) cannot "
                                f"fill one batch over {devices} devices")
  steps_per_epoch = len(train_idx) // batch  # drop_last, as MAE's fine-tuning loader
  num_epochs = config.train.num_epochs

  programs = Programs.get(config, data.num_classes, steps_per_epoch, batch, mesh)
  model = build_model(config, data.num_classes, seed)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if init_path:
    prefix = ("encoder",) if config.task_type == "seg" else ()
    params = interop_load.load_encoder(init_path, params, prefix=prefix)
  else:
    logging.info("No init_from: training from scratch.")
  params = jax.device_put(params, programs.replicated)
  opt_state = jax.device_put(programs.tx.init(params), programs.replicated)
  run_epoch, predict, schedule = programs.run_epoch, programs.predict, programs.schedule
  data_sharding, lr = programs.data_sharding, programs.peak_lr
  train_images = _replicate(data.images[train_idx], mesh)
  train_targets = _replicate(data.targets[train_idx], mesh)
  class_weights = np.ones(data.num_classes, np.float32)
  if config.task_type == "cls" and config.loss.class_weights == "balanced":
    class_weights = balanced_class_weights(data.targets[train_idx], data.num_classes)
    logging.info("Class weights (balanced over the training images): %s",
                 dict(zip(data.class_names, np.round(class_weights, 3).tolist())))
  class_weights = _replicate(class_weights, mesh)
  select = config.train.select_metric

  ckpt = checkpoint.Checkpointer(run_dir, keep=1)
  # A copy: `params` itself is donated to the first epoch.
  state = {"opt_state": opt_state, "best_params": jax.tree.map(jnp.copy, params),
           "best": jnp.asarray(math.nan, jnp.float32), "best_epoch": jnp.asarray(0, jnp.int32)}
  start = 0
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          (params, state))
  cell = cell_config(config)
  restored = resume.restore_latest(ckpt, abstract[0], abstract[1], None, config=cell,
                                   allow=resume.allowed_changes(config))
  if restored is not None:
    start, params, state, _ = restored
    logging.info("%s: resumed after epoch %d", run_dir, start)
  writers.truncate_jsonl(run_dir / "metrics.jsonl", start, key="epoch")
  writer = writers.create_writer(run_dir)
  run_key = jax.random.key(seed)
  logging.info("%s: %d train (fraction %g) / %d val / %d test images, batch %d, %d steps per "
               "epoch, %d epochs, peak lr %.3g", run_dir, len(train_idx), fraction, len(val_idx),
               len(test_idx), batch, steps_per_epoch, num_epochs, lr)
  opt_state = state["opt_state"]
  best, best_epoch = float(state["best"]), int(state["best_epoch"])
  best_params = state["best_params"]
  # Epochs per second and this cell's ETA in the log (from the second epoch on).
  progress = periodic_actions.ReportProgress(num_train_steps=num_epochs, every_steps=1)
  try:
    for epoch in range(start, num_epochs):
      t0 = time.time()
      order = np.random.default_rng([seed, epoch]).permutation(len(train_idx))
      order = order[:steps_per_epoch * batch].reshape(steps_per_epoch, batch)
      params, opt_state, losses = run_epoch(params, opt_state, train_images, train_targets,
                                            jnp.asarray(order), jax.random.fold_in(run_key, epoch),
                                            class_weights)
      losses = np.asarray(losses)
      valid = divergence.screen(losses, np.ones(losses.shape, bool),
                                where=f"{run_dir}: epoch {epoch + 1}", mode=config.on_nonfinite)
      loss = float(losses[valid].mean())
      row = {"epoch": epoch + 1, "train_loss": loss,
             "lr": float(schedule((epoch + 1) * steps_per_epoch - 1)),
             "img_per_s": steps_per_epoch * batch / (time.time() - t0)}
      if config.on_nonfinite == "skip":
        row["skipped_steps"] = int(losses.size - valid.sum())
      if (epoch + 1) % config.train.eval_every_epochs == 0 or epoch + 1 == num_epochs:
        outputs = evaluate(predict, params, data.images[val_idx], batch, data_sharding)
        val = split_scores(config.task_type, data.targets[val_idx], outputs, data.num_classes,
                           _spacing(data, val_idx), config.eval.nsd_tolerance)
        row.update({f"val_{k}": v for k, v in val.items()})
        if better(select, val[select], best):
          best, best_epoch = val[select], epoch + 1
          best_params = jax.tree.map(jnp.copy, params)
      writer.write_scalars(epoch + 1, row)
      logging.info("%s epoch %d/%d: loss %.4f%s", run_dir.name, epoch + 1, num_epochs, loss,
                   "".join(f", {k} {v:.4f}" for k, v in row.items() if k.startswith("val_")))
      progress(epoch + 1)
      if (epoch + 1) % config.ckpt_every_epochs == 0 or epoch + 1 == num_epochs:
        state = {"opt_state": opt_state, "best_params": best_params,
                 "best": jnp.asarray(best, jnp.float32), "best_epoch": jnp.asarray(best_epoch, jnp.int32)}
        ckpt.save(epoch + 1, params, state, None, {"epoch": epoch + 1, "config": json.dumps(cell)})
  finally:  # a crash still finishes the last save and releases the checkpoint manager
    ckpt.close()
    writer.close()
  if best_epoch == 0:  # validation never gave a finite score: test the last parameters
    best_params = params

  outputs = evaluate(predict, best_params, data.images[test_idx], batch, data_sharding)
  targets = data.targets[test_idx]
  report = test_report(config.task_type, targets, outputs, data.num_classes,
                       config.eval.bootstrap_samples, seed, _spacing(data, test_idx),
                       config.eval.nsd_tolerance)
  if config.task_type == "cls":
    plots.roc_curves(run_dir / "roc.png", targets, outputs, data.class_names,
                     title=f"test ROC ({run_dir.parent.parent.name}, seed {seed})")
    plots.confusion(run_dir / "confusion.png",
                    metrics.confusion_matrix(targets, outputs.argmax(1), data.num_classes),
                    data.class_names)
  else:
    per_image = seg_per_image(targets, outputs, data.num_classes)["dice"]
    plots.seg_overlays(run_dir / "overlays.png", data.images[test_idx], targets, outputs,
                       scores=per_image)
  extras = test_extras(config, programs, best_params, data, test_idx, outputs, report, run_dir,
                       batch, first_cell=seed == config.seed and fraction == config.fractions[0])
  results = {"test": report, "best_val": best, "best_epoch": best_epoch, "select_metric": select,
             "num_train": int(len(train_idx)), "num_val": int(len(val_idx)),
             "num_test": int(len(test_idx)), "fraction": fraction, "seed": seed,
             "init_from": init_path, "class_names": list(data.class_names), "config": cell,
             **extras}
  _atomic_json(run_dir / "results.json", results)
  return results


# ----------------------------------------------------------------------------- study
def reference_variant(study: list[tuple[str, str]]) -> str:
  """The variant every other one is tested against: 'scratch' if the study has it, else the first."""
  names = [name for name, _ in study]
  return "scratch" if "scratch" in names else names[0]


def paired_cell_tests(cell: dict, ref: dict, num_samples: int) -> dict:
  """{metric: {'bootstrap': p[, 'delong': p]}} of a cell against the reference variant's cell of
  the same seed and fraction, paired over their saved test outputs (the same test images):
  paired bootstrap of every metric, and DeLong for a binary AUROC. {} when either cell saved no
  outputs or their test images differ."""
  paths = [pathlib.Path(c["run_dir"]) / "test_outputs.npz" for c in (cell, ref)]
  if not all(path.exists() for path in paths):
    return {}
  with np.load(paths[0]) as fa, np.load(paths[1]) as fb:
    a, b = dict(fa), dict(fb)
  if not np.array_equal(a["test_index"], b["test_index"]):
    return {}
  if "probs" in a:
    boot = significance.paired_bootstrap(cls_scores, a["targets"], a["probs"], b["probs"],
                                         num_samples=num_samples, seed=cell["seed"])
  else:
    boot = significance.paired_bootstrap(seg_means, None, a["per_image"], b["per_image"],
                                         num_samples=num_samples, seed=cell["seed"])
  out = {name: {"bootstrap": c.pvalue} for name, c in boot.items()}
  targets = a.get("targets")
  if "probs" in a and a["probs"].shape[1] == 2 and 0 < targets.sum() < len(targets):
    out["auroc"]["delong"] = significance.delong_test(targets, a["probs"][:, 1],
                                                      b["probs"][:, 1]).pvalue
  return out


def _cell_value(cell: dict, name: str) -> float:
  """A test metric ('auroc') or a blurred one ('auroc@blur2' = results['blur']['2']['auroc'];
  nan for a cell tested without that blur, e.g. one finished before eval.blur_sigmas was set)."""
  metric, _, sigma = name.partition("@blur")
  if sigma:
    return cell.get("blur", {}).get(sigma, {}).get(metric, math.nan)
  return cell["test"][metric][0]


def summarise(cells: list[dict], metric_names, reference: str | None = None,
              num_samples: int = 1000) -> list[dict]:
  """Rows of (variant, fraction, metric, mean, low, high, n, values) over seeds, and the tests
  against the `reference` variant at the same fraction: diff (mean over seeds of variant minus
  reference), p_ttest (two-sided paired t-test over seeds), and per seed (space-separated, as
  `values`) p_bootstrap (paired bootstrap over test images) and p_delong (binary AUROC), where
  the cells saved their test outputs. Cells tested under blur add rows 'metric@blur<sigma>'."""
  rows = []
  tests = {}
  refs = {(c["fraction"], c["seed"]): c for c in cells if c["variant"] == reference}
  for c in cells:
    ref = refs.get((c["fraction"], c["seed"]))
    if c["variant"] != reference and ref is not None and "run_dir" in c and "run_dir" in ref:
      tests[(c["variant"], c["fraction"], c["seed"])] = paired_cell_tests(c, ref, num_samples)
  keys = sorted({(c["variant"], c["fraction"]) for c in cells}, key=lambda k: (k[0], -k[1]))
  for variant, fraction in keys:
    group = sorted((c for c in cells if c["variant"] == variant and c["fraction"] == fraction),
                   key=lambda c: c["seed"])
    blur_names = [f"{m}@blur{s}" for s in (group[0].get("blur") or {}) for m in metric_names
                  if all(s in c.get("blur", {}) for c in group)]
    ref_group = [refs.get((fraction, c["seed"])) for c in group]
    compare = variant != reference and all(r is not None for r in ref_group)
    for name in (*metric_names, *blur_names):
      values = np.array([_cell_value(c, name) for c in group], np.float64)
      mean, low, high = metrics.mean_ci(values, bounds=metrics.metric_range(name.split("@")[0]))
      row = {"variant": variant, "fraction": fraction, "metric": name, "mean": mean,
             "ci_low": low, "ci_high": high, "num_seeds": len(values),
             "values": " ".join(f"{v:.4f}" for v in values),
             "reference": reference if compare else "", "diff": math.nan, "p_ttest": math.nan,
             "p_bootstrap": "", "p_delong": ""}
      if compare:
        t = significance.paired_ttest(values, [_cell_value(r, name) for r in ref_group])
        per_seed = [tests.get((variant, fraction, c["seed"]), {}).get(name, {}) for c in group]
        row.update(diff=t.diff, p_ttest=t.pvalue, **{
            f"p_{kind}": " ".join(f"{p[kind]:.4g}" for p in per_seed if kind in p)
            for kind in ("bootstrap", "delong")})
      rows.append(row)
  return rows


def write_summary(workdir: pathlib.Path, rows: list[dict], select: str) -> None:
  with open(workdir / "summary.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  fractions = sorted({r["fraction"] for r in rows})
  if len(fractions) > 1:
    curves = {}
    for r in rows:
      if r["metric"] == select:
        curves.setdefault(r["variant"], []).append((r["fraction"], r["mean"], r["ci_low"],
                                                    r["ci_high"]))
    plots.label_efficiency(workdir / "label_efficiency.png", curves, select)


def load_data(config) -> tasks.TaskData:
  return tasks.load_task(config.data, config.task_type, config.model.image_size)


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
  data = load_data(config)
  study = variants(config)
  for name, path in study:
    if path and not pathlib.Path(path).exists():
      raise FileNotFoundError(f"pretraining variant {name!r}: nothing at {path}")
  cells = []
  total = len(study) * len(config.fractions) * config.num_seeds
  for name, path in study:
    for fraction in config.fractions:
      for s in range(config.num_seeds):
        seed = config.seed + s
        run_dir = workdir / name / f"frac_{fraction:g}" / f"seed_{seed}"
        done = run_dir / "results.json"
        if done.exists():
          result = json.loads(done.read_text())
          resume.check_config(result.get("config"), cell_config(config), where=str(done),
                              allow=resume.allowed_changes(config))
          logging.info("%s: finished earlier, read back", run_dir)
        else:
          logging.info("Study cell %d of %d: variant %s, fraction %g, seed %d", len(cells) + 1,
                       total, name, fraction, seed)
          result = train_one(config, data, run_dir, init_path=path, fraction=fraction,
                             seed=seed, mesh=mesh)
        cells.append({"variant": name, "run_dir": str(run_dir), **result})
        test = result["test"]
        logging.info("  test: %s", ", ".join(f"{k} {v[0]:.4f} [{v[1]:.4f}, {v[2]:.4f}]"
                                              for k, v in test.items() if isinstance(v, list)))
  names = CLS_METRICS if config.task_type == "cls" else SEG_METRICS
  rows = summarise(cells, names, reference_variant(study), config.eval.bootstrap_samples)
  if jax.process_index() == 0:
    write_summary(workdir, rows, config.train.select_metric)
  logging.info("Test metrics, mean [95%% CI] over %d seed(s):", config.num_seeds)
  for r in rows:
    logging.info("  %-12s frac %-4g %-18s %.4f [%.4f, %.4f]", r["variant"], r["fraction"],
                 r["metric"], r["mean"], r["ci_low"], r["ci_high"])
  return rows
