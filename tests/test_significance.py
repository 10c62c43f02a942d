"""Significance tests against scipy, a slow DeLong reference, a published worked example and
simulation; and the figures behind them (PR curves, t-SNE, attention maps)."""

import math

import numpy as np
import pytest
from scipy import stats

from ultrajax.eval import metrics, significance


# ----------------------------------------------------------------------------- t-test
@pytest.mark.parametrize("seed,size", [(0, 5), (1, 10), (2, 3)])
def test_paired_ttest_matches_scipy_ttest_rel(seed, size):
  rng = np.random.default_rng(seed)
  a = rng.normal(0.8, 0.05, size)
  b = a - rng.normal(0.02, 0.03, size)
  ours = significance.paired_ttest(a, b)
  ref = stats.ttest_rel(a, b)
  np.testing.assert_allclose(ours.pvalue, ref.pvalue, rtol=1e-10)
  np.testing.assert_allclose(ours.statistic, ref.statistic, rtol=1e-10)
  ci = ref.confidence_interval(0.95)
  np.testing.assert_allclose([ours.ci_low, ours.ci_high], [ci.low, ci.high], rtol=1e-10)
  np.testing.assert_allclose(ours.diff, np.mean(a - b))


def test_paired_ttest_degenerate_inputs():
  assert significance.paired_ttest([0.7, 0.8], [0.7, 0.8]).pvalue == 1.0  # scipy: nan
  assert significance.paired_ttest([1.0, 2.0], [0.5, 1.5]).pvalue == 0.0  # as scipy
  one = significance.paired_ttest([0.8], [0.5])
  assert math.isnan(one.pvalue) and one.diff == pytest.approx(0.3)
  # A nan pair (a seed with an undefined metric) is dropped, the rest are tested.
  ours = significance.paired_ttest([0.8, np.nan, 0.9, 0.85], [0.7, 0.5, 0.8, 0.8])
  np.testing.assert_allclose(ours.pvalue, stats.ttest_rel([0.8, 0.9, 0.85], [0.7, 0.8, 0.8]).pvalue)
  with pytest.raises(ValueError, match="equal length"):
    significance.paired_ttest([1, 2, 3], [1, 2])


# ----------------------------------------------------------------------------- DeLong
def slow_delong(labels, scores_list):
  """DeLong et al. (1988) from the Mann-Whitney kernel psi over all m x n pairs."""
  pos, neg = labels == 1, labels == 0
  v10s, v01s, aucs = [], [], []
  for s in scores_list:
    x, y = s[pos], s[neg]
    psi = (x[:, None] > y[None]) + 0.5 * (x[:, None] == y[None])
    aucs.append(psi.mean())
    v10s.append(psi.mean(1))
    v01s.append(psi.mean(0))
  m, n = pos.sum(), neg.sum()
  k = len(scores_list)
  cov = np.empty((k, k))
  for i in range(k):
    for j in range(k):
      s10 = np.sum((v10s[i] - aucs[i]) * (v10s[j] - aucs[j])) / (m - 1)
      s01 = np.sum((v01s[i] - aucs[i]) * (v01s[j] - aucs[j])) / (n - 1)
      cov[i, j] = s10 / m + s01 / n
  return np.array(aucs), np.array(v10s), np.array(v01s), cov


def correlated_scores(rng, n, shift_b=0.0, ties=False):
  labels = (rng.random(n) < 0.4).astype(int)
  common = rng.normal(size=n)
  a = labels * 1.0 + common + 0.7 * rng.normal(size=n)
  b = labels * (1.0 + shift_b) + common + 0.7 * rng.normal(size=n)
  if ties:
    a, b = np.round(a), np.round(b)  # few distinct values: many ties within and across classes
  return labels, a, b


@pytest.mark.parametrize("ties", [False, True])
def test_fast_delong_equals_the_slow_mann_whitney_reference(ties):
  labels, a, b = correlated_scores(np.random.default_rng(3), 120, shift_b=0.5, ties=ties)
  auc, v10, v01 = significance.delong_components(labels, np.stack([a, b]))
  ref_auc, ref_v10, ref_v01, ref_cov = slow_delong(labels, [a, b])
  np.testing.assert_allclose(auc, ref_auc, rtol=1e-12)
  np.testing.assert_allclose(v10, ref_v10, rtol=1e-12)
  np.testing.assert_allclose(v01, ref_v01, rtol=1e-12)
  _, cov = significance.delong_covariance(labels, np.stack([a, b]))
  np.testing.assert_allclose(cov, ref_cov, rtol=1e-10)
  test = significance.delong_test(labels, a, b)
  var = ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1]
  z = (ref_auc[0] - ref_auc[1]) / math.sqrt(var)
  np.testing.assert_allclose(
    [test.statistic, test.pvalue], [z, 2 * stats.norm.sf(abs(z))], rtol=1e-9
  )
  # The AUROC itself is the Mann-Whitney U over m n (scipy) and sklearn's value (metrics.auroc).
  u = stats.mannwhitneyu(a[labels == 1], a[labels == 0]).statistic
  np.testing.assert_allclose(auc[0], u / ((labels == 1).sum() * (labels == 0).sum()), rtol=1e-12)
  np.testing.assert_allclose(auc[0], metrics.auroc(labels, a), rtol=1e-12)


