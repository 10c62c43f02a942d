"""MIC: masked image corruption of the encoder input (seed_systems.md 1.4).

Per image: with p_clean it stays clean; otherwise each of motion blur, Gaussian blur and salt & pepper
is included with p_each (one picked uniformly if none was), applied in that order. Every corruption is
computed for the whole batch and selected with jnp.where, so the op has no data-dependent control flow
and jits and vmaps (over clients) as it is. Kernels depend only on static config values and are built
on the host once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

CORRUPTIONS = ("motion_blur", "gaussian_blur", "salt_and_pepper")


def sample_corruptions(key, batch_size: int, config):
  """Which corruptions each image gets: [B, 3] bool, columns in CORRUPTIONS order; all False = clean."""
  k_clean, k_each, k_pick = jax.random.split(key, 3)
  clean = jax.random.uniform(k_clean, (batch_size,)) < config.p_clean
  each = jax.random.uniform(k_each, (batch_size, 3)) < config.p_each
  forced = jax.nn.one_hot(jax.random.randint(k_pick, (batch_size,), 0, 3), 3, dtype=jnp.bool_)
  picked = jnp.where(each.any(-1, keepdims=True), each, forced)
  return picked & ~clean[:, None]


def motion_kernel(length: int, angle_deg: float) -> np.ndarray:
  """The official kernel: diag(ones(L)) rotated by angle_deg, divided by L.  Returns [L, L] float32.

  Reproduces cv2.warpAffine(diag, getRotationMatrix2D((L/2, L/2), angle, 1), (L, L)): counter-clockwise
  as displayed, about (L/2, L/2), bilinear, zero outside. The diagonal already runs at -45 degrees, so the
  line ends up at (angle_deg - 45) degrees from horizontal: the default 45 gives a horizontal blur.
  Dividing by L rather than the kernel's sum darkens the image; the min-max stretch after it undoes that.
  """
  centre = length / 2.0
  t = np.deg2rad(angle_deg)
  y, x = np.mgrid[0:length, 0:length].astype(np.float64) - centre
  src_x = centre + np.cos(t) * x - np.sin(t) * y
  src_y = centre + np.sin(t) * x + np.cos(t) * y
  rotated = scipy.ndimage.map_coordinates(
    np.eye(length), [src_y, src_x], order=1, mode="grid-constant", cval=0.0
  )
  return (rotated / length).astype(np.float32)


def _correlate(images, kernel: np.ndarray):
  """Per-channel 2-D correlation (no kernel flip, like cv2.filter2D), VALID on pre-padded images.

  images: [B, H, W, C] -> [B, H - kh + 1, W - kw + 1, C]: the sum over the kernel's non-zero
  taps of tap x the image shifted by it, one fused elementwise loop. XLA:CPU's depthwise
  convolution ran MIC's two blurs about 10x slower (docs/benchmarks.md), and under the lanes'
  vmap a convolution merges lanes and images into one batch axis, which the SPMD partitioner
  could only lay out by gathering every image on every device.
  """
  kh, kw = kernel.shape
  h, w = images.shape[1] - kh + 1, images.shape[2] - kw + 1
  taps = [(i, j, float(kernel[i, j])) for i in range(kh) for j in range(kw) if kernel[i, j]]
  zero = jnp.zeros((images.shape[0], h, w, images.shape[3]), images.dtype)
  return sum((t * images[:, i : i + h, j : j + w, :] for i, j, t in taps), zero)


def _minmax_stretch(images):
  """cv2.normalize(NORM_MINMAX) to [0, 1] over each whole image; a constant image becomes 0, as in cv2."""
  lo = images.min(axis=(1, 2, 3), keepdims=True)
  span = images.max(axis=(1, 2, 3), keepdims=True) - lo
  return jnp.where(span > 0, (images - lo) / jnp.where(span > 0, span, 1.0), 0.0)


def motion_blur(images, length: int, angle_deg: float):
  """cv2.filter2D with motion_kernel (reflect-101 borders, anchor at L//2), then a min-max stretch.

  images: [B, H, W, C] -> [B, H, W, C].
  """
  kernel = motion_kernel(length, angle_deg)
  a = length // 2  # filter2D's default anchor
  # Pad for the kernel's non-zero bounding box (grown to hold the anchor) only: 3 x 24 rather than
  # 24 x 24 at the default angle (50 non-zero taps), and the op runs on every image of the batch.
  (r0, r1), (c0, c1) = [
    (min(nz[0], a), max(nz[-1], a))
    for nz in (np.nonzero(kernel.any(1))[0], np.nonzero(kernel.any(0))[0])
  ]
  pads = ((0, 0), (a - r0, r1 - a), (a - c0, c1 - a), (0, 0))
  return _minmax_stretch(
    _correlate(jnp.pad(images, pads, mode="reflect"), kernel[r0 : r1 + 1, c0 : c1 + 1])
  )


def gaussian_blur(images, sigma: float, truncate: float = 3.0):
  """Separable Gaussian, radius int(truncate*sigma + 0.5), half-sample symmetric borders.

  images: [B, H, W, C] -> [B, H, W, C]. Matches scipy.ndimage.gaussian_filter(mode='reflect'); the
  official PIL GaussianBlur approximates the same Gaussian with box blurs.
  """
  r = int(truncate * sigma + 0.5)
  taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
  taps /= taps.sum()
  padded = jnp.pad(images, ((0, 0), (r, r), (r, r), (0, 0)), mode="symmetric")
  return _correlate(_correlate(padded, taps[:, None]), taps[None, :])


def salt_and_pepper(key, images, density: float):
  """density/2 of the pixels -> 0 and density/2 -> 1, one spatial mask shared by all channels.

  images: [B, H, W, C] -> [B, H, W, C].
  """
  u = jax.random.uniform(key, (*images.shape[:-1], 1))
  images = jnp.where(u < density / 2, 0.0, images)
  return jnp.where((u >= density / 2) & (u < density), 1.0, images)


def _check(config):
  for name in ("p_clean", "p_each", "salt_pepper_density"):
    if not 0.0 <= getattr(config, name) <= 1.0:
      raise ValueError(f"corruption config {name}={getattr(config, name)!r} is not in [0, 1]")
  if int(config.motion_length) != config.motion_length or config.motion_length < 1:
    raise ValueError(
      f"corruption config motion_length={config.motion_length!r} is not a positive integer"
    )
  if not config.gaussian_sigma > 0:
    raise ValueError(f"corruption config gaussian_sigma={config.gaussian_sigma!r} is not > 0")


def corrupt(key, images, config):
  """The MIC encoder input.  images: [B, H, W, C] float in [0, 1] -> [B, H, W, C] float32.

  The choice is sample_corruptions(jax.random.split(key)[0], B, config); the salt & pepper mask comes
  from the second half of that split.
  """
  _check(config)
  k_which, k_noise = jax.random.split(key)
  which = sample_corruptions(k_which, images.shape[0], config)[:, None, None, None, :]
  x = images.astype(jnp.float32)
  x = jnp.where(
    which[..., 0], motion_blur(x, int(config.motion_length), config.motion_angle_deg), x
  )
  x = jnp.where(which[..., 1], gaussian_blur(x, config.gaussian_sigma), x)
  return jnp.where(which[..., 2], salt_and_pepper(k_noise, x, config.salt_pepper_density), x)
