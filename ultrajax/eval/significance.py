"""Significance tests for comparing two models on the same test data (numpy/scipy, host arrays):
a metric over paired repeats (paired_ttest), any metric on one test set (paired_bootstrap, as
HSL), AUROC (delong_test: DeLong et al. 1988 with Sun & Xu's 2014 midrank algorithm). Each
returns a `Comparison`: diff = a - b, its (1 - alpha) interval and the two-sided p-value.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable

import numpy as np
from scipy import stats

from ultrajax.eval import metrics


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Outcome of a two-sided test of 'a and b are equal': diff = estimate(a) - estimate(b)."""

  diff: float
  ci_low: float
  ci_high: float
  pvalue: float
  statistic: float = math.nan  # t (t-test) or z (DeLong); nan for the bootstrap


NAN = Comparison(math.nan, math.nan, math.nan, math.nan)


def _two_sided(diff: float, se: float, alpha: float, dist) -> Comparison:
  """diff -/+ dist's (1 - alpha/2) quantile x se, and the two-sided p-value of diff / se under
  dist (a scipy distribution: Student t or normal). se 0 (no spread): p = 1 when diff is 0 (the
  statistic 0), else p = 0 (the statistic +-inf)."""
  if se == 0.0:
    stat = 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    return Comparison(diff, diff, diff, 1.0 if diff == 0.0 else 0.0, stat)
  half = dist.ppf(1 - alpha / 2) * se
  return Comparison(diff, diff - half, diff + half, float(2 * dist.sf(abs(diff / se))), diff / se)


def paired_ttest(a, b, alpha: float = 0.05) -> Comparison:
  """Two-sided paired t-test of mean(a - b) = 0.  a, b: [S] (e.g. one metric per seed).

  t = mean(d) / (std(d, ddof=1) / sqrt(S)) with S - 1 degrees of freedom, as
  scipy.stats.ttest_rel; the interval is the Student-t interval of mean(d). Pairs with a nan
  are dropped; fewer than two pairs left give nan (but diff). Identical differences (zero spread): p = 1
  when they are all 0 (scipy: nan), p = 0 otherwise (as scipy).
  """
  metrics.check_alpha(alpha)
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(
      f"paired_ttest needs two [S] arrays of equal length, got {a.shape} and {b.shape}"
    )
  d = (a - b)[np.isfinite(a) & np.isfinite(b)]
  if d.size < 2:  # no spread to test against: only the difference, if there is one
    return Comparison(float(d[0]), math.nan, math.nan, math.nan) if d.size else NAN
  se = float(d.std(ddof=1)) / math.sqrt(d.size)
  return _two_sided(float(d.mean()), se, alpha, stats.t(d.size - 1))


