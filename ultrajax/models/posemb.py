"""Fixed 2-D sin-cos position embeddings, exactly as MAE's `util/pos_embed.py`."""

from __future__ import annotations

import functools

import numpy as np


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """pos: [M] -> [M, dim]: sin(pos * omega) then cos(pos * omega), omega = 10000^(-k/(dim/2))."""
  omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.einsum("m,d->md", pos.astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@functools.lru_cache(maxsize=32)
def _sincos_2d_cached(grid_h: int, grid_w: int, dim: int, cls_token: bool) -> np.ndarray:
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  # MAE builds meshgrid(grid_w, grid_h), so its "emb_h" (the first half of the channels) is in
  # fact the column coordinate and the second half the row coordinate; kept for interop.
  emb = np.concatenate(
    [_sincos_1d(dim // 2, cols.reshape(-1)), _sincos_1d(dim // 2, rows.reshape(-1))], axis=1
  )
  if cls_token:
    emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
  emb = emb.astype(np.float32)
  emb.flags.writeable = False  # the cached table is shared; callers get copies
  return emb


def sincos_2d(grid_h: int, grid_w: int, dim: int, cls_token: bool = False) -> np.ndarray:
  """MAE's `get_2d_sincos_pos_embed` for a grid_h x grid_w patch grid (raster order).

  Returns float32 [grid_h * grid_w, dim], or [1 + grid_h * grid_w, dim] with a leading zero row
  for the cls token. Computed in float64 like MAE (np.float omega) and then cast, as MAE's
  `torch.from_numpy(...).float()` does.
  """
  if dim % 4:
    raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
  return _sincos_2d_cached(int(grid_h), int(grid_w), int(dim), bool(cls_token)).copy()
