"""t-SNE of learned features, coloured by class (URFM Fig. 6, HSL Fig. 3B), via scikit-learn."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from sklearn.manifold import TSNE

from ultrajax.viz import plots

EXACT_MAX = 1000


def tsne(features: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
  """features: [N, D] -> [N, 2] sklearn TSNE (PCA init, seeded). The perplexity is capped at
  (N - 1) / 3 so small test sets work (sklearn requires perplexity < N). Up to EXACT_MAX points
  use the exact gradient: on test-set sizes it is faster than Barnes-Hut (about 10x at N = 45,
  measured) and has no approximation."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[0] < 4:
    raise ValueError(f"t-SNE needs features [N >= 4, D], got shape {x.shape}")
  perplexity = min(perplexity, (x.shape[0] - 1) / 3)
  method = "exact" if x.shape[0] <= EXACT_MAX else "barnes_hut"
  return TSNE(
    n_components=2, perplexity=perplexity, init="pca", method=method, random_state=seed
  ).fit_transform(x)


def save_tsne(
  path, features: np.ndarray, labels: np.ndarray, class_names, title: str = "", seed: int = 0
) -> np.ndarray:
  """Writes the 2-D t-SNE of features [N, D] coloured by labels [N] (ints into class_names) to
  `path`; returns the embedding [N, 2]."""
  labels = np.asarray(labels)
  if labels.shape != (np.asarray(features).shape[0],):
    raise ValueError(f"labels {labels.shape} do not match features {np.asarray(features).shape}")
  points = tsne(features, seed)
  fig, ax = plt.subplots(figsize=(4.5, 4.5))
  for k, name in enumerate(class_names):
    sel = labels == k
    if sel.any():
      ax.scatter(points[sel, 0], points[sel, 1], s=8, alpha=0.7, label=name)
  ax.set(xticks=[], yticks=[], title=title or "t-SNE of test features")
  ax.legend(fontsize=8, markerscale=2)
  plots.save(fig, path)
  return points
