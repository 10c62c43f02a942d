"""A ratio sweep's figure (HSL paper Fig. 2 B2 / C2): a node metric against the ratio."""

from __future__ import annotations

import pathlib

import matplotlib.pyplot as plt
import numpy as np

from ultrajax.viz import plots


def sweep_lines(path, rows: list[dict], *, metric: str = "AUC", title: str = "") -> pathlib.Path:
  """Fig. 2 B2 / C2: per node a panel of the metric's mean over repeats (t-interval bars)
  against the ratio, one line per method."""
  nodes = list(dict.fromkeys(r["node"] for r in rows))
  methods = list(dict.fromkeys(r["method"] for r in rows))
  ratios = sorted({r["ratio"] for r in rows})
  fig, axes = plt.subplots(1, len(nodes), figsize=(5 * len(nodes), 3.6), squeeze=False, sharey=True)
  for ax, node in zip(axes[0], nodes):
    for method in methods:
      pts = sorted(
        (r["ratio"], r["mean"], r["t_low"], r["t_high"])
        for r in rows
        if r["node"] == node and r["method"] == method
      )
      x, y, lo, hi = (np.asarray(v, np.float64) for v in zip(*pts))
      yerr = np.nan_to_num(np.stack([y - lo, hi - y]))
      ax.errorbar(x, y, yerr=yerr, marker="o", ms=3, capsize=2, label=method)
    ax.set_xscale("log")
    ax.set_xticks(ratios, [f"{r:g}:1" for r in ratios], rotation=60, fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("ratio")
    ax.set_title(node, fontsize=9)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel(metric)
  axes[0][-1].legend(fontsize=7, loc="best")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return plots.save(fig, path, dpi=120, bbox_inches=None)
