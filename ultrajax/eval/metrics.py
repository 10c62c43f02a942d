"""Downstream metrics on host arrays (numpy/scipy): classification, segmentation, confidence intervals.

Classification metrics agree with scikit-learn (`roc_auc_score`, `average_precision_score`,
`f1_score`, `precision_score`, `recall_score` with zero_division=0, `accuracy_score`,
`confusion_matrix`; specificity and NPV from its confusion matrix); `hd95` and
`average_surface_distance` follow medpy (`hd95`, `assd`), `surface_dice` MONAI's
`compute_surface_dice`, all in physical units given the pixel spacing. Where a metric is
undefined (a single class present, empty masks) it returns nan rather than raising, so a study over
many seeds and splits keeps going and reports the gap; each function's docstring says when.

Labels and predicted classes are non-negative integers (integral floats and bools are accepted).
Masks are binary ([H, W] one image, [B, H, W] a batch); segmentation metrics are per image.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
from scipy import ndimage, stats

AVERAGES = ("macro", "binary")
HD95_MODES = ("medpy", "directed_max")
# The range each metric can take (inclusive), for clipping confidence intervals; names as the jobs
# report them. Not listed: unbounded.
_IN_UNIT_INTERVAL = (
  "auroc auc average_precision accuracy f1 precision recall sensitivity specificity npv dice iou "
  "nsd ece"
)
METRIC_RANGES = {
  **dict.fromkeys(_IN_UNIT_INTERVAL.split(), (0.0, 1.0)),
  **dict.fromkeys(("hd95", "asd"), (0.0, math.inf)),
}


def metric_range(name: str) -> tuple[float, float]:
  """(low, high) a metric named `name` can take; (-inf, inf) for a name not in METRIC_RANGES."""
  return METRIC_RANGES.get(name, (-math.inf, math.inf))


# ------------------------------------------------------------------------------------------------
# Input checks


def _labels(x, name: str) -> np.ndarray:
  """[N] non-empty int64 class ids (bools, integral floats accepted); ValueError naming `name`."""
  a = np.asarray(x)
  if a.dtype == bool:
    a = a.astype(np.int64)
  if not np.issubdtype(a.dtype, np.number):
    raise ValueError(f"{name} must hold integer class ids, got dtype {a.dtype}")
  if not np.issubdtype(a.dtype, np.integer):
    bad = ~np.isfinite(a) | (a != np.round(a))
    if np.any(bad):
      raise ValueError(
        f"{name} must hold integer class ids, got values {np.unique(a[bad])[:5].tolist()}"
      )
  a = a.astype(np.int64)
  if a.size and a.min() < 0:
    raise ValueError(f"{name} has negative values {np.unique(a[a < 0])[:5].tolist()}")
  if a.ndim != 1:
    raise ValueError(f"{name} must be 1-D [N], got shape {a.shape}")
  if a.size == 0:
    raise ValueError(f"{name} is empty")
  return a


def _check_range(a: np.ndarray, num_classes: int, name: str) -> None:
  """ValueError if any value of `a` lies outside [0, num_classes)."""
  bad = a >= num_classes
  if np.any(bad):
    raise ValueError(
      f"{name} has values {np.unique(a[bad])[:5].tolist()} outside [0, {num_classes})"
    )


def _label_pair(labels, preds) -> tuple[np.ndarray, np.ndarray]:
  """Validated [N] labels and [N] predicted classes."""
  labels, preds = _labels(labels, "labels"), _labels(preds, "preds")
  if labels.shape != preds.shape:
    raise ValueError(f"labels {labels.shape} and preds {preds.shape} differ in length")
  return labels, preds


def _labels_and_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
  """Validated [N] labels and float64 scores [N] or [N, K >= 2]."""
  labels = _labels(labels, "labels")
  scores = np.asarray(scores, np.float64)
  if scores.ndim not in (1, 2) or (scores.ndim == 2 and scores.shape[1] < 2):
    raise ValueError(f"scores must be [N] or [N, K] with K >= 2, got shape {scores.shape}")
  if scores.shape[0] != labels.shape[0]:
    raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in length")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores contain nan or inf")
  return labels, scores


def check_positive_int(value, name: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


# ------------------------------------------------------------------------------------------------
# Ranking metrics (AUROC, average precision)


def _binary_auroc(positive: np.ndarray, scores: np.ndarray) -> float:
  """Mann-Whitney AUROC with average ranks for ties.  positive: [N] bool (both classes present)."""
  ranks = stats.rankdata(scores)
  n_pos = positive.sum()
  n_neg = positive.size - n_pos
  return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _binary_ap(positive: np.ndarray, scores: np.ndarray) -> float:
  """sklearn's AP = sum_t (R_t - R_{t-1}) P_t over distinct thresholds.  positive: [N] bool, >= 1 True."""
  order = np.argsort(-scores, kind="stable")
  scores, positive = scores[order], positive[order]
  # Tied scores form one threshold: evaluate only at the last index of each group of equal scores.
  last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
  tp = np.cumsum(positive)[last]
  precision = tp / (last + 1)
  recall = tp / tp[-1]
  return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _ovr(
  metric: Callable, name: str, labels: np.ndarray, scores: np.ndarray, defined: Callable
) -> float:
  """Binary metric on [N] scores (or column 1 of [N, 2]), else the macro one-vs-rest mean over K columns.

  defined(positive [N] bool) says whether the binary metric exists; when it does not for the binary
  problem or for any class, warns and returns nan (a macro mean with an undefined term is undefined).
  """
  if scores.ndim == 1 or scores.shape[1] == 2:
    _check_range(labels, 2, "labels")
    positive = labels == 1
    if not defined(positive):
      warnings.warn(
        f"{name}: only class {labels[0]} present in labels; {name} is undefined, returning nan",
        stacklevel=3,
      )
      return math.nan
    return metric(positive, scores if scores.ndim == 1 else scores[:, 1])
  num_classes = scores.shape[1]
  _check_range(labels, num_classes, "labels")
  positives = [labels == k for k in range(num_classes)]
  undefined = [k for k in range(num_classes) if not defined(positives[k])]
  if undefined:
    warnings.warn(
      f"{name}: classes {undefined} of {num_classes} absent from labels; the macro one-vs-rest "
      f"{name} is undefined, returning nan",
      stacklevel=3,
    )
    return math.nan
  return float(np.mean([metric(positives[k], scores[:, k]) for k in range(num_classes)]))


