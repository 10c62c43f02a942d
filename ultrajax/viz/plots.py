"""Evaluation plots as PNG files (matplotlib, Agg backend): ROC and precision-recall curves,
confusion matrices, segmentation overlays, label-efficiency curves, heatmaps (the transfer
matrix) and metric-versus-perturbation curves (blur stability)."""

from __future__ import annotations

import math
import pathlib

import matplotlib.pyplot as plt
import numpy as np
from sklearn import metrics as skm


def save(fig, path, *, dpi: int = 110, bbox_inches: str | None = "tight") -> pathlib.Path:
  """Writes `fig` to `path` (creating the folder) and closes it."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=dpi, bbox_inches=bbox_inches)
  plt.close(fig)
  return path


def roc_curves(path, labels: np.ndarray, probs: np.ndarray, class_names, title: str = "") -> None:
  """One-vs-rest ROC per class (only the positive class for two classes). probs: [N, K]."""
  fig, ax = plt.subplots(figsize=(4.5, 4.5))
  classes = [1] if probs.shape[1] == 2 else range(probs.shape[1])
  for c in classes:
    positive = labels == c
    if positive.all() or not positive.any():
      continue
    fpr, tpr, _ = skm.roc_curve(positive, probs[:, c], drop_intermediate=False)
    auc = float(np.trapezoid(tpr, fpr))
    ax.plot(fpr, tpr, label=f"{class_names[c]} (AUC {auc:.3f})")
  ax.plot([0, 1], [0, 1], "k:", lw=0.8)
  ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
  ax.set_title(title or "ROC")
  ax.legend(loc="lower right", fontsize=8)
  save(fig, path)


def pr_curves(path, labels: np.ndarray, probs: np.ndarray, class_names, title: str = "") -> None:
  """One-vs-rest precision-recall step curves per class (only the positive class for two
  classes), average precision in the legend and the class prevalence dotted. probs: [N, K]."""
  fig, ax = plt.subplots(figsize=(4.5, 4.5))
  classes = [1] if probs.shape[1] == 2 else range(probs.shape[1])
  for c in classes:
    positive = labels == c
    if not positive.any():
      continue
    precision, recall, _ = skm.precision_recall_curve(positive, probs[:, c])
    ap = float(np.sum(-np.diff(recall) * precision[:-1]))  # sklearn's average_precision_score
    (line,) = ax.step(recall, precision, where="post", label=f"{class_names[c]} (AP {ap:.3f})")
    ax.axhline(positive.mean(), color=line.get_color(), ls=":", lw=0.8)
  ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01))
  ax.set_title(title or "precision-recall")
  ax.legend(loc="lower left", fontsize=8)
  save(fig, path)


def metric_curve(path, x, curves: dict, *, xlabel: str, ylabel: str, title: str = "") -> None:
  """curves: {name: [len(x)] values} -> one line per name against x (e.g. AUROC vs blur sigma)."""
  fig, ax = plt.subplots(figsize=(4.5, 3.5))
  for name, values in curves.items():
    ax.plot(x, values, "o-", label=name)
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  save(fig, path)


def confusion(path, matrix: np.ndarray, class_names, title: str = "") -> None:
  """matrix: [K, K] counts, rows = true class, columns = predicted."""
  k = len(class_names)
  fig, ax = plt.subplots(figsize=(1.2 * k + 2, 1.2 * k + 1.5))
  ax.imshow(matrix, cmap="Blues")
  for i in range(k):
    for j in range(k):
      color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
      ax.text(j, i, int(matrix[i, j]), ha="center", va="center", color=color)
  ax.set(xticks=range(k), yticks=range(k), xticklabels=class_names, yticklabels=class_names)
  ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
  save(fig, path)


def seg_overlays(path, images: np.ndarray, targets: np.ndarray, preds: np.ndarray, scores=None):
  """images: [N, S, S, 3] uint8; targets, preds: [N, S, S] class maps; the first 8 drawn. Ground
  truth outlined in green, prediction filled in red; `scores` (e.g. Dice) in each title."""
  n = min(len(images), 8)
  cols = min(n, 4)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for i in range(n):
    ax = axes.ravel()[i]
    ax.imshow(images[i])
    overlay = np.ma.masked_where(preds[i] == 0, preds[i])
    ax.imshow(overlay, cmap="autumn", alpha=0.45, vmin=0, vmax=max(int(preds.max()), 1))
    if targets[i].any():
      ax.contour(targets[i] > 0, levels=[0.5], colors="lime", linewidths=1)
    if scores is not None:
      ax.set_title(f"Dice {scores[i]:.2f}", fontsize=9)
  save(fig, path)


def label_efficiency(path, curves: dict, metric: str, *, ax=None, title: str = "") -> None:
  """curves: {variant: [(fraction, mean, low, high), ...]} -> metric vs training fraction, the CI
  shaded. With `ax`, draws into that axis of the caller's figure and writes nothing."""
  fig = None
  if ax is None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
  for name, points in curves.items():
    points = sorted(points)
    f, m, lo, hi = (np.array(v, np.float64) for v in zip(*points))
    ax.plot(f, m, "o-", label=name)
    if np.isfinite(lo).all():
      ax.fill_between(f, lo, hi, alpha=0.2)
  ax.set(xlabel="fraction of training labels", ylabel=metric)
  ax.set_title(title or f"label efficiency ({metric})", fontsize=10)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  if fig is not None:
    save(fig, path)


def heatmap(
  path,
  matrix: np.ndarray,
  row_names,
  col_names,
  *,
  title: str,
  xlabel: str,
  ylabel: str,
  fmt: str = "{:.3f}",
) -> None:
  """matrix [R, C] with each cell's value written in it (nan cells left blank)."""
  r, c = matrix.shape
  fig, ax = plt.subplots(figsize=(1.1 * c + 2.5, 0.8 * r + 1.8))
  image = ax.imshow(matrix, cmap="viridis")
  finite = matrix[np.isfinite(matrix)]
  middle = (finite.min() + finite.max()) / 2 if finite.size else 0
  for i in range(r):
    for j in range(c):
      if np.isfinite(matrix[i, j]):
        color = "black" if matrix[i, j] > middle else "white"
        text = fmt.format(matrix[i, j])
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
  ax.set(xticks=range(c), yticks=range(r), xticklabels=col_names, yticklabels=row_names)
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
  fig.colorbar(image, ax=ax, shrink=0.8)
  save(fig, path)
