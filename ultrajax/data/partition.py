"""Seeded partitioners: which examples of a labelled dataset each federated node holds.

Every partitioner takes a labels array [N] (and, where it needs one, a groups array [N] such as
site, organ or anatomy), returns a `Partition` (node names + one sorted index array per node,
disjoint) and draws only from `np.random.default_rng(seed)`, so the same seed gives the same
split. Ratios are tuples over `classes` (default: the sorted distinct labels, so for binary
labels (normal, abnormal) = (0, 1), and the paper's "normal:abnormal = 100:1" is (100, 1)).
Counts come from ratios by largest-remainder rounding, so a node of size n with ratio r gets
exactly n examples and each class within one example of n * r_c / sum(r); a class with a
non-zero ratio gets at least one example. When the data cannot supply a node, ValueError names
the node, the class (and group) and how many were needed and left.

Scenarios of HeteroSync Learning (seed 004, simulations on MURA), with the paper's compositions:
`natural`, `dirichlet` (Hsu et al. 2019), `label_ratios` (2 nodes of 3970, 1:1 and r:1, r in
2 ... 100), `quantity_ratios` (2 nodes, q:1 of 8678, q in 1 ... 80, labels 1:1), `feature_skew`
(7 anatomies, 1470 each, 1:1) and `combined` (`COMBINED_NODES`; `min_class_nodes` for small
scales). Within a node, `split_node` draws the stratified train / val / test split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Partition(NamedTuple):
  """names: one per node; indices: per node, sorted int64 indices into the dataset."""

  names: list[str]
  indices: list[np.ndarray]

  def counts(self, labels, classes=None) -> np.ndarray:
    """[nodes, classes] number of examples of each class at each node."""
    labels = np.asarray(labels)
    classes = _classes(labels, classes)
    return np.array([[int(np.sum(labels[i] == c)) for c in classes] for i in self.indices])


class NodeSpec(NamedTuple):
  """A node to draw: `size` examples with label `ratio` over classes, optionally only from
  examples whose group equals `group`."""

  name: str
  size: int
  ratio: tuple
  group: object = None


def split_counts(total: int, ratio: Sequence[float]) -> np.ndarray:
  """Integer counts summing to `total` in proportion to `ratio` (largest remainder); every
  non-zero share gets at least 1 when total allows it."""
  ratio = np.asarray(ratio, np.float64)
  if ratio.ndim != 1 or np.any(ratio < 0) or ratio.sum() <= 0:
    raise ValueError(f"ratio {tuple(ratio)} needs non-negative entries with a positive sum")
  exact = total * ratio / ratio.sum()
  counts = np.floor(exact).astype(np.int64)
  order = np.argsort(-(exact - counts), kind="stable")
  counts[order[: total - counts.sum()]] += 1
  # a rare class (1:2000 in a small node) still gets one example, taken from the largest class
  for c in np.flatnonzero((ratio > 0) & (counts == 0)):
    big = int(np.argmax(counts))
    if counts[big] > 1:
      counts[big] -= 1
      counts[c] += 1
  return counts


def _classes(labels, classes):
  return np.unique(labels) if classes is None else np.asarray(classes)


def draw(labels, nodes: Sequence[NodeSpec], seed: int, groups=None, classes=None) -> Partition:
  """Draws nodes in order, without replacement, from what earlier nodes left.

  labels: [N]; groups: [N] or None (needed when a node names a group). Raises ValueError
  naming the node, class and group when too few examples remain.
  """
  labels = np.asarray(labels)
  classes = _classes(labels, classes)
  if groups is not None:
    groups = np.asarray(groups)
    if groups.shape != labels.shape:
      raise ValueError(f"groups has shape {groups.shape}, labels {labels.shape}")
  rng = np.random.default_rng(seed)
  free = np.ones(len(labels), bool)
  names, out = [], []
  for node in nodes:
    if len(node.ratio) != len(classes):
      raise ValueError(
        f"node {node.name!r}: ratio {tuple(node.ratio)} has {len(node.ratio)} "
        f"entries for {len(classes)} classes {classes.tolist()}"
      )
    if node.group is not None and groups is None:
      raise ValueError(f"node {node.name!r} asks for group {node.group!r} but no groups were given")
    counts = split_counts(int(node.size), node.ratio)
    picked = []
    for c, need in zip(classes.tolist(), counts):
      pool = free & (labels == c)
      if node.group is not None:
        pool &= groups == node.group
      pool = np.flatnonzero(pool)
      if len(pool) < need:
        where = "" if node.group is None else f" in group {node.group!r}"
        raise ValueError(
          f"node {node.name!r} needs {need} examples of class {c!r}{where} (size {node.size}, "
          f"ratio {tuple(node.ratio)}) but only {len(pool)} remain after earlier nodes"
        )
      take = rng.choice(pool, size=int(need), replace=False)
      free[take] = False
      picked.append(take)
    names.append(node.name)
    out.append(np.sort(np.concatenate(picked)).astype(np.int64))
  return Partition(names, out)


def natural(groups, seed: int | None = None, order=None) -> Partition:
  """One node per distinct group value (sorted, or `order`), holding all of its examples."""
  del seed  # nothing random: kept for a uniform call signature
  groups = np.asarray(groups)
  values = np.unique(groups).tolist() if order is None else list(order)
  missing = [v for v in values if not np.any(groups == v)]
  if missing:
    raise ValueError(f"natural partition: groups {missing} have no examples")
  return Partition(
    [str(v) for v in values], [np.flatnonzero(groups == v).astype(np.int64) for v in values]
  )


def dirichlet(
  labels, num_nodes: int, alpha: float, seed: int, min_size: int = 1, max_tries: int = 100
) -> Partition:
  """Label skew: each class's examples split over nodes by p ~ Dir(alpha * 1). Small alpha =
  severe skew. Redraws (up to max_tries) until every node has at least min_size examples."""
  labels = np.asarray(labels)
  if alpha <= 0 or num_nodes < 1:
    raise ValueError(
      f"dirichlet partition needs alpha > 0 and num_nodes >= 1, got {alpha}, {num_nodes}"
    )
  if num_nodes * min_size > len(labels):
    raise ValueError(
      f"dirichlet partition: {num_nodes} nodes x min_size {min_size} exceeds {len(labels)} examples"
    )
  rng = np.random.default_rng(seed)
  for _ in range(max_tries):
    parts = [[] for _ in range(num_nodes)]
    for c in np.unique(labels):
      idx = rng.permutation(np.flatnonzero(labels == c))
      cuts = (np.cumsum(rng.dirichlet(np.full(num_nodes, alpha)))[:-1] * len(idx)).astype(int)
      for k, chunk in enumerate(np.split(idx, cuts)):
        parts[k].append(chunk)
    indices = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    if min(len(i) for i in indices) >= min_size:
      return Partition([f"node{k}" for k in range(num_nodes)], indices)
  raise ValueError(
    f"dirichlet partition: no draw in {max_tries} gave every node >= {min_size} "
    f"examples (alpha {alpha}); raise alpha or lower min_size"
  )


def label_ratios(
  labels, sizes: Sequence[int], ratios: Sequence[tuple], seed: int, classes=None, names=None
) -> Partition:
  """Node k gets sizes[k] examples with label ratio ratios[k] (e.g. [(1, 1), (100, 1)])."""
  if len(sizes) != len(ratios):
    raise ValueError(f"label_ratios: {len(sizes)} sizes but {len(ratios)} ratios")
  names = names or [f"node{k}" for k in range(len(sizes))]
  nodes = [NodeSpec(n, s, tuple(r)) for n, s, r in zip(names, sizes, ratios)]
  return draw(labels, nodes, seed, classes=classes)


def quantity_ratios(
  labels,
  ratios: Sequence[float],
  total: int,
  seed: int,
  label_ratio: tuple | None = None,
  classes=None,
  names=None,
) -> Partition:
  """Node sizes in proportion `ratios` (e.g. (80, 1)) of `total`, each with `label_ratio`
  (default balanced)."""
  classes = _classes(np.asarray(labels), classes)
  label_ratio = tuple(label_ratio or (1,) * len(classes))
  sizes = split_counts(int(total), ratios)
  return label_ratios(labels, sizes, [label_ratio] * len(sizes), seed, classes, names)


def feature_skew(
  labels,
  groups,
  size: int,
  seed: int,
  group_values=None,
  label_ratio: tuple | None = None,
  classes=None,
) -> Partition:
  """One node per group value (anatomy/organ), each `size` examples with `label_ratio`."""
  groups = np.asarray(groups)
  classes = _classes(np.asarray(labels), classes)
  values = np.unique(groups).tolist() if group_values is None else list(group_values)
  label_ratio = tuple(label_ratio or (1,) * len(classes))
  nodes = [NodeSpec(str(v), size, label_ratio, v) for v in values]
  return draw(labels, nodes, seed, groups=groups, classes=classes)


# HSL's combined scenario (paper Fig. 2 D1; its Supplementary Table 8 with the exact
# composition is not in our copy). Sizes are the reported test-set sizes (938, 665, 60, 60,
# 4279 for the nodes in the order the text lists them) divided by the 30% test share; label
# ratios (normal, abnormal) follow the text: a screening centre sees mostly normal cases, a
# specialist hospital mostly disease, small clinics are small, and the rare-disease region's
# prevalence is below 1 in 2000 (here 1999:1; at least one abnormal case is always kept).
COMBINED_NODES = (
  NodeSpec("screening_centre", 3127, (9, 1)),
  NodeSpec("specialist_hospital", 2217, (1, 4)),
  NodeSpec("small_clinic_1", 200, (1, 1)),
  NodeSpec("small_clinic_2", 200, (1, 1)),
  NodeSpec("rare_disease_region", 14263, (1999, 1)),
)


def combined(
  labels,
  seed: int,
  nodes: Sequence[NodeSpec] = COMBINED_NODES,
  scale: float = 1.0,
  groups=None,
  classes=None,
) -> Partition:
  """The five-node scenario: `nodes` with every size multiplied by `scale` (>= 1 example each),
  drawn in order. Give nodes a `group` (e.g. an organ) to add feature skew."""
  if scale <= 0:
    raise ValueError(f"combined partition: scale must be > 0, got {scale}")
  scaled = [n._replace(size=max(1, int(round(n.size * scale)))) for n in nodes]
  return draw(labels, scaled, seed, groups=groups, classes=classes)


def min_class_nodes(
  nodes: Sequence[NodeSpec], scale: float, min_class_count: int
) -> list[NodeSpec]:
  """`nodes` with every size multiplied by `scale` (at least 2 * min_class_count) and each
  node's rarer class raised to at least min_class_count examples, so a 1:2000 region keeps a
  case for training, validation and test (HSL's combined scenario at a small scale)."""
  out = []
  for node in nodes:
    size = max(2 * min_class_count, int(round(node.size * scale)))
    ratio = np.asarray(node.ratio, np.float64)
    rare = int(np.argmin(ratio))
    share = min_class_count / size
    if ratio[rare] / ratio.sum() < share:
      ratio[rare] = share * ratio[1 - rare] / (1 - share)
    out.append(node._replace(size=size, ratio=tuple(ratio)))
  return out


def split_node(
  labels, indices, val_fraction: float, test_fraction: float, seed: int, patients=None
):
  """One node's indices [n] -> sorted (train, val, test) index arrays, disjoint.

  Stratified per class over units: patients (the label of a patient's first image decides its
  class) or, with patients=None, single images. Of a class's n units, round(test_fraction * n)
  go to test and round(val_fraction * n) to validation, each at least 1 while the class keeps
  a unit for training (a single unit stays in training). val_fraction=0 gives the legacy 70/30
  split exactly. A patient's images all land in one split.
  """
  indices = np.asarray(indices)
  rng = np.random.default_rng(seed)
  if patients is None:
    units, unit_of, unit_label = indices, indices, labels[indices]
  else:
    unit_of = np.asarray(patients)[indices]
    units, first = np.unique(unit_of, return_index=True)
    units = units[np.argsort(first, kind="stable")]  # order of first appearance
    unit_label = np.asarray([labels[indices[unit_of == u][0]] for u in units])
  parts = ([], [], [])  # train, val, test units
  for c in (0, 1):
    idx = rng.permutation(units[unit_label == c])
    n = len(idx)
    k_test = 0 if n < 2 else min(n - 1, max(1, int(round(test_fraction * n))))
    left = n - k_test
    k_val = (
      0 if val_fraction == 0 or left < 2 else min(left - 1, max(1, int(round(val_fraction * n))))
    )
    parts[2].append(idx[:k_test])
    parts[1].append(idx[k_test : k_test + k_val])
    parts[0].append(idx[k_test + k_val :])
  out = []
  for chosen in parts:
    chosen = np.concatenate(chosen)
    out.append(np.sort(chosen if patients is None else indices[np.isin(unit_of, chosen)]))
  return tuple(out)