def auroc(labels, scores) -> float:
  """Area under the ROC curve.  labels: [N] int; scores: [N] or [N, K] -> float.

  scores [N] (or [N, 2], column 1 used): binary, labels in {0, 1}, scores of class 1.
  scores [N, K >= 3]: macro one-vs-rest mean over the K classes, labels in [0, K), as sklearn's
  roc_auc_score(multi_class='ovr', average='macro', labels=range(K)); scores need not sum to 1.
  Ties count one half (average ranks), as in sklearn.
  Degenerate: a single class in labels (binary), or any of the K classes absent from labels (macro):
  returns nan with a warning, as sklearn >= 1.6 does.
  """
  labels, scores = _labels_and_scores(labels, scores)
  return _ovr(_binary_auroc, "auroc", labels, scores, lambda pos: 0 < pos.sum() < pos.size)


def average_precision(labels, scores) -> float:
  """Average precision (area under the step precision-recall curve).  labels: [N]; scores: [N] or [N, K].

  Same label and score layouts as `auroc`; the binary value equals sklearn's average_precision_score
  and the [N, K >= 3] value its macro mean over one-vs-rest columns.
  Degenerate: AP is undefined without positives, so labels with no class 1 (binary) or a class absent
  from labels (macro) give nan with a warning, where sklearn returns 0.0 with a warning: a 0.0 would
  pass for a real score and bias bootstrap intervals, nan is skipped. All labels positive gives 1.0
  (precision is 1 at every threshold), as in sklearn.
  """
  labels, scores = _labels_and_scores(labels, scores)
  return _ovr(_binary_ap, "average_precision", labels, scores, lambda pos: pos.any())


# ------------------------------------------------------------------------------------------------
# Metrics on predicted classes


def accuracy(labels, preds) -> float:
  """Fraction of correct predictions.  labels, preds: [N] int -> float."""
  labels, preds = _label_pair(labels, preds)
  return float(np.mean(labels == preds))


