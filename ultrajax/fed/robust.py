"""Robust aggregation and fault screening on stacked client updates (leaves [C, ...]).

Call these on updates D_k = y_k - x (or on parameters; every rule here is translation-equivariant
except norm bounding, which must see updates). All are jittable and return a pytree like one
client's. `keep` ([C] bool, None = all) leaves clients out (those that did not report this
round, or that the screen excluded); the rules then run over the kept ones only, so a dropped
client renormalises the weights instead of counting as a zero update.

Median, trimmed mean and Krum's selection ignore data volume (a hospital with 10x the images
counts once): that is what makes them robust, and it conflicts with volume-weighted FedAvg.
They need every client's plaintext update, so they cannot run behind secure aggregation.
fed/protected.py runs them as strategies of the federated engine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ultrajax import configlib
from ultrajax.fed import privacy


def _flat(client_tree):
  """leaves [C, ...] -> [C, D] float32."""
  leaves = jax.tree.leaves(client_tree)
  num = leaves[0].shape[0]
  return jnp.concatenate([x.reshape(num, -1).astype(jnp.float32) for x in leaves], axis=1)


def _num_clients(client_tree) -> int:
  return jax.tree.leaves(client_tree)[0].shape[0]


def _keep(client_tree, keep):
  num = _num_clients(client_tree)
  return jnp.ones((num,), bool) if keep is None else jnp.asarray(keep, bool)


def _column(v, x):
  """[C] -> [C, 1, ...] broadcastable against x [C, ...]."""
  return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _renormalise(weights, keep):
  w = jnp.where(keep, jnp.asarray(weights, jnp.float32), 0.0)
  return w / jnp.maximum(w.sum(), 1e-30)


def screen(client_tree, weights, norm_factor: float = 100.0, keep=None):
  """Excludes the clients whose update has a NaN/inf, or a norm above norm_factor x the median
  norm of the finite kept ones (norm_factor 0: the norm test is off).

  Returns (ok bool [C]: kept and passed, weights [C] renormalised over `ok` (0 elsewhere; all 0
  when nobody passed), report {'nonfinite': bool [C], 'too_large': bool [C], 'norms': [C] (inf
  where non-finite)}) for the caller to count and log."""
  keep = _keep(client_tree, keep)
  flat = _flat(client_tree)
  finite = jnp.all(jnp.isfinite(flat), axis=1)
  norms = jnp.where(
    finite, jnp.linalg.norm(jnp.where(jnp.isfinite(flat), flat, 0.0), axis=1), jnp.inf
  )
  median = jnp.nanmedian(jnp.where(finite & keep, norms, jnp.nan))
  too_large = finite & (norm_factor > 0) & (norms > norm_factor * median)
  ok = keep & finite & ~too_large
  report = {"nonfinite": keep & ~finite, "too_large": keep & too_large, "norms": norms}
  return ok, _renormalise(weights, ok), report


def coordinate_median(client_tree, keep=None):
  """Median over the kept clients of every coordinate (mean of the middle two for an even
  count); excluded rows may hold NaN."""
  keep = _keep(client_tree, keep)
  return jax.tree.map(
    lambda x: jnp.nanmedian(
      jnp.where(_column(keep, x), x.astype(jnp.float32), jnp.nan), axis=0
    ).astype(x.dtype),
    client_tree,
  )


def check_beta(beta: float) -> None:
  if not 0.0 <= beta < 0.5:
    raise configlib.ConfigError(
      f"trimmed_mean beta={beta!r} must be in [0, 0.5) (it cuts "
      f"floor(beta K) of the K clients from each end)"
    )


def trimmed_mean(client_tree, beta: float, keep=None):
  """Coordinate-wise trimmed mean (Yin et al. 2018): sort each coordinate over the K kept
  clients, drop floor(beta K) from each end, average the rest (scipy.stats.trim_mean's
  convention; beta < 0.5 always leaves at least one)."""
  check_beta(beta)
  keep = _keep(client_tree, keep)
  count = keep.sum()
  cut = jnp.floor(beta * count).astype(jnp.int32)

  def one(x):
    s = jnp.sort(jnp.where(_column(keep, x), x.astype(jnp.float32), jnp.inf), axis=0)
    rank = _column(jnp.arange(x.shape[0]), x)
    inside = (rank >= cut) & (rank < count - cut)
    total = jnp.where(inside, s, 0.0).sum(axis=0)
    return (total / jnp.maximum(count - 2 * cut, 1)).astype(x.dtype)

  return jax.tree.map(one, client_tree)


def check_krum(num_clients: int, num_byzantine: int, num_selected: int = 1) -> None:
  """Krum's static conditions: C > 2f + 2 and 1 <= m <= C."""
  if num_byzantine < 0 or num_clients <= 2 * num_byzantine + 2:
    raise configlib.ConfigError(f"krum needs C > 2f + 2; got C={num_clients}, f={num_byzantine}")
  if not 1 <= num_selected <= num_clients:
    raise configlib.ConfigError(f"krum num_selected={num_selected!r} is not in [1, {num_clients}]")


