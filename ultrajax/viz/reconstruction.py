"""PNG grids: MIM examples (clean image | corrupted encoder input | mask | reconstruction) and SMAT
scan-mode pairs (source | partner)."""

from __future__ import annotations

import pathlib

import matplotlib.pyplot as plt
import numpy as np

from ultrajax.viz import plots


def mask_to_image(mask: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
  """mask: [N] bool (True = masked, raster order) or per-patch values -> [H, W] float, each
  patch's value (1 where masked) over its pixels."""
  m = mask.reshape(grid).astype(np.float32)
  return np.kron(m, np.ones((size[0] // grid[0], size[1] // grid[1]), np.float32))


def image_rows(columns, rows, width: float):
  """A figure of one row per example: rows[i][j] drawn greyscale in [0, 1] under the title
  columns[j], or left empty for the caller when None; no ticks -> (fig, axes [B, columns])."""
  fig, axes = plt.subplots(
    len(rows), len(columns), figsize=(width, 2 * len(rows) + 0.4), squeeze=False
  )
  for i, panels in enumerate(rows):
    for j, (ax, panel) in enumerate(zip(axes[i], panels)):
      if panel is not None:
        ax.imshow(np.clip(panel, 0, 1), cmap="gray", vmin=0, vmax=1)
      ax.set(xticks=[], yticks=[])
      if i == 0:
        ax.set_title(columns[j], fontsize=8)
  return fig, axes


def _finish(fig, path, title: str) -> pathlib.Path:
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return plots.save(fig, path, dpi=80, bbox_inches=None)


def save_grid(
  path, clean, corrupted, mask, reconstruction, patch_size: int, title: str = ""
) -> pathlib.Path:
  """Writes one row per example.

  clean, corrupted, reconstruction: [B, H, W, 3] floats in [0, 1]; mask: [B, N] bool.
  The reconstruction shows predicted pixels in masked patches and the clean visible ones.
  """
  b, h, w, _ = clean.shape
  grid = (h // patch_size, w // patch_size)
  columns = ("clean", "encoder input", "TGM mask (white = masked)", "reconstruction")
  rows = [
    (clean[i], corrupted[i], mask_to_image(np.asarray(mask[i]), grid, (h, w)), reconstruction[i])
    for i in range(b)
  ]
  return _finish(image_rows(columns, rows, width=8)[0], path, title)


def save_pairs(path, pairs, title: str = "") -> pathlib.Path:
  """Writes one row per (source, partner, caption): SMAT's synthetic scan-mode partner beside the
  image it was made from.  source, partner: uint8 [H, W] or [H, W, 3]."""
  fig, axes = plt.subplots(len(pairs), 2, figsize=(4, 2 * len(pairs) + 0.4), squeeze=False)
  for row, (source, partner, caption) in zip(axes, pairs):
    for ax, image, name in zip(row, (source, partner), ("source", "SMAT partner")):
      ax.imshow(np.asarray(image), cmap="gray", vmin=0, vmax=255)
      ax.set(xticks=[], yticks=[])
      ax.set_title(f"{name}: {caption[0] if name == 'source' else caption[1]}", fontsize=7)
  return _finish(fig, path, title)