def confusion_matrix(labels, preds, num_classes: int) -> np.ndarray:
  """Counts [K, K] int64, rows = true class, columns = predicted class (sklearn's layout).

  labels, preds: [N] int in [0, num_classes).
  """
  check_positive_int(num_classes, "num_classes")
  labels, preds = _label_pair(labels, preds)
  _check_range(labels, num_classes, "labels")
  _check_range(preds, num_classes, "preds")
  counts = np.bincount(labels * num_classes + preds, minlength=num_classes**2)
  return counts.reshape(num_classes, num_classes)


def _counts(labels, preds, average: str, num_classes: int | None) -> tuple[np.ndarray, ...]:
  """Per-class (tp, fp, fn, tn), each [C], over the classes the average runs over (one-vs-rest).

  'binary': class 1 only, labels and preds in {0, 1}. 'macro': range(num_classes), or when None the
  classes seen in labels or preds (sklearn's default `labels`).
  """
  if average not in AVERAGES:
    raise ValueError(f"average={average!r} is not one of {AVERAGES}")
  labels, preds = _label_pair(labels, preds)
  if average == "binary":
    if num_classes not in (None, 2):
      raise ValueError(f"average='binary' needs num_classes None or 2, got {num_classes!r}")
    num_classes, classes = 2, np.array([1])
  elif num_classes is None:
    num_classes, classes = int(max(labels.max(), preds.max())) + 1, np.union1d(labels, preds)
  else:
    classes = np.arange(num_classes)
  cm = confusion_matrix(labels, preds, num_classes)
  tp = np.diag(cm)[classes]
  fp, fn = cm.sum(0)[classes] - tp, cm.sum(1)[classes] - tp
  return tp, fp, fn, labels.size - tp - fp - fn


def _mean_ratio(num: np.ndarray, den: np.ndarray) -> float:
  """Mean of num / den with 0 where den == 0 (sklearn's zero_division=0)."""
  return float(np.mean(np.divide(num, den, out=np.zeros(num.shape), where=den > 0)))


def precision(labels, preds, average: str = "macro", num_classes: int | None = None) -> float:
  """tp / (tp + fp), 0 for a class never predicted.  labels, preds: [N] int -> float.

  average 'binary' scores class 1; 'macro' averages over range(num_classes), or over the classes in
  labels or preds when num_classes is None, as sklearn's precision_score(zero_division=0).
  """
  tp, fp, _, _ = _counts(labels, preds, average, num_classes)
  return _mean_ratio(tp, tp + fp)


def recall(labels, preds, average: str = "macro", num_classes: int | None = None) -> float:
  """tp / (tp + fn), 0 for a class absent from labels.  Averaging as in `precision`."""
  tp, _, fn, _ = _counts(labels, preds, average, num_classes)
  return _mean_ratio(tp, tp + fn)


def f1(labels, preds, average: str = "macro", num_classes: int | None = None) -> float:
  """2 tp / (2 tp + fp + fn), 0 for a class neither present nor predicted.  Averaging as in `precision`."""
  tp, fp, fn, _ = _counts(labels, preds, average, num_classes)
  return _mean_ratio(2 * tp, 2 * tp + fp + fn)


def specificity(labels, preds, average: str = "macro", num_classes: int | None = None) -> float:
  """tn / (tn + fp), the recall of "not class c"; 0 when every image is of class c.

  'binary': class 1 against class 0; 'macro': one-vs-rest per class, averaged as in `precision`.
  """
  _, fp, _, tn = _counts(labels, preds, average, num_classes)
  return _mean_ratio(tn, tn + fp)


def npv(labels, preds, average: str = "macro", num_classes: int | None = None) -> float:
  """Negative predictive value tn / (tn + fn); 0 when class c is predicted for every image.

  Averaging as in `specificity`.
  """
  _, _, fn, tn = _counts(labels, preds, average, num_classes)
  return _mean_ratio(tn, tn + fn)