def krum_scores(client_tree, num_byzantine: int, keep=None):
  """score_i = sum of squared distances to its K - f - 2 nearest other kept clients (at least
  one); inf for the excluded. [C]."""
  num = _num_clients(client_tree)
  check_krum(num, num_byzantine)
  keep = _keep(client_tree, keep)
  v = jnp.where(keep[:, None], _flat(client_tree), 0.0)
  sq = jnp.sum(v * v, axis=1)
  dist = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * v @ v.T, 0.0)
  # never your own neighbour, nor an excluded client
  dist = jnp.where(jnp.eye(num, dtype=bool) | ~keep[None, :], jnp.inf, dist)
  neighbours = jnp.maximum(keep.sum() - num_byzantine - 2, 1)
  nearest = jnp.sort(dist, axis=1)
  scores = jnp.where(jnp.arange(num)[None, :] < neighbours, nearest, 0.0).sum(axis=1)
  return jnp.where(keep, scores, jnp.inf)


def krum(client_tree, num_byzantine: int, num_selected: int = 1, weights=None, keep=None):
  """Krum (m = 1) or Multi-Krum (m > 1): the weighted mean of the m lowest-scoring kept updates
  (fewer when fewer are kept; weights renormalised over them; uniform when None, Flower weights
  by n_k). Returns (aggregate, selected ids [m] in increasing score order)."""
  num = _num_clients(client_tree)
  check_krum(num, num_byzantine, num_selected)
  keep = _keep(client_tree, keep)
  scores = krum_scores(client_tree, num_byzantine, keep)
  selected = jnp.argsort(scores)[:num_selected]
  valid = jnp.arange(num_selected) < keep.sum()
  w = jnp.ones(num) if weights is None else jnp.asarray(weights, jnp.float32)
  sel_w = jnp.where(valid, w[selected], 0.0)
  sel_w = sel_w / jnp.maximum(sel_w.sum(), 1e-30)
  agg = jax.tree.map(
    lambda x: jnp.tensordot(sel_w, x[selected].astype(jnp.float32), axes=(0, 0)).astype(x.dtype),
    client_tree,
  )
  return agg, selected


def norm_bounded_mean(client_tree, weights, max_norm: float, keep=None):
  """Norm bounding (Sun et al. 2019): clip every update to L2 norm max_norm, then the weighted
  mean sum_k w_k clip(D_k) with the weights [C] renormalised over the kept clients."""
  keep = _keep(client_tree, keep)
  clipped, _ = privacy.clip_updates(client_tree, max_norm)
  w = _renormalise(weights, keep)
  return jax.tree.map(
    lambda x: jnp.tensordot(
      w, jnp.where(_column(keep, x), x.astype(jnp.float32), 0.0), axes=(0, 0)
    ).astype(x.dtype),
    clipped,
  )