def test_delong_ci_on_hanley_mcneil_1982_ct_ratings():
  # Hanley & McNeil (1982), Radiology 143:29-36: 109 CT images rated 1-5 by one reader;
  # counts per rating of the 58 normal and 51 abnormal images. Published: A = 0.893,
  # SE = 0.032 (their exponential approximation, which DeLong's variance need not equal).
  normal = np.repeat(np.arange(1, 6), [33, 6, 6, 11, 2])
  abnormal = np.repeat(np.arange(1, 6), [3, 2, 2, 11, 33])
  labels = np.r_[np.zeros(58, int), np.ones(51, int)]
  auc, low, high, var = significance.delong_ci(labels, np.r_[normal, abnormal])
  assert round(auc, 3) == 0.893
  assert abs(math.sqrt(var) - 0.032) < 0.003
  np.testing.assert_allclose(
    [low, high], auc + np.array([-1, 1]) * 1.959964 * math.sqrt(var), rtol=1e-6
  )


def test_delong_variance_and_size_match_simulation():
  # Over many independent test sets the spread of the AUROC difference matches DeLong's
  # variance, and under the null (same model quality) p < 0.05 about 5% of the time.
  rng = np.random.default_rng(7)
  diffs, variances, rejections = [], [], []
  for _ in range(400):
    labels, a, b = correlated_scores(rng, 150)
    t = significance.delong_test(labels, a, b)
    diffs.append(t.diff)
    variances.append(((t.ci_high - t.ci_low) / (2 * 1.959964)) ** 2)
    rejections.append(t.pvalue < 0.05)
  np.testing.assert_allclose(np.var(diffs), np.mean(variances), rtol=0.2)
  assert 0.02 <= np.mean(rejections) <= 0.09
  labels, a, b = correlated_scores(rng, 300, shift_b=1.5)
  assert significance.delong_test(labels, b, a).pvalue < 1e-3
  identical = significance.delong_test(labels, a, a)
  assert identical.pvalue == 1.0 and identical.diff == 0.0


def test_delong_rejects_bad_labels():
  with pytest.raises(ValueError, match="both classes"):
    significance.delong_test(np.ones(5), np.arange(5.0), np.arange(5.0))
  with pytest.raises(ValueError, match=r"binary labels"):
    significance.delong_ci(np.array([0, 1, 2]), np.arange(3.0))


# ----------------------------------------------------------------------------- bootstrap
def test_paired_bootstrap_identical_better_and_coverage():
  rng = np.random.default_rng(11)
  labels, a, b = correlated_scores(rng, 200, shift_b=1.5)
  same = significance.paired_bootstrap(metrics.auroc, labels, a, a, num_samples=200)
  assert same.pvalue == 1.0 and same.diff == 0.0 and same.ci_low == same.ci_high == 0.0
  better = significance.paired_bootstrap(metrics.auroc, labels, b, a, num_samples=200)
  assert better.pvalue < 0.02 and better.ci_low > 0
  # The interval covers the population difference of the simulated model, here estimated on a
  # very large sample from the same generator.
  big_labels, big_a, big_b = correlated_scores(np.random.default_rng(12), 200_000, shift_b=0.4)
  truth = metrics.auroc(big_labels, big_b) - metrics.auroc(big_labels, big_a)
  covered = []
  for seed in range(20):
    labels, a, b = correlated_scores(np.random.default_rng(100 + seed), 150, shift_b=0.4)
    c = significance.paired_bootstrap(metrics.auroc, labels, b, a, num_samples=200, seed=seed)
    covered.append(c.ci_low <= truth <= c.ci_high)
  assert np.mean(covered) >= 0.8
  # Without targets: per-case values (e.g. per-image Dice), metric = mean.
  x = rng.random(50)
  c = significance.paired_bootstrap(np.mean, None, x + 0.2, x, num_samples=100)
  np.testing.assert_allclose([c.diff, c.ci_low, c.ci_high], 0.2, atol=1e-12)
  with pytest.raises(ValueError, match="equal shape"):
    significance.paired_bootstrap(np.mean, None, x, x[:10])