def expected_calibration_error(labels, probs, num_bins: int = 15) -> float:
  """Top-label expected calibration error (Guo et al. 2017).  labels: [N]; probs: [N] or [N, K].

  probs [N]: probability of class 1 (binary); [N, K]: class probabilities. Each image's confidence
  is its largest class probability and its prediction that class (the first on ties); images fall
  into `num_bins` equal-width bins (lo, hi] of confidence (a confidence of 0 joins the first), and
  ECE = sum_b |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|, in [0, 1].
  """
  check_positive_int(num_bins, "num_bins")
  labels, probs = _labels_and_scores(labels, probs)
  if np.any((probs < 0) | (probs > 1)):
    raise ValueError("probs must lie in [0, 1] (probabilities, not logits)")
  if probs.ndim == 1:
    probs = np.stack([1 - probs, probs], axis=1)
  _check_range(labels, probs.shape[1], "labels")
  confidence, correct = probs.max(1), probs.argmax(1) == labels
  bins = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
  # Per bin |sum correct - sum confidence| = |B_b| |acc_b - conf_b|.
  gap = np.abs(np.bincount(bins, correct, num_bins) - np.bincount(bins, confidence, num_bins))
  return float(gap.sum() / labels.size)


# ------------------------------------------------------------------------------------------------
# Segmentation


def _binary_mask(x, name: str) -> np.ndarray:
  """bool array from bool or 0/1 values; ValueError for anything else (e.g. unthresholded probabilities)."""
  a = np.asarray(x)
  if a.dtype == bool:
    return a
  if not np.issubdtype(a.dtype, np.number) or not np.all((a == 0) | (a == 1)):
    raise ValueError(
      f"{name} must be a binary mask (bool or 0/1), got dtype {a.dtype} with values "
      f"{np.unique(a)[:5].tolist()}..."
    )
  return a.astype(bool)


def _mask_pair(pred, target) -> tuple[np.ndarray, np.ndarray, bool]:
  """pred, target: [H, W] or [B, H, W] binary -> both [B, H, W] bool, and whether the input was batched."""
  pred, target = _binary_mask(pred, "pred"), _binary_mask(target, "target")
  if pred.shape != target.shape:
    raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
  if pred.ndim not in (2, 3):
    raise ValueError(f"masks must be [H, W] or [B, H, W], got shape {pred.shape}")
  return (pred, target, True) if pred.ndim == 3 else (pred[None], target[None], False)


def _unbatch(values: np.ndarray, batched: bool):
  """[B] per-image values, or a float when the input was a single image."""
  return values if batched else float(values[0])


def dice(pred, target):
  """Dice 2|P & T| / (|P| + |T|) per image.  [H, W] -> float; [B, H, W] -> [B] float64.

  Both masks empty: 1.0 (nothing to find and nothing found); one empty: 0.0.
  """
  pred, target, batched = _mask_pair(pred, target)
  inter = (pred & target).sum((1, 2))
  total = pred.sum((1, 2)) + target.sum((1, 2))
  return _unbatch(np.where(total == 0, 1.0, 2 * inter / np.maximum(total, 1)), batched)


def iou(pred, target):
  """Intersection over union |P & T| / |P | T| per image.  [H, W] -> float; [B, H, W] -> [B] float64.

  Both masks empty: 1.0; one empty: 0.0.
  """
  pred, target, batched = _mask_pair(pred, target)
  inter = (pred & target).sum((1, 2))
  union = (pred | target).sum((1, 2))
  return _unbatch(np.where(union == 0, 1.0, inter / np.maximum(union, 1)), batched)


def _surface(mask: np.ndarray) -> np.ndarray:
  """Boundary pixels [H, W] bool: mask minus its erosion by the 4-connected cross (medpy's surface).

  Erosion treats outside the image as background, so mask pixels on the image edge are surface.
  """
  return mask ^ ndimage.binary_erosion(
    mask, structure=ndimage.generate_binary_structure(mask.ndim, 1)
  )


def _surface_distances(pred: np.ndarray, target: np.ndarray, spacing: tuple[float, float]):
  """Distances [Sp], [St] from each surface pixel of pred (target) to the nearest surface pixel of
  the other mask, in the units of `spacing`.  pred, target: [H, W], neither empty."""
  pred_surface, target_surface = _surface(pred), _surface(target)
  # Distance from every pixel to the nearest surface pixel of the other mask, read at own surface.
  d_pt = ndimage.distance_transform_edt(~target_surface, sampling=spacing)[pred_surface]
  d_tp = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[target_surface]
  return d_pt, d_tp


