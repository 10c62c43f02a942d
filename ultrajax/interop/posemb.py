"""Resampling imported position-embedding tables to another patch grid, as timm does.

timm's `resample_abs_pos_embed` (used when a checkpoint is loaded at another image size)
keeps the prefix rows (cls token) and resizes the 2-D grid with
`F.interpolate(mode='bicubic', antialias=True, align_corners=False)`. Here the same resize is
written in numpy (no torch needed): torch's antialiased bicubic is PIL's separable filter,
cubic coefficient a = -0.5 (not -0.75 as the plain bicubic), weights renormalised at the
borders instead of clamping indices.
"""

from __future__ import annotations

import math

import numpy as np

CUBIC_A = -0.5  # torch's antialiased bicubic (aa_filter), as PIL


def _cubic(x: np.ndarray) -> np.ndarray:
  """Keys' cubic convolution kernel with a = -0.5, support [-2, 2]."""
  x = np.abs(x)
  a = CUBIC_A
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _resize_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights of a 1-D antialiased bicubic resize (align_corners=False).

  Mirrors torch's `_compute_indices_weights_aa`: when shrinking, the kernel is widened by the
  scale (that is the antialiasing); taps outside the input are dropped and the rest
  renormalised.
  """
  scale = size_in / size_out
  support = 2.0 * max(scale, 1.0)
  inv = 1.0 / scale if scale >= 1.0 else 1.0
  weights = np.zeros((size_out, size_in), np.float64)
  for i in range(size_out):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as the C++ cast
    hi = min(int(center + support + 0.5), size_in)
    taps = _cubic((np.arange(lo, hi) - center + 0.5) * inv)
    weights[i, lo:hi] = taps / taps.sum()
  return weights


def resample_grid(grid: np.ndarray, new_size: tuple[int, int]) -> np.ndarray:
  """grid: [H, W, D] -> [H', W', D] antialiased bicubic (torch/timm semantics), float32."""
  rows = _resize_matrix(grid.shape[0], new_size[0])
  cols = _resize_matrix(grid.shape[1], new_size[1])
  out = np.einsum("ih,hwd,jw->ijd", rows, np.asarray(grid, np.float64), cols)
  return out.astype(np.float32)


def resample_abs_pos_embed(
  pos_embed: np.ndarray, new_size: tuple[int, int], *, num_prefix_tokens: int = 1
) -> np.ndarray:
  """[1, P + h*w, D] -> [1, P + H'*W', D]: the P prefix rows kept, the square h x w grid resized.

  As timm's `resample_abs_pos_embed` with its defaults (bicubic, antialias=True); returns the
  input unchanged (as float32) when the grid already has `new_size`.
  """
  pos_embed = np.asarray(pos_embed, np.float32)
  if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
    raise ValueError(f"pos_embed must be [1, tokens, D], got {pos_embed.shape}")
  prefix, table = pos_embed[:, :num_prefix_tokens], pos_embed[0, num_prefix_tokens:]
  side = math.isqrt(table.shape[0])
  if side * side != table.shape[0]:
    raise ValueError(
      f"pos_embed has {table.shape[0]} grid rows after {num_prefix_tokens} "
      "prefix rows, not a square grid"
    )
  if (side, side) == tuple(new_size):
    return pos_embed
  grid = resample_grid(table.reshape(side, side, -1), new_size)
  return np.concatenate([prefix, grid.reshape(1, -1, grid.shape[-1])], axis=1)
