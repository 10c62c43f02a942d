"""Attention maps over the image (UltraFedFM Figs. 7-8): one panel per head, one row per image.

The maps come from `vit.ViT.attention_maps` ([B, heads, grid, grid]); each is scaled to its own
[0, 1] range and drawn bilinearly upsampled over the greyscale image."""

from __future__ import annotations

import pathlib

import matplotlib.pyplot as plt
import numpy as np
from scipy import ndimage

from ultrajax.viz import plots


def upsample(grid_map: np.ndarray, size: int) -> np.ndarray:
  """[g, g] -> [size, size] bilinear, scaled to [0, 1] (a constant map becomes 0)."""
  m = np.asarray(grid_map, np.float64)
  up = ndimage.zoom(m, size / m.shape[0], order=1, mode="nearest", grid_mode=True)
  span = up.max() - up.min()
  return (up - up.min()) / span if span > 0 else np.zeros_like(up)


def save_attention(
  path, images: np.ndarray, maps: np.ndarray, title: str = "", alpha: float = 0.5
) -> pathlib.Path:
  """images: [B, S, S, 3] uint8 or [0, 1] floats; maps: [B, heads, g, g] -> PNG at `path`."""
  images, maps = np.asarray(images), np.asarray(maps)
  if images.ndim != 4 or maps.ndim != 4 or images.shape[0] != maps.shape[0]:
    raise ValueError(
      f"images [B, S, S, 3] and maps [B, heads, g, g] must share B, got "
      f"{images.shape} and {maps.shape}"
    )
  b, heads = maps.shape[:2]
  size = images.shape[1]
  grey = images.astype(np.float64).mean(-1)
  grey = grey / 255.0 if images.dtype == np.uint8 else grey
  fig, axes = plt.subplots(b, heads + 1, figsize=(1.6 * (heads + 1), 1.6 * b + 0.4), squeeze=False)
  for i in range(b):
    axes[i, 0].imshow(grey[i], cmap="gray", vmin=0, vmax=1)
    for h in range(heads):
      ax = axes[i, h + 1]
      ax.imshow(grey[i], cmap="gray", vmin=0, vmax=1)
      ax.imshow(upsample(maps[i, h], size), cmap="jet", alpha=alpha, vmin=0, vmax=1)
  for ax, name in zip(axes[0], ["image"] + [f"head {h}" for h in range(heads)]):
    ax.set_title(name, fontsize=8)
  for ax in axes.ravel():
    ax.set(xticks=[], yticks=[])
  if title:
    fig.suptitle(title, fontsize=9)
  return plots.save(fig, path, dpi=80)
