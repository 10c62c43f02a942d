"""Robust aggregation and fault screening on stacked client updates (leaves [C, ...]).

Call these on updates D_k = y_k - x (or on parameters; every rule here is translation-equivariant
except norm bounding, which must see updates). All return a pytree like one client's.

  keep, w, report = screen(updates, weights, norm_factor)  # NaN/inf and absurd norms out
  coordinate_median(updates)          # per-coordinate median (unweighted)
  trimmed_mean(updates, beta)         # per coordinate, drop floor(beta C) from each end
  krum(updates, f, m, weights)        # Blanchard et al. 2017; m > 1 is Multi-Krum
  norm_bounded_mean(updates, weights, max_norm)  # clip each to max_norm, weighted mean

Median, trimmed mean and Krum's selection ignore data volume (a hospital with 10x the images
counts once): that is what makes them robust, and it conflicts with volume-weighted FedAvg.
They need every client's plaintext update, so they cannot run behind secure aggregation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ultrajax import configlib
from ultrajax.fed import privacy


def _flat(client_tree):
  """leaves [C, ...] -> [C, D] float32."""
  leaves = jax.tree.leaves(client_tree)
  num = leaves[0].shape[0]
  return jnp.concatenate([x.reshape(num, -1).astype(jnp.float32) for x in leaves], axis=1)


def _num_clients(client_tree) -> int:
  return jax.tree.leaves(client_tree)[0].shape[0]


def screen(client_tree, weights, norm_factor: float = 100.0):
  """Excludes clients whose update has a NaN/inf or a norm > norm_factor x the median norm of
  the finite ones. Returns (keep bool [C], weights renormalised over the kept [C] with 0 for
  the excluded, {'nonfinite': [ids], 'too_large': [ids], 'norms': [C]}) for the caller to
  report; raises DataError when no client is left."""
  flat = np.asarray(_flat(client_tree), np.float64)
  finite = np.all(np.isfinite(flat), axis=1)
  norms = np.where(finite, np.linalg.norm(np.where(np.isfinite(flat), flat, 0.0), axis=1),
                   np.inf)
  median = np.median(norms[finite]) if finite.any() else np.inf
  too_large = finite & (norms > norm_factor * median)
  keep = finite & ~too_large
  if not keep.any():
    raise configlib.DataError(f"every client update was excluded (non-finite: "
                              f"{np.flatnonzero(~finite).tolist()}, norm > {norm_factor} x "
                              f"median: {np.flatnonzero(too_large).tolist()})")
  w = np.where(keep, np.asarray(weights, np.float64), 0.0)
  if w.sum() <= 0:
    w = keep.astype(np.float64)
  report = {"nonfinite": np.flatnonzero(~finite).tolist(),
            "too_large": np.flatnonzero(too_large).tolist(), "norms": norms.tolist()}
  return keep, (w / w.sum()).astype(np.float32), report


def coordinate_median(client_tree):
  """Median over the client axis of every coordinate (mean of the middle two for even C)."""
  return jax.tree.map(lambda x: jnp.median(x.astype(jnp.float32), axis=0).astype(x.dtype),
                      client_tree)


def trimmed_mean(client_tree, beta: float):
  """Coordinate-wise trimmed mean (Yin et al. 2018): sort each coordinate over the C clients,
  drop floor(beta * C) from each end, average the rest (scipy.stats.trim_mean's convention)."""
  num = _num_clients(client_tree)
  cut = int(np.floor(beta * num))
  if not 0.0 <= beta < 0.5 or num - 2 * cut < 1:
    raise configlib.ConfigError(f"trimmed_mean beta={beta!r} must be in [0, 0.5) and leave a "
                                f"client of {num}")
  def one(x):
    s = jnp.sort(x.astype(jnp.float32), axis=0)
    return s[cut:num - cut].mean(axis=0).astype(x.dtype)
  return jax.tree.map(one, client_tree)


def krum_scores(client_tree, num_byzantine: int):
  """score_i = sum of squared distances to its C - f - 2 nearest other clients. [C]."""
  num = _num_clients(client_tree)
  if num <= 2 * num_byzantine + 2:
    raise configlib.ConfigError(f"krum needs C > 2f + 2; got C={num}, f={num_byzantine}")
  v = _flat(client_tree)
  sq = jnp.sum(v * v, axis=1)
  dist = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * v @ v.T, 0.0)
  dist = jnp.where(jnp.eye(num, dtype=bool), jnp.inf, dist)  # never your own neighbour
  nearest = jnp.sort(dist, axis=1)[:, :num - num_byzantine - 2]
  return nearest.sum(axis=1)


def krum(client_tree, num_byzantine: int, num_selected: int = 1, weights=None):
  """Krum (m = 1) or Multi-Krum (m > 1): the weighted mean of the m lowest-scoring updates
  (weights renormalised over them; uniform when None, Flower weights by n_k).
  Returns (aggregate, selected ids [m] in increasing score order)."""
  num = _num_clients(client_tree)
  if not 1 <= num_selected <= num:
    raise configlib.ConfigError(f"krum num_selected={num_selected!r} is not in [1, {num}]")
  scores = krum_scores(client_tree, num_byzantine)
  selected = jnp.argsort(scores)[:num_selected]
  w = jnp.ones(num) if weights is None else jnp.asarray(weights, jnp.float32)
  sel_w = w[selected] / w[selected].sum()
  agg = jax.tree.map(
      lambda x: jnp.tensordot(sel_w, x[selected].astype(jnp.float32), axes=(0, 0)).astype(x.dtype),
      client_tree)
  return agg, selected


def norm_bounded_mean(client_tree, weights, max_norm: float):
  """Norm bounding (Sun et al. 2019): clip every update to L2 norm max_norm, then the weighted
  mean sum_k w_k clip(D_k) (weights [C] summing to 1)."""
  clipped, _ = privacy.clip_updates(client_tree, max_norm)
  w = jnp.asarray(weights, jnp.float32)
  return jax.tree.map(lambda x: jnp.tensordot(w, x.astype(jnp.float32), axes=(0, 0)).astype(x.dtype),
                      clipped)
