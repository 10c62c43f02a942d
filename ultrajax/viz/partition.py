"""PNG of a federated partition: each node's size and label mix as stacked bars."""

from __future__ import annotations

import pathlib

import matplotlib.pyplot as plt
import numpy as np

from ultrajax.viz import plots


def plot_partition(counts, node_names, class_names, path, title: str = "") -> pathlib.Path:
  """Writes two panels to `path`: left, examples per node (log scale when sizes differ more
  than 20-fold, as in the quantity and combined scenarios); right, each node's label mix as
  stacked percentages, each segment annotated with its count.  counts: [nodes, classes]."""
  counts = np.asarray(counts, np.float64)
  sizes = counts.sum(1)
  percent = 100 * counts / np.maximum(sizes, 1)[:, None]
  x = np.arange(len(node_names))
  labels = [str(n) for n in node_names]
  colors = plt.get_cmap("tab10")(np.arange(counts.shape[1]) % 10)
  fig, (ax_n, ax_f) = plt.subplots(1, 2, figsize=(4 + 1.2 * len(node_names), 4))
  ax_n.bar(x, sizes, color="0.5")
  if sizes.min() > 0 and sizes.max() / sizes.min() > 20:
    ax_n.set_yscale("log")
  for k, n in enumerate(sizes):
    ax_n.text(k, n, f"{int(n)}", ha="center", va="bottom", fontsize=8)
  bottom = np.zeros(len(node_names))
  for c, name in enumerate(class_names):
    ax_f.bar(x, percent[:, c], bottom=bottom, color=colors[c], label=str(name))
    for k in np.flatnonzero(counts[:, c]):
      middle = bottom[k] + percent[k, c] / 2
      ax_f.text(k, middle, f"{int(counts[k, c])}", ha="center", va="center", fontsize=7)
    bottom += percent[:, c]
  for ax in (ax_n, ax_f):
    ax.set_xticks(x, labels, rotation=30, ha="right")
  ax_n.set_ylabel("examples per node")
  ax_f.set_ylabel("label mix (%)")
  ax_f.set_ylim(0, 100)
  ax_f.legend(title="class", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  fig.suptitle(title or "partition")
  fig.tight_layout()
  return plots.save(fig, path, dpi=100, bbox_inches=None)
