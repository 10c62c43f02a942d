"""Box plots of a per-node metric over repeats, one panel per node, one box per method."""

from __future__ import annotations

import pathlib

import matplotlib.pyplot as plt
import numpy as np

from ultrajax.viz import plots


def per_node_boxplots(
  path, values: dict, node_names, *, metric: str = "AUC", title: str = ""
) -> pathlib.Path:
  """values: method -> per node a list of the metric over repeats (nan = undefined, dropped).

  Writes a PNG with one panel per node (the paper's Fig. 2 A2 / D2 layout): a box per method
  with every repeat drawn as a dot, so five repeats stay visible.
  """
  methods = list(values)
  cols = min(len(node_names), 4)
  rows = int(np.ceil(len(node_names) / cols))
  fig, axes = plt.subplots(
    rows, cols, figsize=(0.55 * len(methods) * cols + 1.5, 3.2 * rows), squeeze=False, sharey=True
  )
  colors = plt.get_cmap("tab20")(np.arange(len(methods)) % 20)
  for k, node in enumerate(node_names):
    ax = axes[k // cols][k % cols]
    data = [np.asarray(values[m][k], np.float64) for m in methods]
    data = [d[np.isfinite(d)] for d in data]
    shown = [d if d.size else np.array([np.nan]) for d in data]
    box = ax.boxplot(shown, patch_artist=True, widths=0.6, showfliers=False)
    for patch, color in zip(box["boxes"], colors):
      patch.set_facecolor(color)
      patch.set_alpha(0.6)
    for i, d in enumerate(data, start=1):
      ax.scatter(np.full(d.size, i), d, s=8, color="black", zorder=3)
    ax.set_xticks(np.arange(1, len(methods) + 1), methods, rotation=60, ha="right", fontsize=8)
    ax.set_title(str(node), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
  for k in range(len(node_names), rows * cols):
    axes[k // cols][k % cols].axis("off")
  for row in axes:
    row[0].set_ylabel(metric)
  fig.suptitle(title or metric)
  fig.tight_layout()
  return plots.save(fig, path, bbox_inches=None)
