"""The per-hospital benefit figure: each client's test metric from the federated and the
local-only encoder (left) and the gain with its 95% bootstrap CI (right)."""

from __future__ import annotations

import pathlib

import matplotlib.pyplot as plt
import numpy as np

from ultrajax.viz import plots


def gain_plot(
  path,
  clients,
  federated,
  local,
  gain,
  low,
  high,
  *,
  metric: str,
  local_label: str = "local only",
) -> pathlib.Path:
  """clients: K names; federated, local, gain, low, high: [K] (the CI of the gain)."""
  k = len(clients)
  y = np.arange(k)[::-1]
  fig, (left, right) = plt.subplots(1, 2, figsize=(9, 1.6 + 0.45 * k), sharey=True)
  left.scatter(federated, y, marker="o", label="federated", zorder=3)
  left.scatter(local, y, marker="s", label=local_label, zorder=3)
  left.set_yticks(y, clients)
  left.set_xlabel(f"test {metric}")
  left.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
  left.grid(axis="x", alpha=0.3)
  gain, low, high = (np.asarray(v, np.float64) for v in (gain, low, high))
  # green: CI above 0, red: below 0, grey: includes 0
  colors = np.where(low > 0, "tab:green", np.where(high < 0, "tab:red", "tab:gray"))
  for g, yi, lo, hi, color in zip(gain, y, low, high, colors):
    right.errorbar(g, yi, xerr=[[g - lo], [hi - g]], fmt="o", color=color, capsize=3)
  right.axvline(0.0, color="black", lw=0.8)
  right.set_xlabel(f"gain in {metric} (federated - {local_label}), 95% CI")
  right.grid(axis="x", alpha=0.3)
  fig.suptitle(f"Per-hospital benefit of federated pretraining ({metric})")
  fig.tight_layout()
  return plots.save(fig, path, bbox_inches=None)
