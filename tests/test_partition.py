"""Partitioners: disjoint, the sizes and label ratios asked for, seeded, clear errors."""

import numpy as np
import pytest

from ultrajax.data import partition
from ultrajax.viz.partition import plot_partition


def _dataset(n=4000, seed=0, groups=7):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 2, n), rng.integers(0, groups, n)


def _disjoint(p):
  allidx = np.concatenate(p.indices)
  assert len(np.unique(allidx)) == len(allidx)
  for idx in p.indices:
    assert np.all(np.diff(idx) > 0)


def test_split_counts_largest_remainder():
  np.testing.assert_array_equal(partition.split_counts(10, (1, 1, 1)), [4, 3, 3])
  np.testing.assert_array_equal(partition.split_counts(3970, (100, 1)), [3931, 39])
  np.testing.assert_array_equal(partition.split_counts(8678, (80, 1)), [8571, 107])
  np.testing.assert_array_equal(partition.split_counts(50, (1999, 1)), [49, 1])  # rare kept
  np.testing.assert_array_equal(partition.split_counts(7, (0, 1)), [0, 7])


@pytest.mark.parametrize("ratio", [(1, 1), (2, 1), (10, 1), (40, 1), (100, 1)])
def test_label_ratios_met_within_rounding(ratio):
  labels, _ = _dataset(6000)
  p = partition.label_ratios(labels, [600, 600], [(1, 1), ratio], seed=3)
  _disjoint(p)
  counts = p.counts(labels)
  np.testing.assert_array_equal(counts.sum(1), [600, 600])
  np.testing.assert_array_equal(counts[0], [300, 300])
  expect = 600 * np.array(ratio) / sum(ratio)
  assert np.all(np.abs(counts[1] - expect) <= 1), (counts[1], expect)


@pytest.mark.parametrize("q", [1, 6, 80])
def test_quantity_ratios(q):
  labels, _ = _dataset(6000)
  p = partition.quantity_ratios(labels, (q, 1), total=1620, seed=1)
  _disjoint(p)
  counts = p.counts(labels)
  assert counts.sum() == 1620
  assert abs(counts[0].sum() / counts[1].sum() - q) <= q * 0.05 + 0.05
  for row in counts:  # 1:1 labels inside every node, within rounding
    assert abs(row[0] - row[1]) <= 1


def test_feature_skew_one_group_per_node():
  labels, groups = _dataset(6000)
  p = partition.feature_skew(labels, groups, size=100, seed=0)
  _disjoint(p)
  assert p.names == [str(g) for g in range(7)]
  for g, idx in enumerate(p.indices):
    assert np.all(groups[idx] == g) and len(idx) == 100
    np.testing.assert_array_equal(np.bincount(labels[idx]), [50, 50])


def test_natural_covers_every_example():
  _, groups = _dataset(500, groups=4)
  p = partition.natural(groups)
  _disjoint(p)
  assert sum(len(i) for i in p.indices) == 500
  for name, idx in zip(p.names, p.indices):
    assert np.all(groups[idx] == int(name))


def test_dirichlet_seeded_disjoint_and_skewed():
  labels, _ = _dataset(3000)
  a = partition.dirichlet(labels, 5, alpha=0.1, seed=7)
  b = partition.dirichlet(labels, 5, alpha=0.1, seed=7)
  c = partition.dirichlet(labels, 5, alpha=0.1, seed=8)
  _disjoint(a)
  assert sum(len(i) for i in a.indices) == 3000  # every example assigned
  assert all(np.array_equal(x, y) for x, y in zip(a.indices, b.indices))
  assert not all(np.array_equal(x, y) for x, y in zip(a.indices, c.indices))
  mix = a.counts(labels)[:, 1] / np.maximum(a.counts(labels).sum(1), 1)
  flat = partition.dirichlet(labels, 5, alpha=1000.0, seed=7).counts(labels)
  flat_mix = flat[:, 1] / flat.sum(1)
  assert np.ptp(mix) > 0.3 > np.ptp(flat_mix)  # small alpha skews labels, large alpha does not


def test_combined_five_nodes_and_plot(tmp_path):
  labels, _ = _dataset(4000)
  p = partition.combined(labels, seed=0, scale=0.1)
  _disjoint(p)
  counts = p.counts(labels)
  assert p.names == [
    "screening_centre",
    "specialist_hospital",
    "small_clinic_1",
    "small_clinic_2",
    "rare_disease_region",
  ]
  np.testing.assert_array_equal(counts.sum(1), [313, 222, 20, 20, 1426])
  assert counts[0, 0] > 8 * counts[0, 1] and counts[1, 1] > 3 * counts[1, 0]
  assert counts[4, 1] == 1  # 1:1999 prevalence keeps one abnormal case
  png = plot_partition(counts, p.names, ["normal", "abnormal"], tmp_path / "p.png", "combined")
  assert png.stat().st_size > 5000


def test_impossible_ratios_raise_naming_the_node():
  labels = np.array([0] * 100 + [1] * 10)
  with pytest.raises(
    ValueError, match=r"node 'node1' needs 20 examples of class 1 .* only 5 remain"
  ):
    partition.label_ratios(labels, [10, 40], [(1, 1), (1, 1)], seed=0)
  groups = np.array([0] * 60 + [1] * 50)
  with pytest.raises(
    ValueError, match=r"node '0' needs 40 examples of class 1 in group 0 .* only 0 remain"
  ):
    partition.feature_skew(labels, groups, size=80, seed=0)
  with pytest.raises(ValueError, match="node 'specialist_hospital' needs 18 examples of class 1"):
    partition.combined(labels, seed=0, scale=0.01)
  with pytest.raises(ValueError, match="ratio .* 3 entries for 2 classes"):
    partition.label_ratios(labels, [10], [(1, 1, 1)], seed=0)