def paired_bootstrap(
  metric_fn: Callable,
  targets,
  outputs_a,
  outputs_b,
  *,
  num_samples: int = 1000,
  alpha: float = 0.05,
  seed: int = 0,
):
  """Paired percentile bootstrap of metric_fn(targets, outputs_a) - metric_fn(targets, outputs_b).

  targets: [N, ...] or None (then metric_fn(outputs) takes one argument, e.g. np.mean of
  per-image Dice); outputs_a, outputs_b: [N, ...] the two models' outputs on the same N cases.
  metric_fn returns a float -> one Comparison, or a dict {name: float} -> {name: Comparison},
  every metric scored on the same resamples. Each resample draws N cases with replacement and
  scores both models on them, so the correlation between the models is kept. diff is the
  full-data difference; the interval is the alpha/2 and 1 - alpha/2 percentiles of the
  resampled differences; the two-sided p-value is 2 min(#{d* <= 0}, #{d* >= 0}) plus one each,
  over the resamples plus one, capped at 1 (identical models give 1). Resamples where a metric
  is nan for either model (AUROC on one class) are skipped for it, with a warning giving their
  count.
  """
  metrics.check_alpha(alpha)
  metrics.check_positive_int(num_samples, "num_samples")
  outputs_a, outputs_b = np.asarray(outputs_a), np.asarray(outputs_b)
  arrays = [outputs_a, outputs_b] + ([] if targets is None else [np.asarray(targets)])
  n = outputs_a.shape[0] if outputs_a.ndim else 0
  misfit = any(x.ndim == 0 or x.shape[0] != n for x in arrays)
  if n == 0 or misfit or outputs_a.shape != outputs_b.shape:
    raise ValueError(
      f"paired_bootstrap needs outputs of equal shape [N, ...] (N > 0) and targets "
      f"[N, ...], got {[x.shape for x in arrays]}"
    )

  def score(out, rows):
    value = metric_fn(out[rows]) if targets is None else metric_fn(arrays[2][rows], out[rows])
    return value if isinstance(value, dict) else {None: value}

  everything = np.arange(n)
  full_a, full_b = score(outputs_a, everything), score(outputs_b, everything)
  names = list(full_a)
  rng = np.random.default_rng(seed)
  deltas = np.empty((num_samples, len(names)))
  with warnings.catch_warnings():  # the metrics' own nan warnings inside resamples
    warnings.simplefilter("ignore")
    for i in range(num_samples):
      rows = rng.integers(0, n, n)
      a, b = score(outputs_a, rows), score(outputs_b, rows)
      deltas[i] = [float(a[k]) - float(b[k]) for k in names]
  out = {}
  for j, name in enumerate(names):
    diff = float(full_a[name]) - float(full_b[name])
    d = deltas[np.isfinite(deltas[:, j]), j]
    if d.size < num_samples:
      warnings.warn(
        f"paired_bootstrap: {num_samples - d.size} of {num_samples} resamples gave "
        f"nan{'' if name is None else ' for ' + name} and were skipped",
        stacklevel=2,
      )
    if d.size == 0:
      out[name] = Comparison(diff, math.nan, math.nan, math.nan)
      continue
    low, high = np.percentile(d, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    tail = min(np.sum(d <= 0), np.sum(d >= 0))
    out[name] = Comparison(diff, float(low), float(high), min(1.0, 2 * (tail + 1) / (d.size + 1)))
  return out.get(None, out)


# ------------------------------------------------------------------------------------------------
# DeLong


def _binary_labels(labels, n: int) -> np.ndarray:
  """[N] bool positives; ValueError unless labels are 0/1 with both classes present."""
  y = np.asarray(labels)
  if y.shape != (n,):
    raise ValueError(f"labels must be [N] = [{n}], got shape {y.shape}")
  if not np.all((y == 0) | (y == 1)):
    raise ValueError(
      f"DeLong needs binary labels in {{0, 1}}, got values {np.unique(y)[:5].tolist()}"
    )
  y = y.astype(bool)
  if y.all() or not y.any():
    raise ValueError("DeLong needs both classes among the labels")
  return y


def delong_components(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """AUROCs and DeLong's structural components of K score vectors on the same cases.

  labels: [N] in {0, 1} (both present); scores: [N] or [K, N] (higher = more positive).
  Returns auc [K], v10 [K, m] (one per positive: the fraction of negatives it outranks, ties
  counting one half) and v01 [K, n] (one per negative: the fraction of positives that outrank
  it), where m, n are the positive and negative counts. Sun & Xu (2014): with midranks
  T_z over all cases, T_x within the positives and T_y within the negatives,
  v10 = (T_z - T_x) / n over positives, v01 = 1 - (T_z - T_y) / m over negatives.
  """
  scores = np.atleast_2d(np.asarray(scores, np.float64))
  if scores.ndim != 2:
    raise ValueError(f"scores must be [N] or [K, N], got shape {scores.shape}")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores contain nan or inf")
  positive = _binary_labels(labels, scores.shape[1])
  x, y = scores[:, positive], scores[:, ~positive]
  m, n = x.shape[1], y.shape[1]
  tz = stats.rankdata(scores, axis=1)  # midranks (average ranks of ties)
  tx, ty = stats.rankdata(x, axis=1), stats.rankdata(y, axis=1)
  auc = (tz[:, positive].sum(1) - m * (m + 1) / 2) / (m * n)
  v10 = (tz[:, positive] - tx) / n
  v01 = 1.0 - (tz[:, ~positive] - ty) / m
  return auc, v10, v01


def delong_covariance(labels, scores) -> tuple[np.ndarray, np.ndarray]:
  """(auc [K], covariance [K, K]) of the AUROCs: S10 / m + S01 / n (sample covariances, ddof=1)."""
  auc, v10, v01 = delong_components(labels, scores)
  m, n = v10.shape[1], v01.shape[1]
  s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(auc), len(auc)))
  s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(auc), len(auc)))
  return auc, s10 / m + s01 / n


