"""UltraSam's training objective: simulated prompts, losses, best-IoU selection, refinement.

Coordinates follow segment_anything: (x, y) in pixels of the resized [S, S] model input, where
pixel (row i, col j) is the point (j, i) (the prompt encoder adds 0.5 to reach its centre).
A prompt is two slots with segment_anything's label codes, so every instance has the same
shape whatever its type (as UltraSam's official packing does):
  point: coords [[x, y], [0, 0]], labels [1, -1]   (positive click, not-a-point pad)
  box:   coords [[x0, y0], [x1, y1]], labels [2, 3] (top-left and bottom-right corners)

Training prompts (paper section 2.3, seed_systems.md 3.2): per instance a point uniform inside
the mask or, with p = 0.5, its box with each corner coordinate moved by U[-5%, 5%] of the box
width / height. Evaluation prompts: the mask's centroid (which may fall outside a non-convex
mask) or the exact box. Losses on the decoder's low-res logits (`mask_losses`, `sam_loss`):
focal x 20 + dice x 1 + IoU-head error x 1, on the multimask output with the best IoU against
the ground truth, and with refinement also on pass 1's single-mask output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

POINT_LABELS = (1, -1)
BOX_LABELS = (2, 3)
IOU_LOSSES = ("l1", "mse")  # 'l1': the paper's text (default); 'mse': the official code
# Which predicted IoUs are trained: 'all' candidates of a pass (SAM; what the paper's "each
# with a corresponding predicted IoU ... allowing selection of the best" needs at test time)
# or only the 'selected' one (UltraSam's official code, which leaves the others untrained).
IOU_ON = ("all", "selected")


class Prompts(NamedTuple):
  coords: jax.Array  # float32 [..., 2, 2] (x, y) per slot
  labels: jax.Array  # int32 [..., 2]


def mask_boxes(masks):
  """masks: bool [N, H, W] -> int32 [N, 4] (x0, y0, x1, y1), inclusive pixel indices
  (segment_anything's batched_mask_to_box); an empty mask gives [0, 0, 0, 0]."""

  def extent(any_along):  # [N, L] -> first and last index with True
    idx = jnp.arange(any_along.shape[-1])
    first = jnp.min(jnp.where(any_along, idx, any_along.shape[-1]), axis=-1)
    last = jnp.max(jnp.where(any_along, idx, -1), axis=-1)
    empty = ~any_along.any(-1)
    return jnp.where(empty, 0, first), jnp.where(empty, 0, last)

  x0, x1 = extent(masks.any(axis=1))
  y0, y1 = extent(masks.any(axis=2))
  return jnp.stack([x0, y0, x1, y1], axis=-1).astype(jnp.int32)


def _point_prompt(xy):
  """xy: [N, 2] -> Prompts with the point in slot 0 and a not-a-point pad in slot 1."""
  coords = jnp.stack([xy, jnp.zeros_like(xy)], axis=1)
  labels = jnp.broadcast_to(jnp.asarray(POINT_LABELS, jnp.int32), xy.shape[:1] + (2,))
  return Prompts(coords.astype(jnp.float32), labels)


def _box_prompt(boxes):
  """boxes: [N, 4] -> Prompts with the two corners."""
  coords = boxes.reshape(boxes.shape[0], 2, 2).astype(jnp.float32)
  labels = jnp.broadcast_to(jnp.asarray(BOX_LABELS, jnp.int32), boxes.shape[:1] + (2,))
  return Prompts(coords, labels)


def random_points(key, masks):
  """One point uniform over each mask's area.  masks: bool [N, H, W] -> float32 [N, 2] (x, y).

  A pixel is drawn uniformly among the mask's pixels (Gumbel-max over the flattened mask, static
  shapes), then the point uniformly inside that pixel's square (centre +- 0.5). Empty masks
  give some point; their instances are invalid and carry no loss.
  """
  n, h, w = masks.shape
  k_pixel, k_sub = jax.random.split(key)
  gumbel = jax.random.gumbel(k_pixel, (n, h * w))
  flat = jnp.argmax(jnp.where(masks.reshape(n, -1), gumbel, -jnp.inf), axis=-1)
  xy = jnp.stack([flat % w, flat // w], axis=-1).astype(jnp.float32)
  return xy + jax.random.uniform(k_sub, (n, 2), minval=-0.5, maxval=0.5)


def jittered_boxes(key, masks, max_jitter: float = 0.05):
  """Each mask's box with every corner coordinate moved by U[-j, j] x the box's width (x) or
  height (y), j = max_jitter.  masks: bool [N, H, W] -> float32 [N, 4] (x0, y0, x1, y1)."""
  box = mask_boxes(masks).astype(jnp.float32)
  size = box[:, 2:] - box[:, :2] + 1  # w, h
  scale = jnp.concatenate([size, size], axis=-1)
  return box + jax.random.uniform(key, box.shape, minval=-max_jitter, maxval=max_jitter) * scale


def training_prompts(key, masks, p_box: float = 0.5, max_jitter: float = 0.05) -> Prompts:
  """Per instance a random point inside the mask or (probability p_box) a jittered box.

  masks: bool [N, H, W] -> Prompts coords [N, 2, 2], labels [N, 2].
  """
  k_type, k_point, k_box = jax.random.split(key, 3)
  is_box = jax.random.bernoulli(k_type, p_box, masks.shape[:1])
  point = _point_prompt(random_points(k_point, masks))
  box = _box_prompt(jittered_boxes(k_box, masks, max_jitter))
  pick = lambda b, p: jnp.where(is_box.reshape((-1,) + (1,) * (b.ndim - 1)), b, p)
  return Prompts(pick(box.coords, point.coords), pick(box.labels, point.labels))


def centroid_prompts(masks) -> Prompts:
  """Evaluation: the mean pixel position of each mask.  masks: bool [N, H, W] -> Prompts."""
  n, h, w = masks.shape
  m = masks.astype(jnp.float32)
  area = jnp.maximum(m.sum((1, 2)), 1.0)
  x = (m * jnp.arange(w, dtype=jnp.float32)).sum((1, 2)) / area
  y = (m * jnp.arange(h, dtype=jnp.float32)[:, None]).sum((1, 2)) / area
  return _point_prompt(jnp.stack([x, y], axis=-1))


def box_prompts(masks) -> Prompts:
  """Evaluation: each mask's exact box.  masks: bool [N, H, W] -> Prompts."""
  return _box_prompt(mask_boxes(masks))


def prompts_for_batch(fn: Callable, key, masks) -> Prompts:
  """Applies a per-image prompt function over a batch.  masks: [B, M, H, W] -> [B, M, 2, 2]."""
  if key is None:
    return jax.vmap(fn)(masks)
  return jax.vmap(fn)(jax.random.split(key, masks.shape[0]), masks)


# ----------------------------------------------------------------------------- targets, losses
def low_res_targets(masks, size: int):
  """Ground truth at the decoder's resolution: [..., S, S] {0,1} -> float32 [..., s, s], s =
  size, bilinear (no antialiasing, as torch's F.interpolate) then rounded (official code)."""
  m = masks.astype(jnp.float32)
  out = jax.image.resize(m, m.shape[:-2] + (size, size), "bilinear", antialias=False)
  return jnp.round(out)


def focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
  """Sigmoid focal loss, mean over pixels.  logits, targets: [..., H, W] -> [...]."""
  p = jax.nn.sigmoid(logits)
  ce = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  p_t = p * targets + (1 - p) * (1 - targets)
  alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
  return (alpha_t * ce * (1 - p_t) ** gamma).mean((-2, -1))


def dice_loss(logits, targets, eps: float = 1.0):
  """mmdet's DiceLoss (sigmoid, non-naive): 1 - 2 sum(p t) / (sum p^2 + eps + sum t^2 + eps).

  logits, targets: [..., H, W] -> [...].
  """
  p = jax.nn.sigmoid(logits)
  inter = (p * targets).sum((-2, -1))
  return 1 - 2 * inter / ((p * p).sum((-2, -1)) + eps + (targets * targets).sum((-2, -1)) + eps)


def mask_iou(logits, targets):
  """IoU of the mask logits > 0 against {0,1} targets.  [..., H, W] -> [...]; 0 when both are
  empty (no overlap to reward)."""
  pred = logits > 0
  gt = targets > 0.5
  inter = (pred & gt).sum((-2, -1))
  union = (pred | gt).sum((-2, -1))
  return jnp.where(union > 0, inter / jnp.maximum(union, 1), 0.0).astype(jnp.float32)


def select_best(logits, iou_pred, targets):
  """Of K candidate masks keep the one with the highest IoU against the ground truth
  (UltraSam's rule, not SAM's minimum loss).

  logits: [N, K, H, W]; iou_pred: [N, K]; targets: [N, H, W] ->
  (logits [N, H, W], iou_pred [N], actual IoU [N]).
  """
  ious = mask_iou(logits, targets[:, None])
  best = jnp.argmax(ious, axis=1)
  take = lambda x: jnp.take_along_axis(x, best.reshape((-1,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]
  return take(logits), take(iou_pred), take(ious)


def _iou_error(iou_pred, logits, targets, iou_loss: str):
  """Per-mask error of the predicted IoU against the actual one (no gradient through it)."""
  diff = iou_pred - jax.lax.stop_gradient(mask_iou(logits, targets))
  return diff * diff if iou_loss == "mse" else jnp.abs(diff)


def mask_losses(
  logits, iou_pred, targets, valid, weights=(20.0, 1.0, 1.0), iou_loss: str = "l1", iou_error=None
):
  """UltraSam's loss on one mask per instance.

  logits: [N, H, W]; iou_pred: [N]; targets: [N, H, W] {0,1}; valid: bool [N];
  iou_error: [N] to use instead of the selected mask's IoU error (e.g. a mean over candidates).
  Returns dict of focal, dice, iou (means over valid instances) and loss (their weighted sum).
  """
  if iou_loss not in IOU_LOSSES:
    raise ValueError(f"iou_loss={iou_loss!r} is not one of {IOU_LOSSES}")
  if iou_error is None:
    iou_error = _iou_error(iou_pred, logits, targets, iou_loss)
  per = dict(focal=focal_loss(logits, targets), dice=dice_loss(logits, targets), iou=iou_error)
  count = jnp.maximum(valid.sum(), 1)
  out = {k: jnp.where(valid, v, 0.0).sum() / count for k, v in per.items()}
  out["loss"] = weights[0] * out["focal"] + weights[1] * out["dice"] + weights[2] * out["iou"]
  return out


class DecoderOutput(NamedTuple):
  logits: jax.Array  # [N, 4, s, s]: token 0 single-mask, tokens 1..3 multimask
  iou_pred: jax.Array  # [N, 4]


def instance_decoder(model, embeddings, num_per_image: int) -> Callable:
  """decode(prompts [B*M], mask logits [B*M, s, s] | None) -> DecoderOutput, each instance
  decoded against its own image's embedding. model: models/sam.py Sam; embeddings: [B, g, g,
  C]. Two-slot prompts need no extra padding point: a point prompt already carries its pad."""
  image = jnp.repeat(embeddings, num_per_image, axis=0)
  pe = model.prompt_encoder

  def decode(prompts: Prompts, mask_logits):
    sparse = pe.embed_points(prompts.coords, prompts.labels)
    out = model.decode(image, sparse, pe.embed_masks(mask_logits, prompts.coords.shape[0]))
    return DecoderOutput(out.masks, out.iou)

  return decode


def sam_loss(
  decode: Callable,
  prompts: Prompts,
  targets,
  valid,
  *,
  refine: bool,
  weights=(20.0, 1.0, 1.0),
  iou_loss: str = "l1",
  iou_on: str = "all",
):
  """The whole objective for a set of instances.

  decode(prompts, mask_logits [N, s, s] | None) -> DecoderOutput (all four mask tokens);
  targets: float32 [N, s, s]; valid: bool [N]. Returns (loss, metrics dict).
  Without refinement: one pass, best-IoU multimask output. With it: pass 1 single-mask output,
  its logits (not detached) feed pass 2 (best-IoU multimask); the losses add. iou_on (IOU_ON):
  the multimask pass trains every candidate's predicted IoU (mean error) or the selected one's.
  """
  if iou_on not in IOU_ON:
    raise ValueError(f"iou_on={iou_on!r} is not one of {IOU_ON}")

  def multimask_loss(out):
    logits, iou_pred, _ = select_best(out.logits[:, 1:], out.iou_pred[:, 1:], targets)
    error = None
    if iou_on == "all":
      error = _iou_error(out.iou_pred[:, 1:], out.logits[:, 1:], targets[:, None], iou_loss).mean(1)
    return mask_losses(logits, iou_pred, targets, valid, weights, iou_loss, error)

  first = decode(prompts, None)
  if not refine:
    out = multimask_loss(first)
    return out["loss"], out
  single = mask_losses(first.logits[:, 0], first.iou_pred[:, 0], targets, valid, weights, iou_loss)
  refined = multimask_loss(decode(prompts, first.logits[:, 0]))
  metrics = {**single, **{f"{k}_refined": v for k, v in refined.items()}}
  metrics["loss"] = single["loss"] + refined["loss"]
  return metrics["loss"], metrics


# How the refinement pass prompts at test time (seed_systems.md 3.3). 'predicted_box': UltraSam's
# official code replaces a point prompt by the box around pass 1's mask; box prompts stay.
# 'same': pass 2 keeps the original prompt (SAM's own refinement; the paper's text is silent).
REFINE_PROMPTS = ("predicted_box", "same")


def predicted_box_prompts(prompts: Prompts, mask_logits, input_size: int) -> Prompts:
  """Point prompts -> the box around the mask `mask_logits > 0`, in model-input pixels.

  prompts: [N, 2, 2] / [N, 2]; mask_logits: [N, s, s] low-res logits of the [S, S] input,
  S = input_size. Low-res pixel i covers input pixels [i f, (i + 1) f), f = S / s, so the box
  is (x0 f, y0 f, (x1 + 1) f - 1, (y1 + 1) f - 1), inclusive like mask_boxes. Box prompts and
  points whose mask is empty keep their prompt.
  """
  masks = mask_logits > 0
  f = input_size / mask_logits.shape[-1]
  x0, y0, x1, y1 = jnp.moveaxis(mask_boxes(masks).astype(jnp.float32), -1, 0)
  box = _box_prompt(jnp.stack([x0 * f, y0 * f, (x1 + 1) * f - 1, (y1 + 1) * f - 1], axis=-1))
  is_point = (prompts.labels[:, 0] == POINT_LABELS[0]) & masks.any((-2, -1))
  pick = lambda b, p: jnp.where(is_point.reshape((-1,) + (1,) * (b.ndim - 1)), b, p)
  return Prompts(pick(box.coords, prompts.coords), pick(box.labels, prompts.labels))


def predict_masks(
  decode: Callable,
  prompts: Prompts,
  *,
  refine: bool,
  multimask: bool = True,
  refine_prompt: str = "predicted_box",
  input_size: int | None = None,
):
  """Evaluation: one mask per prompt, scored by the predicted IoU.

  Without refinement, one pass: with multimask, the multimask output with the highest predicted
  IoU (SAM's rule, and what a model trained without refinement learns); without, the
  single-mask output (token 0: what pass 1 of refinement training learns; its multimask
  outputs and their IoUs are only ever trained with a dense prompt). With refinement: the
  single-mask output's logits become the dense prompt of a second, multimask pass, whose
  sparse prompt is chosen by refine_prompt (REFINE_PROMPTS; 'predicted_box' needs input_size,
  the model input's side S). Returns (logits [N, s, s], score [N]).
  """
  if refine_prompt not in REFINE_PROMPTS:
    raise ValueError(f"refine_prompt={refine_prompt!r} is not one of {REFINE_PROMPTS}")
  out = decode(prompts, None)
  if refine:
    first = out.logits[:, 0]
    if refine_prompt == "predicted_box":
      if input_size is None:
        raise ValueError("refine_prompt='predicted_box' needs input_size (the model input's side)")
      prompts = predicted_box_prompts(prompts, first, input_size)
    out = decode(prompts, first)
  elif not multimask:
    return out.logits[:, 0], out.iou_pred[:, 0]
  rows, best = jnp.arange(len(out.iou_pred)), jnp.argmax(out.iou_pred[:, 1:], axis=1) + 1
  return out.logits[rows, best], out.iou_pred[rows, best]
