"""PNG grid for feature-target MIM: clean | encoder input | mask | per-patch cosine similarity
of the predicted and the teacher's (normalised) tokens. Predicted features cannot be drawn as
pixels; the similarity map shows where the student already matches the teacher."""

from __future__ import annotations

import pathlib

import numpy as np

from ultrajax.viz import plots, reconstruction


def save_similarity_grid(
  path, clean, corrupted, mask, similarity, patch_size: int, title: str = ""
) -> pathlib.Path:
  """clean, corrupted: [B, H, W, 3] in [0, 1]; mask: [B, N] bool; similarity: [B, N] in [-1, 1]
  (only masked patches are coloured). One row per example."""
  b, h, w, _ = clean.shape
  grid = (h // patch_size, w // patch_size)
  columns = ("clean", "encoder input", "mask (white = masked)", "cos(pred, teacher), masked")
  masks = [reconstruction.mask_to_image(np.asarray(m), grid, (h, w)) for m in mask]
  rows = [(clean[i], corrupted[i], masks[i], None) for i in range(b)]
  fig, axes = reconstruction.image_rows(columns, rows, width=8.4)
  for ax, m, s in zip(axes[:, 3], masks, similarity):
    sim = reconstruction.mask_to_image(np.asarray(s, np.float32), grid, (h, w))
    image = ax.imshow(np.where(m > 0, sim, np.nan), cmap="viridis", vmin=-1, vmax=1)
  fig.colorbar(image, ax=axes[:, 3].tolist(), shrink=0.8)
  if title:
    fig.suptitle(title, fontsize=9)
  return plots.save(fig, path, dpi=80, bbox_inches=None)
