"""On-device augmentation for fine-tuning: crops, flips, rotations, RandAugment, random
erasing, mixup/cutmix.

All functions are pure JAX on float images in [0, 1] with explicit keys, so they run inside the
jitted training step (vmapped over the batch) and the same key gives the same image. Geometric
changes are one affine map per image, applied by inverse mapping with bilinear interpolation
(nearest for class maps) and zero fill, so a crop, flip and rotation cost one resampling.

Matrices are 3 x 3 in pixel-centre coordinates (row, col, 1) and map OUTPUT pixels to INPUT
pixels (the inverse warp).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy import ndimage


def _translate(dy, dx):
  return jnp.array([[1.0, 0.0, dy], [0.0, 1.0, dx], [0.0, 0.0, 1.0]])


def about_centre(linear, size: int):
  """A 2 x 2 linear map (output -> input offsets) as a 3 x 3 matrix fixing the image centre."""
  c = (size - 1) / 2.0
  m = jnp.eye(3).at[:2, :2].set(linear)
  return _translate(c, c) @ m @ _translate(-c, -c)


def rotation(angle_rad, size: int):
  cos, sin = jnp.cos(angle_rad), jnp.sin(angle_rad)
  return about_centre(jnp.array([[cos, -sin], [sin, cos]]), size)


def hflip(flip, size: int):
  """flip: bool scalar; mirrors columns when True."""
  s = jnp.where(flip, -1.0, 1.0)
  return about_centre(jnp.array([[1.0, 0.0], [0.0, 1.0]]) * jnp.array([1.0, s]), size)


def warp(image, matrix, order: int = 1):
  """image: [S, S, C] float; matrix: [3, 3] output -> input pixel coordinates. Returns
  [S, S, C] with zero outside the input (order 1 bilinear, 0 nearest)."""
  s = image.shape[0]
  rows, cols = jnp.meshgrid(
    jnp.arange(s, dtype=jnp.float32), jnp.arange(image.shape[1], dtype=jnp.float32), indexing="ij"
  )
  src = jnp.einsum("ij,jhw->ihw", matrix, jnp.stack([rows, cols, jnp.ones_like(rows)]))

  def one(channel):
    return ndimage.map_coordinates(
      channel, [src[0], src[1]], order=order, mode="constant", cval=0.0
    )

  return jax.vmap(one, in_axes=2, out_axes=2)(image)


def random_resized_crop(key, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision's RandomResizedCrop as a 3 x 3 matrix (area fraction uniform in `scale`,
  log-uniform aspect in `ratio`; a crop that does not fit is shrunk to fit, not redrawn)."""
  k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
  area = jax.random.uniform(k_area, (), minval=scale[0], maxval=scale[1]) * size * size
  log_r = jax.random.uniform(k_ratio, (), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
  aspect = jnp.exp(log_r)  # width / height
  h = jnp.clip(jnp.sqrt(area / aspect), 1.0, size)
  w = jnp.clip(jnp.sqrt(area * aspect), 1.0, size)
  top = jax.random.uniform(k_y, ()) * (size - h)
  left = jax.random.uniform(k_x, ()) * (size - w)
  # Output pixel centre i maps to top + (i + 0.5) * h / size - 0.5.
  return jnp.array(
    [
      [h / size, 0.0, top + 0.5 * h / size - 0.5],
      [0.0, w / size, left + 0.5 * w / size - 0.5],
      [0.0, 0.0, 1.0],
    ]
  )


# ------------------------------------------------------------------------------------------------
# RandAugment (timm's 'rand-m9-mstd0.5' family) on [0, 1] images


def _blend(a, b, factor):
  return jnp.clip(b + factor * (a - b), 0.0, 1.0)


def _grey(image):
  return image @ jnp.array([0.299, 0.587, 0.114])


def _autocontrast(image):
  lo = image.min(axis=(0, 1), keepdims=True)
  hi = image.max(axis=(0, 1), keepdims=True)
  return jnp.where(hi > lo, (image - lo) / jnp.maximum(hi - lo, 1e-6), image)


def _smooth(image):
  kernel = jnp.array([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
  pad = jnp.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
  return sum(
    kernel[i, j] * pad[i : i + image.shape[0], j : j + image.shape[1]]
    for i in range(3)
    for j in range(3)
  )


def rand_augment_one(key, image, num_ops: int, magnitude: float, magnitude_std: float = 0.5):
  """`num_ops` ops drawn uniformly (with repetition) from the 12 below, each with magnitude
  m ~ N(magnitude, magnitude_std) clipped to [0, 10] and a random sign where it has one.

  image: [S, S, 3] float in [0, 1] -> same. Equalize is left out (a histogram per image has
  no cheap static-shape form); autocontrast stands in for it.
  """
  size = image.shape[0]

  def apply(image, k):
    k_op, k_mag, k_sign = jax.random.split(k, 3)
    m = jnp.clip(magnitude + magnitude_std * jax.random.normal(k_mag), 0.0, 10.0) / 10.0
    sign = jnp.where(jax.random.bernoulli(k_sign), 1.0, -1.0)
    grey = _grey(image).mean()
    ops = [
      lambda x: x,
      _autocontrast,
      lambda x: jnp.where(x >= 1.0 - m, 1.0 - x, x),  # solarize above 1 - m
      lambda x: jnp.floor(x * 2.0 ** (8 - jnp.round(4 * m))) / 2.0 ** (8 - jnp.round(4 * m)),
      lambda x: _blend(x, grey, 1.0 + sign * 0.9 * m),  # contrast
      lambda x: _blend(x, 0.0, 1.0 + sign * 0.9 * m),  # brightness
      lambda x: _blend(x, _smooth(x), 1.0 + sign * 0.9 * m),  # sharpness
      lambda x: warp(x, rotation(sign * m * math.radians(30.0), size)),
      lambda x: warp(x, about_centre(jnp.array([[1.0, 0.0], [sign * 0.3 * m, 1.0]]), size)),
      lambda x: warp(x, about_centre(jnp.array([[1.0, sign * 0.3 * m], [0.0, 1.0]]), size)),
      lambda x: warp(x, _translate(sign * 0.45 * m * size, 0.0)),
      lambda x: warp(x, _translate(0.0, sign * 0.45 * m * size)),
    ]
    op = jax.random.randint(k_op, (), 0, len(ops))
    return jax.lax.switch(op, ops, image), None

  image, _ = jax.lax.scan(apply, image, jax.random.split(key, num_ops))
  return image


def random_erasing(
  key, image, prob: float, area=(0.02, 1 / 3), log_ratio=(-1.204, 1.204), attempts: int = 10
):
  """timm's RandomErasing(mode='pixel', max_count=1) on one normalised image (MAE fine-tuning's
  `reprob`): with probability `prob`, a rectangle of area U(area) x H x W and aspect
  exp(U(log_ratio)) (h / w; +-1.204 = log(1 / 0.3)) is filled with N(0, 1) noise, placed
  uniformly where it fits. Of `attempts` sizes drawn, the first that fits strictly inside is
  used (timm retries the same way); when none fits nothing is erased.

  image: [H, W, C] (after mean/std normalisation) -> [H, W, C].
  """
  height, width = image.shape[:2]
  k_do, k_area, k_ratio, k_y, k_x, k_noise = jax.random.split(key, 6)
  target = jax.random.uniform(k_area, (attempts,), minval=area[0], maxval=area[1]) * height * width
  ratio = jnp.exp(
    jax.random.uniform(k_ratio, (attempts,), minval=log_ratio[0], maxval=log_ratio[1])
  )
  h = jnp.round(jnp.sqrt(target * ratio)).astype(jnp.int32)
  w = jnp.round(jnp.sqrt(target / ratio)).astype(jnp.int32)
  fits = (h < height) & (w < width)
  first = jnp.argmax(fits)
  h, w = h[first], w[first]
  top = jnp.floor(jax.random.uniform(k_y) * (height - h + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_x) * (width - w + 1)).astype(jnp.int32)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
  inside &= fits.any() & jax.random.bernoulli(k_do, prob)
  noise = jax.random.normal(k_noise, image.shape, image.dtype)
  return jnp.where(inside[..., None], noise, image)


def smooth_one_hot(labels, num_classes: int, smoothing: float):
  """labels: [B] int -> [B, K]: 1 - smoothing + smoothing / K on the label, smoothing / K off it."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def mixup_cutmix(
  key,
  images,
  targets,
  *,
  mixup_alpha: float,
  cutmix_alpha: float,
  switch_prob: float = 0.5,
  prob: float = 1.0,
):
  """timm's batch-mode Mixup: the batch is mixed with its reverse using one lam.

  images: [B, S, S, C]; targets: [B, K] soft. With probability `prob` a mix happens: cutmix
  (with probability switch_prob when both alphas are > 0) pastes a box of area ~(1 - lam) from
  the reversed batch and sets lam to the box's true share; mixup blends pixels. Targets mix with
  the same lam. Returns (images, targets).
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  k_do, k_switch, k_lam_mix, k_lam_cut, k_y, k_x = jax.random.split(key, 6)
  size_h, size_w = images.shape[1:3]
  use_cut = (
    jax.random.bernoulli(k_switch, switch_prob)
    if mixup_alpha > 0 and cutmix_alpha > 0
    else jnp.asarray(cutmix_alpha > 0)
  )
  lam_mix = jax.random.beta(k_lam_mix, max(mixup_alpha, 1e-3), max(mixup_alpha, 1e-3))
  lam_cut = jax.random.beta(k_lam_cut, max(cutmix_alpha, 1e-3), max(cutmix_alpha, 1e-3))
  cut = jnp.sqrt(1.0 - lam_cut)
  ch, cw = (cut * size_h).astype(jnp.int32), (cut * size_w).astype(jnp.int32)
  cy = jax.random.randint(k_y, (), 0, size_h)
  cx = jax.random.randint(k_x, (), 0, size_w)
  y0, y1 = jnp.clip(cy - ch // 2, 0, size_h), jnp.clip(cy + ch // 2, 0, size_h)
  x0, x1 = jnp.clip(cx - cw // 2, 0, size_w), jnp.clip(cx + cw // 2, 0, size_w)
  rows = jnp.arange(size_h)[:, None]
  cols = jnp.arange(size_w)[None, :]
  box = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[None, :, :, None]
  lam_box = 1.0 - (y1 - y0) * (x1 - x0) / (size_h * size_w)
  do = jax.random.bernoulli(k_do, prob)
  lam = jnp.where(do, jnp.where(use_cut, lam_box, lam_mix), 1.0)
  other = images[::-1]
  mixed = jnp.where(use_cut, jnp.where(box, other, images), lam * images + (1 - lam) * other)
  images = jnp.where(do, mixed, images)
  return images, lam * targets + (1.0 - lam) * targets[::-1]


def cls_example(key, image01, aug):
  """One classification training image [S, S, 3] in [0, 1]: random resized crop + flip, then
  RandAugment; aug: the fine-tuning config's `aug` block."""
  size = image01.shape[0]
  k_crop, k_flip, k_ra = jax.random.split(key, 3)
  matrix = random_resized_crop(k_crop, size, tuple(aug.crop_scale))
  if aug.hflip:
    matrix = matrix @ hflip(jax.random.bernoulli(k_flip), size)
  image = warp(image01, matrix)
  if aug.randaug_ops:
    image = rand_augment_one(k_ra, image, aug.randaug_ops, aug.randaug_magnitude)
  return image


def seg_example(key, image01, target, aug):
  """A training image and its class map, flipped and rotated together (mask: nearest)."""
  size = image01.shape[0]
  k_flip, k_rot, k_scale = jax.random.split(key, 3)
  angle = jax.random.uniform(k_rot, (), minval=-1.0, maxval=1.0) * math.radians(aug.rotate_deg)
  scale = jnp.exp(
    jax.random.uniform(k_scale, (), minval=-1.0, maxval=1.0) * math.log(aug.scale_jitter)
  )
  matrix = rotation(angle, size) @ about_centre(jnp.eye(2) / scale, size)
  if aug.hflip:
    matrix = matrix @ hflip(jax.random.bernoulli(k_flip), size)
  image = warp(image01, matrix)
  target = warp(target[..., None].astype(jnp.float32), matrix, order=0)[..., 0]
  return image, target.astype(jnp.int32)