def _spacings(spacing, batch: int) -> np.ndarray:
  """(row, column) pixel sizes, (2,) for all images or [B, 2] one per image -> [B, 2] float64."""
  s = np.asarray(spacing, np.float64)
  if s.shape == (2,):
    s = np.broadcast_to(s, (batch, 2))
  if s.shape != (batch, 2) or not np.all(np.isfinite(s) & (s > 0)):
    raise ValueError(
      f"spacing must be two positive (row, column) sizes or [B={batch}, 2] of them, "
      f"got {np.asarray(spacing).tolist()}"
    )
  return s


def _per_image(fn, pred, target, spacing, *, both_empty: float, one_empty: float):
  """fn(distances of `_surface_distances`) -> float for each image of [H, W] or [B, H, W] masks;
  an image with both masks empty gets both_empty, with exactly one empty one_empty."""
  pred, target, batched = _mask_pair(pred, target)
  spacing = _spacings(spacing, pred.shape[0])
  values = []
  for p, t, s in zip(pred, target, spacing):
    if p.any() and t.any():
      values.append(fn(_surface_distances(p, t, tuple(s))))
    else:
      values.append(one_empty if p.any() or t.any() else both_empty)
  return _unbatch(np.array(values, np.float64), batched)


def hd95(pred, target, spacing=(1.0, 1.0), mode: str = "medpy"):
  """95th-percentile symmetric Hausdorff distance between mask surfaces.

  pred, target: [H, W] -> float, or [B, H, W] -> [B] float64. spacing: (row, column) pixel size, or
  [B, 2] one per image, so the result is in those units (mm given the pixel size in mm). Surface =
  mask XOR its erosion by the 4-connected cross (pixels on the image edge count as surface);
  distances run from each surface pixel to the nearest surface pixel of the other mask, and
  percentiles interpolate linearly. Both definitions in common use:
    'medpy':        p95 of the pred->target and target->pred distances pooled, as
                    medpy.metric.binary.hd95 (the usual choice in PyTorch segmentation code).
    'directed_max': max of the two directed p95s, as MONAI's compute_hausdorff_distance(percentile=95)
                    and DeepMind's surface-distance robust Hausdorff; never below 'medpy'.
  Empty masks: both empty 0.0; exactly one empty nan (no surface to measure to; medpy raises).
  """
  if mode not in HD95_MODES:
    raise ValueError(f"hd95 mode={mode!r} is not one of {HD95_MODES}")

  def one(d):
    if mode == "medpy":
      return np.percentile(np.concatenate(d), 95)
    return max(np.percentile(d[0], 95), np.percentile(d[1], 95))

  return _per_image(one, pred, target, spacing, both_empty=0.0, one_empty=math.nan)


def average_surface_distance(pred, target, spacing=(1.0, 1.0)):
  """Average symmetric surface distance: the mean of the pred->target and target->pred distances
  pooled, as medpy's `assd` (0.5.2) and MONAI's compute_average_surface_distance(symmetric=True).
  Shapes, spacing, surfaces and empty masks as `hd95`."""
  return _per_image(
    lambda d: np.concatenate(d).mean(), pred, target, spacing, both_empty=0.0, one_empty=math.nan
  )


def surface_dice(pred, target, tolerance: float, spacing=(1.0, 1.0)):
  """Normalised surface Dice at `tolerance` (units of spacing), as MONAI's compute_surface_dice.

  (#pred surface pixels within tolerance of the target surface + #target surface pixels within
  tolerance of the pred surface) / (#pred + #target surface pixels), in [0, 1]. Shapes, spacing and
  surfaces as `hd95`. Both masks empty: 1.0 (as `dice`); exactly one empty: 0.0.
  """
  tolerance = float(tolerance)
  if not (math.isfinite(tolerance) and tolerance >= 0):
    raise ValueError(f"surface_dice tolerance must be finite and >= 0, got {tolerance}")

  def one(d):
    return ((d[0] <= tolerance).sum() + (d[1] <= tolerance).sum()) / (d[0].size + d[1].size)

  return _per_image(one, pred, target, spacing, both_empty=1.0, one_empty=0.0)


