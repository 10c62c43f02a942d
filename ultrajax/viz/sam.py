"""UltraSam PNGs: predicted masks next to the ground truth, and the ROC curves of the prompted
and plain classifiers."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from sklearn import metrics as skm

from ultrajax.viz import plots

SHOWN_KEYS = ("image", "masks", "valid")


def mask_previews(path, shown: dict, title: str) -> None:
  """Rows: test images with the ground truth (green) and each prompt setting's predicted masks
  (red). shown: eval/sam_eval.py's `evaluate_instances` preview (image [P,S,S,3], masks
  [P,M,S,S], valid [P,M], and per setting bool masks [P,M,S,S])."""
  names = [k for k in shown if k not in SHOWN_KEYS]
  rows = len(shown["image"])
  fig, axes = plt.subplots(
    rows, 1 + len(names), figsize=(2.2 * (1 + len(names)), 2.2 * rows), squeeze=False
  )
  for r in range(rows):
    for c, name in enumerate(["ground truth"] + names):
      ax = axes[r, c]
      ax.imshow(shown["image"][r], cmap="gray")
      masks = shown["masks"] if c == 0 else shown[name]
      for k in np.nonzero(shown["valid"][r])[0]:
        ax.contour(masks[r, k], levels=[0.5], colors=["lime" if c == 0 else "red"], linewidths=0.8)
      ax.set_axis_off()
      if r == 0:
        ax.set_title(name, fontsize=8)
  fig.suptitle(title, fontsize=9)
  plots.save(fig, path)


def classifier_rocs(path, labels: np.ndarray, scores: dict, aurocs: dict, title: str) -> None:
  """ROC curves of two-class classifiers on the same instances, one line each.

  labels: [N] bool or {0, 1} (1 = positive); scores: {name: [N] score of the positive class};
  aurocs: {name: AUROC} for the legend.
  """
  fig, ax = plt.subplots(figsize=(3.6, 3.6))
  positive = np.asarray(labels).astype(bool)
  for name, s in scores.items():
    fpr, tpr, _ = skm.roc_curve(positive, np.asarray(s), drop_intermediate=False)
    ax.plot(fpr, tpr, label=f"{name} AUROC {aurocs[name]:.3f}")
  ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
  ax.set(xlabel="false positive rate", ylabel="true positive rate")
  ax.legend(fontsize=7, loc="lower right")
  ax.set_title(title, fontsize=9)
  plots.save(fig, path)
