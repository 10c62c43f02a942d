"""PNG of a federated partition: each node's size and label mix as stacked bars."""
from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_partition(counts, node_names, class_names, path, title: str = "") -> pathlib.Path:
  """Writes stacked bars to `path`: left, examples per node and class (log scale when node
  sizes differ more than 20-fold, as in the quantity and combined scenarios); right, each
  node's label mix in percent.  counts: [nodes, classes]."""
  counts = np.asarray(counts, np.float64)
  sizes = counts.sum(1)
  fractions = counts / np.maximum(sizes, 1)[:, None]
  x = np.arange(len(node_names))
  colors = plt.get_cmap("tab10")(np.arange(counts.shape[1]) % 10)
  fig, (ax_n, ax_f) = plt.subplots(1, 2, figsize=(4 + 1.2 * len(node_names), 4))
  for ax, values in ((ax_n, counts), (ax_f, 100 * fractions)):
    bottom = np.zeros(len(node_names))
    for c, name in enumerate(class_names):
      ax.bar(x, values[:, c], bottom=bottom, color=colors[c], label=str(name))
      bottom += values[:, c]
    ax.set_xticks(x, [str(n) for n in node_names], rotation=30, ha="right")
  if sizes.min() > 0 and sizes.max() / sizes.min() > 20:
    ax_n.set_yscale("log")
  for k, n in enumerate(sizes):
    ax_n.text(k, n, f"{int(n)}", ha="center", va="bottom", fontsize=8)
  ax_n.set_ylabel("examples")
  ax_f.set_ylabel("label mix (%)")
  ax_f.set_ylim(0, 100)
  ax_f.legend(title="class", fontsize=8, loc="upper right")
  fig.suptitle(title or "partition")
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