def test_paired_bootstrap_of_several_metrics_shares_resamples():
  labels, a, b = correlated_scores(np.random.default_rng(5), 100, shift_b=0.5)
  both = lambda y, s: {"auroc": metrics.auroc(y, s), "ap": metrics.average_precision(y, s)}
  out = significance.paired_bootstrap(both, labels, b, a, num_samples=100, seed=3)
  alone = significance.paired_bootstrap(
    metrics.average_precision, labels, b, a, num_samples=100, seed=3
  )
  assert set(out) == {"auroc", "ap"} and out["ap"] == alone


# ----------------------------------------------------------------------------- study summaries
def test_finetune_summary_tests_each_variant_against_scratch_per_seed(tmp_path):
  from ultrajax.eval import downstream

  rng = np.random.default_rng(0)
  labels, weak, strong = correlated_scores(rng, 80, shift_b=1.5)
  cells = []
  for variant, scores in (("scratch", weak), ("mae", strong)):
    for seed in (0, 1, 2):
      run_dir = tmp_path / variant / f"seed_{seed}"
      run_dir.mkdir(parents=True)
      s = 1 / (1 + np.exp(-(scores + 0.1 * rng.normal(size=80))))
      probs = np.stack([1 - s, s], axis=1)
      np.savez(run_dir / "test_outputs.npz", test_index=np.arange(80), targets=labels, probs=probs)
      test = {k: [v, v, v] for k, v in downstream.cls_scores(labels, probs).items()}
      cells.append(
        {
          "variant": variant,
          "fraction": 1.0,
          "seed": seed,
          "run_dir": str(run_dir),
          "test": test,
          "probs": probs,
        }
      )
      if variant == "mae" or seed > 0:  # scratch's seed 0 was tested without blur
        cells[-1]["blur"] = {"1": {"auroc": test["auroc"][0] - 0.1 * rng.random()}}
  rows = downstream.summarise(cells, ("auroc", "accuracy"), reference="scratch", num_samples=100)
  row = next(r for r in rows if r["variant"] == "mae" and r["metric"] == "auroc")
  mae_values = [c["test"]["auroc"][0] for c in cells if c["variant"] == "mae"]
  ref_values = [c["test"]["auroc"][0] for c in cells if c["variant"] == "scratch"]
  assert row["reference"] == "scratch"
  np.testing.assert_allclose(row["p_ttest"], stats.ttest_rel(mae_values, ref_values).pvalue)
  np.testing.assert_allclose(row["diff"], np.mean(mae_values) - np.mean(ref_values))
  delong = [
    significance.delong_test(labels, a["probs"][:, 1], b["probs"][:, 1]).pvalue
    for a, b in zip(cells[3:], cells[:3])
  ]
  np.testing.assert_allclose([float(p) for p in row["p_delong"].split()], delong, rtol=1e-3)
  boot = [float(p) for p in row["p_bootstrap"].split()]
  assert len(boot) == 3 and max(boot) < 0.05  # the stronger model wins on every seed
  accuracy = next(r for r in rows if r["variant"] == "mae" and r["metric"] == "accuracy")
  assert accuracy["p_delong"] == "" and len(accuracy["p_bootstrap"].split()) == 3
  # Blurred rows: the t-test pairs the seeds both variants were blurred on.
  blurred = next(r for r in rows if r["variant"] == "mae" and r["metric"] == "auroc@blur1")
  mae_b = [c["blur"]["1"]["auroc"] for c in cells[4:]]
  ref_b = [c["blur"]["1"]["auroc"] for c in cells[1:3]]
  np.testing.assert_allclose(blurred["p_ttest"], stats.ttest_rel(mae_b, ref_b).pvalue)
  assert blurred["p_bootstrap"] == "" and blurred["num_seeds"] == 3
  scratch = next(r for r in rows if r["variant"] == "scratch" and r["metric"] == "auroc")
  assert scratch["reference"] == "" and math.isnan(scratch["p_ttest"])


def test_versus_reference_columns():
  rng = np.random.default_rng(4)
  labels, a, b = correlated_scores(rng, 120, shift_b=1.5)
  values, ref_values = [0.9, 0.85, 0.88], [0.7, 0.72, 0.69]
  out = significance.versus_reference(
    metrics.auroc, values, ref_values, labels, b, a, num_samples=100
  )
  np.testing.assert_allclose(out["p_ttest"], stats.ttest_rel(values, ref_values).pvalue)
  np.testing.assert_allclose(out["diff"], np.mean(np.subtract(values, ref_values)))
  assert out["p_bootstrap"] < 0.05
  empty = significance.versus_reference(metrics.auroc, values, ref_values, [], [], [])
  assert math.isnan(empty["p_bootstrap"])
