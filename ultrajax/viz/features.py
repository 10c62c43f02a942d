"""PNG grid for feature-target MIM: clean | encoder input | mask | per-patch cosine similarity
of the predicted and the teacher's (normalised) tokens. Predicted features cannot be drawn as
pixels; the similarity map shows where the student already matches the teacher."""

from __future__ import annotations

import pathlib

import matplotlib.pyplot as plt
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
  fig, axes = plt.subplots(b, 4, figsize=(8.4, 2 * b + 0.4), squeeze=False)
  for i in range(b):
    m = reconstruction.mask_to_image(np.asarray(mask[i]), grid, (h, w))
    sim = np.kron(
      np.asarray(similarity[i], np.float32).reshape(grid),
      np.ones((h // grid[0], w // grid[1]), np.float32),
    )
    sim = np.where(m > 0, sim, np.nan)
    for j, ax in enumerate(axes[i]):
      if j < 3:
        ax.imshow(np.clip((clean[i], corrupted[i], m)[j], 0, 1), cmap="gray", vmin=0, vmax=1)
      else:
        image = ax.imshow(sim, cmap="viridis", vmin=-1, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(columns[j], fontsize=8)
  fig.colorbar(image, ax=axes[:, 3].tolist(), shrink=0.8)
  if title:
    fig.suptitle(title, fontsize=9)
  return plots.save(fig, path, dpi=80, bbox_inches=None)
