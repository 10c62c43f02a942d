"""TGM texture scores: mean |Laplacian| of each patch of the grey clean image (seed_systems.md 1.2)."""

from __future__ import annotations

import einops
import jax.numpy as jnp

# ITU-R BT.601 luma, OpenCV's RGB2GRAY. (The official code feeds RGB into BGR2GRAY, swapping the R and B
# weights; grey ultrasound has R = G = B, so it makes no difference there.)
_LUMA = (0.299, 0.587, 0.114)


def texture_scores(images, patch_size: int):
  """Per-patch texture, as the official loader's cv2.Laplacian(ksize=3) run on every patch on its own.

  images: [B, H, W, C] float in [0, 1] or uint8 in 0..255 (what the pipeline produces; the same
    scores), C = 3 (RGB) or 1; H and W multiples of patch_size. Other dtypes raise TypeError.
  Returns [B, N] float32 on the 0-255 scale, N = (H/p)*(W/p) in raster order (0 = flat patch).
  The official code also rounds the grey image to uint8 and the score to 2 decimals; neither is done here.
  """
  _, h, w, c = images.shape
  p = patch_size
  if p < 2 or h % p or w % p:
    raise ValueError(f"patch_size={patch_size!r} must be >= 2 and divide the image size {h}x{w}")
  if jnp.issubdtype(images.dtype, jnp.floating):
    scale = 255.0
  elif images.dtype == jnp.uint8:
    scale = 1.0
  else:
    raise TypeError(f"images are {images.dtype}; expected float in [0, 1] or uint8 in 0..255")
  images = images.astype(jnp.float32)
  if c == 3:
    # Elementwise, not a matmul: a dot would run at bf16 precision on TPU by default.
    grey = sum(k * images[..., i] for i, k in enumerate(_LUMA))
  elif c == 1:
    grey = images[..., 0]
  else:
    raise ValueError(f"images have {c} channels; expected 3 (RGB) or 1")
  patches = einops.rearrange(scale * grey, "b (h p) (w q) -> b (h w) p q", p=p, q=p)
  # Pad every patch by itself (numpy's 'reflect' is OpenCV's reflect-101), so a patch never sees its
  # neighbours: the official code filters each 16x16 crop separately.
  x = jnp.pad(patches, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
  # OpenCV's ksize=3 Laplacian is [[2, 0, 2], [0, -8, 0], [2, 0, 2]]: only corners and centre are non-zero.
  corners = x[..., :-2, :-2] + x[..., :-2, 2:] + x[..., 2:, :-2] + x[..., 2:, 2:]
  laplacian = 2.0 * corners - 8.0 * x[..., 1:-1, 1:-1]
  # convertScaleAbs saturates |Laplacian| to uint8.
  return jnp.minimum(jnp.abs(laplacian), 255.0).mean(axis=(-2, -1))