def delong_ci(labels, scores, alpha: float = 0.05) -> tuple[float, float, float, float]:
  """(auc, low, high, variance): DeLong variance and auc -/+ z_{1-alpha/2} sqrt(var), clipped
  to [0, 1] as pROC's ci.auc(method='delong').  labels: [N] in {0, 1}; scores: [N]."""
  metrics.check_alpha(alpha)
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 1:
    raise ValueError(f"delong_ci scores must be [N], got shape {scores.shape}")
  auc, cov = delong_covariance(labels, scores)
  var = float(cov[0, 0])
  half = stats.norm.ppf(1 - alpha / 2) * math.sqrt(var)
  a = float(auc[0])
  return a, max(0.0, a - half), min(1.0, a + half), var


def delong_test(labels, scores_a, scores_b, alpha: float = 0.05) -> Comparison:
  """DeLong's test of AUROC(a) = AUROC(b) for two models scoring the same cases.

  labels: [N] in {0, 1} (both present); scores_a, scores_b: [N]. z = (auc_a - auc_b) / sqrt(var)
  with var = Var(a) + Var(b) - 2 Cov(a, b) from the structural components; two-sided normal
  p-value and the (1 - alpha) normal interval of the difference. Identical scores (var 0 and
  diff 0) give p = 1.
  """
  metrics.check_alpha(alpha)
  scores_a, scores_b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
  if scores_a.ndim != 1 or scores_a.shape != scores_b.shape:
    raise ValueError(
      f"delong_test needs two [N] score arrays, got {scores_a.shape} and {scores_b.shape}"
    )
  auc, cov = delong_covariance(labels, np.stack([scores_a, scores_b]))
  diff = float(auc[0] - auc[1])
  var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
  return _two_sided(diff, math.sqrt(var) if var > 1e-300 else 0.0, alpha, stats.norm)


# ------------------------------------------------------------------------------------------------
# Study summaries


def versus_reference(
  metric_fn: Callable,
  values,
  ref_values,
  targets,
  outputs,
  ref_outputs,
  *,
  num_samples: int = 1000,
  alpha: float = 0.05,
  seed: int = 0,
) -> dict:
  """The p-value columns of one method against a reference method (e.g. every HSL baseline
  against HSL), for a study whose repeats score both on the same test cases.

  values, ref_values: [R] the metric per repeat (paired by repeat) -> diff (mean of the
  differences) and p_ttest (two-sided paired t-test). targets: [N] and outputs, ref_outputs:
  [N, ...] the test cases of all repeats pooled in the same order for both methods ->
  p_bootstrap (paired bootstrap of metric_fn(targets, outputs), nan when the pooled cases
  leave the metric undefined).
  """
  t = paired_ttest(values, ref_values, alpha)
  try:
    boot = paired_bootstrap(
      metric_fn, targets, outputs, ref_outputs, num_samples=num_samples, alpha=alpha, seed=seed
    ).pvalue
  except ValueError:  # no pooled test cases
    boot = math.nan
  return {"diff": t.diff, "p_ttest": t.pvalue, "p_bootstrap": boot}
