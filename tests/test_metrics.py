"""Metrics against scikit-learn and against brute-force references written independently here."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage
from skimage.segmentation import find_boundaries
from sklearn import metrics as skm

from ultrajax.eval import metrics

TOL = 1e-6


def _tied_probs(rng, n, k):
  """[n, k] rows summing to 1 built from small integers, so columns have many ties."""
  counts = rng.integers(0, 4, (n, k)) + (rng.random((n, k)) < 0.2)
  counts[counts.sum(1) == 0, 0] = 1
  return counts / counts.sum(1, keepdims=True)


def _labels_with_all(rng, n, k):
  """[n] labels in [0, k) in which every class occurs."""
  labels = rng.integers(0, k, n)
  labels[:k] = np.arange(k)
  return rng.permutation(labels)


# ------------------------------------------------------------------------------------------------
# Ranking metrics


@pytest.mark.parametrize("tied", [True, False])
def test_binary_auroc_and_ap_match_sklearn(tied):
  rng = np.random.default_rng(0)
  for _ in range(60):
    n = int(rng.integers(2, 80))
    labels = _labels_with_all(rng, n, 2)
    scores = rng.normal(size=n)
    if tied:
      scores = np.round(scores, 0)
    assert abs(metrics.auroc(labels, scores) - skm.roc_auc_score(labels, scores)) < TOL
    assert (
      abs(metrics.average_precision(labels, scores) - skm.average_precision_score(labels, scores))
      < TOL
    )


def test_two_column_scores_use_column_one():
  rng = np.random.default_rng(1)
  labels = _labels_with_all(rng, 50, 2)
  probs = _tied_probs(rng, 50, 2)
  assert abs(metrics.auroc(labels, probs) - skm.roc_auc_score(labels, probs[:, 1])) < TOL
  assert (
    abs(metrics.average_precision(labels, probs) - skm.average_precision_score(labels, probs[:, 1]))
    < TOL
  )


def test_multiclass_macro_ovr_matches_sklearn():
  rng = np.random.default_rng(2)
  for _ in range(40):
    k = int(rng.integers(3, 6))
    n = int(rng.integers(k, 90))
    labels = _labels_with_all(rng, n, k)
    probs = _tied_probs(rng, n, k)
    want_auc = skm.roc_auc_score(
      labels, probs, multi_class="ovr", average="macro", labels=np.arange(k)
    )
    want_ap = skm.average_precision_score(np.eye(k)[labels], probs, average="macro")
    assert abs(metrics.auroc(labels, probs) - want_auc) < TOL
    assert abs(metrics.average_precision(labels, probs) - want_ap) < TOL


def test_single_class_auroc_is_nan_with_warning_like_sklearn():
  scores = [0.1, 0.4, 0.2]
  for labels in ([0, 0, 0], [1, 1, 1]):
    with pytest.warns(UserWarning, match="only class"):
      assert math.isnan(metrics.auroc(labels, scores))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      assert math.isnan(skm.roc_auc_score(labels, scores))


def test_absent_class_makes_macro_auroc_and_ap_nan():
  probs = _tied_probs(np.random.default_rng(3), 6, 3)
  labels = [0, 1, 0, 1, 1, 0]
  with pytest.warns(UserWarning, match=r"classes \[2\]"):
    assert math.isnan(metrics.auroc(labels, probs))
  with pytest.warns(UserWarning, match=r"classes \[2\]"):
    assert math.isnan(metrics.average_precision(labels, probs))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert math.isnan(skm.roc_auc_score(labels, probs, multi_class="ovr", labels=[0, 1, 2]))


def test_ap_without_positives_is_nan_and_all_positive_is_one():
  with pytest.warns(UserWarning, match="only class 0"):
    assert math.isnan(metrics.average_precision([0, 0, 0], [0.3, 0.1, 0.2]))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert metrics.average_precision([1, 1, 1], [0.3, 0.1, 0.2]) == 1.0


def test_perfect_and_reversed_rankings():
  labels = np.array([0, 0, 1, 1, 1])
  scores = np.array([0.1, 0.2, 0.7, 0.8, 0.9])
  assert metrics.auroc(labels, scores) == 1.0
  assert metrics.average_precision(labels, scores) == 1.0
  assert metrics.auroc(labels, -scores) == 0.0
  assert metrics.auroc(labels, np.zeros(5)) == 0.5


def test_ranking_metrics_reject_bad_input():
  with pytest.raises(ValueError, match="differ in length"):
    metrics.auroc([0, 1, 1], [0.1, 0.2])
  with pytest.raises(ValueError, match=r"labels has values \[2\] outside \[0, 2\)"):
    metrics.auroc([0, 1, 2], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
    metrics.average_precision([0, 1, 3], np.full((3, 3), 1 / 3))
  with pytest.raises(ValueError, match="negative"):
    metrics.auroc([0, -1, 1], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="integer class ids"):
    metrics.auroc([0, 0.5, 1], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="nan or inf"):
    metrics.auroc([0, 1, 1], [0.1, np.nan, 0.3])
  with pytest.raises(ValueError, match="scores must be"):
    metrics.auroc([0, 1], np.zeros((2, 1)))


# ------------------------------------------------------------------------------------------------
# Metrics on predicted classes


def test_class_metrics_match_sklearn():
  rng = np.random.default_rng(4)
  for _ in range(60):
    k = int(rng.integers(2, 6))
    n = int(rng.integers(1, 40))
    labels, preds = rng.integers(0, k, n), rng.integers(0, k, n)
    preds = np.where(
      rng.random(n) < 0.4, labels, preds
    )  # correlated; small n leaves classes missing
    assert abs(metrics.accuracy(labels, preds) - skm.accuracy_score(labels, preds)) < TOL
    np.testing.assert_array_equal(
      metrics.confusion_matrix(labels, preds, k),
      skm.confusion_matrix(labels, preds, labels=np.arange(k)),
    )
    for ours, theirs in (
      (metrics.f1, skm.f1_score),
      (metrics.precision, skm.precision_score),
      (metrics.recall, skm.recall_score),
    ):
      assert (
        abs(ours(labels, preds) - theirs(labels, preds, average="macro", zero_division=0)) < TOL
      )
      assert (
        abs(
          ours(labels, preds, num_classes=k)
          - theirs(labels, preds, average="macro", labels=np.arange(k), zero_division=0)
        )
        < TOL
      )
      b_labels, b_preds = labels % 2, preds % 2
      assert (
        abs(
          ours(b_labels, b_preds, average="binary")
          - theirs(b_labels, b_preds, average="binary", zero_division=0)
        )
        < TOL
      )


def test_specificity_and_npv_match_sklearn_confusion_matrix():
  rng = np.random.default_rng(10)
  for _ in range(40):
    k = int(rng.integers(2, 5))
    n = int(rng.integers(1, 40))
    labels, preds = rng.integers(0, k, n), rng.integers(0, k, n)
    preds = np.where(rng.random(n) < 0.5, labels, preds)
    spec, npv = [], []
    for c in range(k):  # one-vs-rest 2 x 2 tables from sklearn
      tn, fp, fn, _ = skm.confusion_matrix(labels == c, preds == c, labels=[False, True]).ravel()
      spec.append(tn / (tn + fp) if tn + fp else 0.0)
      npv.append(tn / (tn + fn) if tn + fn else 0.0)
    assert abs(metrics.specificity(labels, preds, num_classes=k) - np.mean(spec)) < TOL
    assert abs(metrics.npv(labels, preds, num_classes=k) - np.mean(npv)) < TOL
    b_labels, b_preds = labels % 2, preds % 2
    tn, fp, fn, _ = skm.confusion_matrix(b_labels, b_preds, labels=[0, 1]).ravel()
    assert (
      abs(
        metrics.specificity(b_labels, b_preds, average="binary")
        - (tn / (tn + fp) if tn + fp else 0.0)
      )
      < TOL
    )
    assert (
      abs(metrics.npv(b_labels, b_preds, average="binary") - (tn / (tn + fn) if tn + fn else 0.0))
      < TOL
    )


def test_expected_calibration_error_by_hand():
  # 4 bins of width 0.25. Confidences (max prob): 0.9, 0.8, 0.6, 0.55, 0.3 (of 3 classes).
  probs = np.array(
    [[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.25, 0.55], [0.3, 0.3, 0.4 - 0.1]]
  )
  labels = np.array(
    [0, 2, 0, 2, 1]
  )  # right, wrong, right, right, wrong (argmax of row 5 is class 0)
  # Bin (0.75, 1]: {0.9 right, 0.8 wrong}: |1/2 - 0.85| * 2/5 = 0.14.
  # Bin (0.5, 0.75]: {0.6 right, 0.55 right}: |1 - 0.575| * 2/5 = 0.17.
  # Bin (0.25, 0.5]: {0.3 wrong}: |0 - 0.3| * 1/5 = 0.06.
  assert metrics.expected_calibration_error(labels, probs, num_bins=4) == pytest.approx(0.37)
  # Binary [N] probabilities of class 1: confidences 0.9 (pred 1), 0.7 (pred 0), 0.6 (pred 1).
  p1 = np.array([0.9, 0.3, 0.6])
  # 2 bins: (0.5, 1] holds all three, accuracy 2/3 (label of the 0.6 one is 0), confidence 0.7333.
  assert metrics.expected_calibration_error([1, 0, 0], p1, num_bins=2) == pytest.approx(
    abs(2 / 3 - 2.2 / 3)
  )
  assert metrics.expected_calibration_error([1, 0], np.array([1.0, 0.0])) == 0.0
  with pytest.raises(ValueError, match="logits"):
    metrics.expected_calibration_error([0, 1], np.array([-1.0, 2.0]))


def test_all_correct_and_all_wrong():
  labels = np.array([0, 1, 2, 1, 0])
  for fn in (metrics.accuracy, metrics.f1, metrics.precision, metrics.recall):
    assert fn(labels, labels) == 1.0
    assert fn(labels, (labels + 1) % 3) == 0.0
  np.testing.assert_array_equal(metrics.confusion_matrix(labels, labels, 3), np.diag([2, 2, 1]))
  assert (
    metrics.f1([0, 0, 0], [0, 0, 0], average="binary") == 0.0
  )  # no positives anywhere: zero_division=0


def test_class_metrics_reject_bad_input():
  with pytest.raises(ValueError, match="differ in length"):
    metrics.accuracy([0, 1], [0, 1, 1])
  with pytest.raises(ValueError, match=r"preds has values \[3\] outside \[0, 3\)"):
    metrics.confusion_matrix([0, 1, 2], [0, 1, 3], 3)
  with pytest.raises(ValueError, match=r"labels has values \[2\] outside \[0, 2\)"):
    metrics.f1([0, 2], [0, 1], average="binary")
  with pytest.raises(ValueError, match="average='micro'"):
    metrics.f1([0, 1], [0, 1], average="micro")
  with pytest.raises(ValueError, match="num_classes"):
    metrics.confusion_matrix([0, 1], [0, 1], 0)
  with pytest.raises(ValueError, match="labels is empty"):
    metrics.accuracy([], [])


# ------------------------------------------------------------------------------------------------
# Segmentation


def test_dice_and_iou_by_hand():
  pred = np.array([[1, 1, 0], [0, 1, 0]])
  target = np.array([[1, 0, 0], [0, 1, 1]])
  assert metrics.dice(pred, target) == pytest.approx(2 * 2 / (3 + 3))
  assert metrics.iou(pred, target) == pytest.approx(2 / 4)
  empty = np.zeros((2, 3), bool)
  assert metrics.dice(empty, empty) == 1.0 and metrics.iou(empty, empty) == 1.0
  assert metrics.dice(pred, empty) == 0.0 and metrics.iou(empty, target) == 0.0
  batch = metrics.dice(np.stack([pred, empty, pred]), np.stack([target, empty, pred]))
  np.testing.assert_allclose(batch, [2 / 3, 1.0, 1.0])


def _reference_distances(pred, target, spacing):
  """Surface distances by brute force: inner boundaries from skimage (zero-padded so image-edge pixels
  count, as in medpy), all pairwise physical distances between boundary pixels, nearest per pixel.
  Returns (pred -> target [Sp], target -> pred [St])."""

  def surface_points(mask):
    inner = find_boundaries(np.pad(mask, 1), connectivity=1, mode="inner")[1:-1, 1:-1]
    return np.argwhere(inner) * np.asarray(spacing)

  a, b = surface_points(pred), surface_points(target)
  d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
  return d.min(1), d.min(0)


def _reference_hd95(pred, target, spacing, mode):
  d_pt, d_tp = _reference_distances(pred, target, spacing)
  if mode == "medpy":
    return np.percentile(np.r_[d_pt, d_tp], 95)
  return max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))


def _random_mask(rng, shape):
  """Irregular, possibly multi-part binary mask [H, W] (smoothed noise over a threshold), never empty."""
  field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=rng.uniform(1.5, 4))
  mask = field > np.quantile(field, rng.uniform(0.5, 0.9))
  mask[rng.integers(shape[0]), rng.integers(shape[1])] = True
  return mask


@pytest.mark.parametrize("mode", metrics.HD95_MODES)
@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.5, 1.3)])
def test_hd95_matches_brute_force_reference(spacing, mode):
  rng = np.random.default_rng(5)
  for _ in range(25):
    shape = tuple(int(s) for s in rng.integers(8, 40, 2))
    pred, target = _random_mask(rng, shape), _random_mask(rng, shape)
    want = _reference_hd95(pred, target, spacing, mode)
    assert abs(metrics.hd95(pred, target, spacing, mode=mode) - want) < TOL


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.5, 1.3)])
def test_asd_and_surface_dice_match_brute_force_reference(spacing):
  rng = np.random.default_rng(8)
  for _ in range(20):
    shape = tuple(int(s) for s in rng.integers(8, 40, 2))
    pred, target = _random_mask(rng, shape), _random_mask(rng, shape)
    d_pt, d_tp = _reference_distances(pred, target, spacing)
    assert (
      abs(metrics.average_surface_distance(pred, target, spacing) - np.r_[d_pt, d_tp].mean()) < TOL
    )
    for tol in (0.0, 1.0, 2.5):
      want = ((d_pt <= tol).sum() + (d_tp <= tol).sum()) / (d_pt.size + d_tp.size)
      assert abs(metrics.surface_dice(pred, target, tol, spacing) - want) < TOL


def test_surface_metrics_take_one_spacing_per_image():
  """[B, 2] spacings (e.g. mm per resized pixel, different for every image) equal image-by-image."""
  rng = np.random.default_rng(9)
  pred = np.stack([_random_mask(rng, (20, 24)) for _ in range(3)])
  target = np.stack([_random_mask(rng, (20, 24)) for _ in range(3)])
  spacing = np.array([[0.1, 0.1], [0.2, 0.05], [1.0, 3.0]])
  for fn in (
    metrics.hd95,
    metrics.average_surface_distance,
    lambda p, t, s: metrics.surface_dice(p, t, 0.5, s),
  ):
    np.testing.assert_allclose(
      fn(pred, target, spacing), [fn(p, t, s) for p, t, s in zip(pred, target, spacing)], atol=TOL
    )
  with pytest.raises(ValueError, match=r"\[B=3, 2\]"):
    metrics.hd95(pred, target, spacing[:2])


def test_hd95_by_hand_and_batched():
  target = np.zeros((10, 10), bool)
  target[2:5, 2:5] = True
  shifted = np.roll(target, 3, axis=1)  # same square three columns to the right
  assert metrics.hd95(target, target) == 0.0
  assert metrics.hd95(shifted, target) == pytest.approx(3.0)
  assert metrics.hd95(shifted, target, spacing=(1.0, 0.5)) == pytest.approx(1.5)
  empty = np.zeros_like(target)
  out = metrics.hd95(
    np.stack([shifted, empty, empty, target]), np.stack([target, empty, target, empty])
  )
  assert out.shape == (4,)
  assert out[0] == pytest.approx(3.0) and out[1] == 0.0 and np.isnan(out[2]) and np.isnan(out[3])


def test_hd95_modes_differ_on_a_stray_blob():
  pred = np.zeros((40, 40), bool)
  pred[2:12, 2:12] = True
  target = pred.copy()
  target[34:36, 34:36] = True  # 4 of target's 40 surface pixels lie far from pred
  pooled, directed = metrics.hd95(pred, target), metrics.hd95(pred, target, mode="directed_max")
  assert directed > 20 and pooled < directed


def test_surface_metrics_by_hand():
  target = np.zeros((10, 10), bool)
  target[2:5, 2:5] = True  # 8 surface pixels
  shifted = np.roll(target, 1, axis=1)  # one column right
  # Each way, 4 of the 8 surface pixels (top and bottom rows, shared columns) lie on the other
  # surface and the other 4 one column (0.5 mm) from it; one row away would be 2 mm.
  assert metrics.average_surface_distance(shifted, target, (2.0, 0.5)) == pytest.approx(4 * 0.5 / 8)
  assert metrics.surface_dice(shifted, target, 0.0, (2.0, 0.5)) == pytest.approx(8 / 16)
  assert metrics.surface_dice(shifted, target, 0.5, (2.0, 0.5)) == 1.0
  empty = np.zeros_like(target)
  out = metrics.surface_dice(np.stack([empty, empty]), np.stack([empty, target]), 1.0)
  np.testing.assert_array_equal(out, [1.0, 0.0])
  assert np.isnan(metrics.average_surface_distance(empty, target))


def test_hd95_matches_medpy_when_installed():
  medpy_binary = pytest.importorskip("medpy.metric.binary")
  rng = np.random.default_rng(6)
  for spacing in ((1.0, 1.0), (0.7, 1.9)):
    for _ in range(10):
      pred, target = _random_mask(rng, (30, 25)), _random_mask(rng, (30, 25))
      want = medpy_binary.hd95(pred, target, voxelspacing=spacing)
      assert abs(metrics.hd95(pred, target, spacing) - want) < TOL
      want = medpy_binary.assd(pred, target, voxelspacing=spacing)
      assert abs(metrics.average_surface_distance(pred, target, spacing) - want) < TOL


def test_segmentation_metrics_reject_bad_input():
  mask = np.zeros((4, 4), bool)
  with pytest.raises(ValueError, match=r"pred \(4, 4\) and target \(4, 5\) differ"):
    metrics.dice(mask, np.zeros((4, 5), bool))
  with pytest.raises(ValueError, match="pred must be a binary mask"):
    metrics.iou(np.full((4, 4), 0.3), mask)
  with pytest.raises(ValueError, match="target must be a binary mask"):
    metrics.hd95(mask, np.full((4, 4), 2))
  with pytest.raises(ValueError, match="spacing"):
    metrics.hd95(mask, mask, spacing=(1.0, -1.0))
  with pytest.raises(ValueError, match="tolerance"):
    metrics.surface_dice(mask, mask, -1.0)
  with pytest.raises(ValueError, match="mode='mean'"):
    metrics.hd95(mask, mask, mode="mean")
  with pytest.raises(ValueError, match=r"\[H, W\] or \[B, H, W\]"):
    metrics.dice(np.zeros(4, bool), np.zeros(4, bool))


# ------------------------------------------------------------------------------------------------
# Confidence intervals


def test_bootstrap_ci_contains_estimate_narrows_and_is_seeded():
  rng = np.random.default_rng(7)
  widths = []
  for n in (100, 2000):
    labels = rng.integers(0, 2, n)
    preds = np.where(rng.random(n) < 0.8, labels, 1 - labels)
    est, low, high = metrics.bootstrap_ci(metrics.accuracy, labels, preds, num_samples=300)
    assert est == metrics.accuracy(labels, preds)
    assert low < est < high
    widths.append(high - low)
  assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 20x the data, ~4.5x narrower
  again = metrics.bootstrap_ci(metrics.accuracy, labels, preds, num_samples=300)
  assert again == (est, low, high)


def test_bootstrap_cis_share_one_set_of_resamples():
  rng = np.random.default_rng(11)
  labels = rng.integers(0, 2, 60)
  scores = np.clip(labels * 0.3 + rng.random(60) * 0.7, 0, 1)
  calls = []

  def scores_fn(t, s):
    calls.append(1)
    return {"auroc": metrics.auroc(t, s), "accuracy": metrics.accuracy(t, s > 0.5)}

  out = metrics.bootstrap_cis(scores_fn, labels, scores, num_samples=100, seed=3)
  assert len(calls) == 101  # the full data once, then each resample once for both metrics
  for name, fn in (
    ("auroc", metrics.auroc),
    ("accuracy", lambda t, s: metrics.accuracy(t, s > 0.5)),
  ):
    assert out[name] == metrics.bootstrap_ci(fn, labels, scores, num_samples=100, seed=3)


def test_bootstrap_ci_skips_nan_resamples():
  labels = np.array([0] * 9 + [1])  # one positive, ranked top
  scores = np.linspace(0, 1, 10)
  with pytest.warns(UserWarning, match="resamples gave nan"):
    est, low, high = metrics.bootstrap_ci(metrics.auroc, labels, scores, num_samples=200)
  assert est == 1.0 and low == high == 1.0
  with pytest.warns(UserWarning, match="200 of 200"):
    out = metrics.bootstrap_ci(lambda x: math.nan, np.arange(5), num_samples=200)
  assert math.isnan(out[0]) and math.isnan(out[1]) and math.isnan(out[2])
  with pytest.raises(ValueError, match="leading length"):
    metrics.bootstrap_ci(metrics.accuracy, np.zeros(3), np.zeros(4))


def test_mean_ci_by_hand():
  values = [0.80, 0.82, 0.78, 0.85, 0.75]
  mean = 0.8
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
  half = 2.7764451051977987 * std / math.sqrt(5)  # t_{0.975, 4}
  np.testing.assert_allclose(
    metrics.mean_ci(values), (mean, mean - half, mean + half), rtol=0, atol=1e-12
  )
  # Two seeds: the t interval (t_{0.975, 1} = 12.7) leaves [0, 1] and is clipped to the range.
  m, low, high = metrics.mean_ci([0.6, 0.99], bounds=metrics.metric_range("auroc"))
  assert (m, low, high) == (pytest.approx(0.795), 0.0, 1.0)
  assert metrics.mean_ci([0.6, 0.99])[1] < 0
  m, low, high = metrics.mean_ci([0.7])
  assert m == 0.7 and math.isnan(low) and math.isnan(high)
  with pytest.raises(ValueError, match="alpha"):
    metrics.mean_ci(values, alpha=1.5)


# ------------------------------------------------------------------------------------------------
# Physical units through a fine-tuning task


def test_seg_report_is_in_mm_from_the_manifest_pixel_size(tmp_path):
  """pixel_size_mm of 20 x 40 originals resized to 16 x 16 gives (0.625, 1.25) mm per input pixel;
  a prediction one input column off the target is then 1.25 mm away (1 without the column)."""
  from PIL import Image

  from ultrajax.data import tasks
  from ultrajax.eval import downstream

  lines = ["image,mask,pixel_size_mm"]
  for i in range(4):
    Image.fromarray(np.full((20, 40), 30 * i, np.uint8)).save(tmp_path / f"{i}.png")
    mask = np.zeros((20, 40), np.uint8)
    mask[5:15, 10:30] = 255
    Image.fromarray(mask).save(tmp_path / f"{i}_m.png")
    lines.append(f"{i}.png,{i}_m.png,0.5")
  (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
  data = tasks.manifest_task(str(tmp_path / "m.csv"), "seg", 16)
  np.testing.assert_allclose(data.spacing, [[0.625, 1.25]] * 4)
  preds = np.roll(data.targets, 1, axis=2)
  report = downstream.test_report("seg", data.targets, preds, 2, 20, 0, data.spacing, 1.0)
  assert report["distance_unit"] == "mm" and report["hd95"] == [pytest.approx(1.25)] * 3
  assert report["nsd"][0] == pytest.approx(
    metrics.surface_dice(preds[0] > 0, data.targets[0] > 0, 1.0, (0.625, 1.25))
  )
  assert report["nsd"][0] < 1.0  # the 1.25 mm column shift is outside a 1 mm tolerance
  pixels = downstream.test_report("seg", data.targets, preds, 2, 20, 0)
  assert pixels["distance_unit"] == "px" and pixels["hd95"][0] == pytest.approx(1.0)
  lines[2] = "1.png,1_m.png,n/a"
  (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match="line 3: column 'pixel_size_mm' is 'n/a'"):
    tasks.manifest_task(str(tmp_path / "m.csv"), "seg", 16)