# ------------------------------------------------------------------------------------------------
# Confidence intervals


def check_alpha(alpha) -> None:
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha={alpha!r} is not in (0, 1)")


def bootstrap_cis(
  metrics_fn: Callable, *arrays, num_samples: int = 1000, alpha: float = 0.05, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
  """Percentile bootstrap {name: (estimate, low, high)} of every metric in metrics_fn(*arrays) -> dict.

  arrays: each [N, ...]; rows (samples, images) are resampled jointly with replacement, num_samples
  times, one set of resampled rows shared by all metrics (so each resample is scored once), and
  [low, high] are the alpha/2 and 1 - alpha/2 percentiles of each resampled metric. The estimate is
  the metric on the full data. Resamples where a metric is nan (e.g. AUROC on a resample with one
  class) are skipped for that metric, with one warning giving their count; the metrics' own
  warnings inside resamples are silenced for that reason. If every resample is nan, low and high
  are nan.
  """
  if not arrays:
    raise ValueError("bootstrap needs at least one array to resample")
  arrays = [np.asarray(a) for a in arrays]
  lengths = [a.shape[0] if a.ndim else None for a in arrays]
  if None in lengths or len(set(lengths)) != 1 or lengths[0] == 0:
    raise ValueError(
      f"arrays must share a non-zero leading length N, got shapes {[a.shape for a in arrays]}"
    )
  check_positive_int(num_samples, "num_samples")
  check_alpha(alpha)
  n = lengths[0]
  estimates = {k: float(v) for k, v in metrics_fn(*arrays).items()}
  rng = np.random.default_rng(seed)
  values = np.empty((num_samples, len(estimates)))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for i in range(num_samples):
      rows = rng.integers(0, n, n)
      scores = metrics_fn(*(a[rows] for a in arrays))
      values[i] = [float(scores[k]) for k in estimates]
  out = {}
  percentiles = [100 * alpha / 2, 100 * (1 - alpha / 2)]
  for j, name in enumerate(estimates):
    v = values[~np.isnan(values[:, j]), j]
    if v.size < num_samples:
      warnings.warn(
        f"bootstrap: {num_samples - v.size} of {num_samples} resamples gave nan for "
        f"{name} and were skipped",
        stacklevel=2,
      )
    low, high = np.percentile(v, percentiles) if v.size else (math.nan, math.nan)
    out[name] = (estimates[name], float(low), float(high))
  return out


def bootstrap_ci(
  metric_fn: Callable, *arrays, num_samples: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
  """Percentile bootstrap (estimate, low, high) of one metric_fn(*arrays) -> float; see
  `bootstrap_cis` (the same resamples for the same seed)."""
  return bootstrap_cis(
    lambda *a: {"metric": metric_fn(*a)}, *arrays, num_samples=num_samples, alpha=alpha, seed=seed
  )["metric"]


def mean_ci(
  values, alpha: float = 0.05, bounds=(-math.inf, math.inf)
) -> tuple[float, float, float]:
  """Mean and Student-t (1 - alpha) interval (mean, low, high) over repeats, e.g. five seeds.  values: [S].

  Half-width t_{1 - alpha/2, S-1} * std(ddof=1) / sqrt(S), then clipped to `bounds`, the range the
  metric can take (`metric_range(name)`; with two seeds the t interval is wide enough to leave
  [0, 1]). With S = 1 the interval is (nan, nan); a nan among values gives nan throughout.
  """
  check_alpha(alpha)
  v = np.asarray(values, np.float64)
  if v.ndim != 1 or v.size == 0:
    raise ValueError(f"values must be a non-empty 1-D array [S], got shape {v.shape}")
  low_bound, high_bound = bounds
  if not low_bound < high_bound:
    raise ValueError(f"bounds={tuple(bounds)} must be (low, high) with low < high")
  mean = float(v.mean())
  if v.size == 1:
    return mean, math.nan, math.nan
  half = stats.t.ppf(1 - alpha / 2, df=v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
  low, high = np.clip([mean - half, mean + half], low_bound, high_bound)
  return mean, float(low), float(high)
