"""Labelled image pools of a node study (HeteroSync Learning): loading, node partitions,
per-node train / val / test splits and the host batches of a federated round.

A `Pool` holds grey uint8 images with binary labels (1 = one of data.positive_labels), the
group each image belongs to (phantom organ, folder / manifest node) and, where the data name
them, patient ids. Functions taking `config` read its `data` block (configs/hsl.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import NamedTuple

import numpy as np
from PIL import Image

from ultrajax.data import partition, phantom, sources


class Pool(NamedTuple):
  """Labelled grey images: images uint8 [N, S, S], labels int [N] in {0, 1}, groups [N] str,
  patients [N] str or None (every image its own patient)."""

  images: np.ndarray
  labels: np.ndarray
  groups: np.ndarray
  patients: np.ndarray | None = None

  def take(self, idx) -> Pool:
    return Pool(*(None if a is None else a[idx] for a in self))


def phantom_pool(organs, per_organ: int, size: int, seed: int, positive) -> Pool:
  images, labels, groups = [], [], []
  for organ in organs:
    probe = sources.ORGAN_PROBE[organ]
    for i in range(per_organ):
      record = phantom.generate(
        np.random.default_rng([seed, phantom.ORGANS.index(organ), i]), organ, probe, size
      )
      images.append(record["image"])
      labels.append(int(phantom.LABELS[record["label"]] in positive))
      groups.append(organ)
  return Pool(np.stack(images), np.asarray(labels), np.asarray(groups))


def balanced(pool: Pool, per_class: int, seed: int, what: str) -> Pool:
  rng = np.random.default_rng(seed)
  picks = []
  for c in (0, 1):
    idx = np.flatnonzero(pool.labels == c)
    if len(idx) < per_class:
      raise ValueError(f"{what}: {per_class} examples of class {c} needed, {len(idx)} available")
    picks.append(rng.choice(idx, per_class, replace=False))
  return pool.take(np.sort(np.concatenate(picks)))


def grey(image: np.ndarray, size: int) -> np.ndarray:
  img = Image.fromarray(image)
  return np.asarray(img.convert("L").resize((size, size), Image.BILINEAR))


def file_pool(records, size: int, positive, what: str) -> Pool:
  """records: (image uint8 [H, W(, 3)], label name, node, patient id or '') -> grey, resized
  Pool (an empty patient id is a patient of its own)."""
  images, labels, groups, patients = [], [], [], []
  for image, label, group, patient in records:
    images.append(grey(image, size))
    labels.append(int(label in positive))
    groups.append(group)
    patients.append(patient or f"image-{len(patients)}")
  if not images:
    raise ValueError(f"{what}: no images")
  return Pool(
    np.stack(images),
    np.asarray(labels),
    np.asarray(groups),
    np.asarray(patients) if patients else None,
  )


def labelled_records(config, root_or_csv: str, folder: bool, patients: bool = False):
  """(image, label name, node, patient) per record of a folder tree root/<node>/<label>/...
  (or, for the SAT, root/<label>/...), or of a CSV manifest with image / client / label
  columns (and data.patient_column when `patients`; '' otherwise)."""
  d = config.data
  if folder:
    for client in sources.folder_clients(root_or_csv):
      for i in range(len(client)):
        record = client[i]
        rel = os.path.relpath(record["path"], os.path.join(root_or_csv, client.name))
        # root/<node>/<label>/x.png, or root/<label>/x.png for a single-level tree (the SAT).
        label = rel.split(os.sep)[0] if os.sep in rel else client.name
        yield record["image"], label, client.name, ""
  else:
    patient = d.patient_column if patients and d.patient_column else ""
    extra = (d.label_column, patient) if patient else (d.label_column,)
    for client in sources.manifest_clients(
      root_or_csv, d.image_column, d.client_column, extra_columns=extra
    ):
      for i in range(len(client)):
        record = client[i]
        yield (
          record["image"],
          record[d.label_column],
          client.name,
          record[patient] if patient else "",
        )


def load_data(config) -> tuple[Pool, Pool]:
  """(primary pool, SAT) with the SAT balanced 1:1, sat_per_class of each class."""
  d = config.data
  positive = tuple(d.positive_labels)
  if d.source == "phantom":
    organs = (d.single_organ,) if config.scenario in ("label", "quantity") else tuple(d.organs)
    need = pool_size(config, len(organs))
    pool = phantom_pool(organs, need, d.image_size, config.seed, positive)
    # The SAT draws from its own seed stream so it is the same whatever the scenario.
    sat_all = phantom_pool(
      (d.sat_organ,), 4 * d.sat_per_class, d.image_size, config.seed + 7919, positive
    )
  else:
    folder = d.source == "folder"
    field = "root" if folder else "manifest"
    records = labelled_records(config, d[field], folder, bool(d.patient_column))
    pool = file_pool(records, d.image_size, positive, f"config.data.{field}")
    sat_records = labelled_records(config, d[f"sat_{field}"], folder)
    sat_all = file_pool(sat_records, d.image_size, positive, f"config.data.sat_{field}")
  return pool, balanced(sat_all, d.sat_per_class, config.seed, "SAT")


def combined_nodes(config) -> list[partition.NodeSpec]:
  """The paper's five nodes at data.combined_scale, each node's rarer class raised to at least
  data.min_class_count examples (partition.min_class_nodes)."""
  return partition.min_class_nodes(
    partition.COMBINED_NODES, config.data.combined_scale, config.data.min_class_count
  )


def pool_size(config, num_organs: int) -> int:
  """Phantom images to draw per organ: enough of each class for the scenario's nodes (the
  phantom draws 40% normal), with a margin so every repeat can re-draw."""
  d = config.data
  if config.scenario == "feature":
    per_class = d.feature_node_size / 2
  elif config.scenario == "label":
    per_class = d.label_node_size * (0.5 + d.ratio / (d.ratio + 1))
  elif config.scenario == "quantity":
    per_class = d.quantity_total / 2
  else:
    per_class = sum(n.size * max(n.ratio) / sum(n.ratio) for n in combined_nodes(config))
    per_class /= num_organs
  return int(math.ceil(per_class / phantom.LABEL_PROBS[0] * 1.3)) + 8


def make_partition(config, pool: Pool, seed: int) -> partition.Partition:
  d = config.data
  if config.scenario == "feature":
    return partition.feature_skew(
      pool.labels,
      pool.groups,
      d.feature_node_size,
      seed,
      group_values=list(d.organs),
      classes=(0, 1),
    )
  if config.scenario == "label":
    return partition.label_ratios(
      pool.labels,
      [d.label_node_size] * 2,
      [(1, 1), (d.ratio, 1)],
      seed,
      classes=(0, 1),
      names=["node1_1:1", f"node2_{d.ratio:g}:1"],
    )
  if config.scenario == "quantity":
    return partition.quantity_ratios(
      pool.labels,
      (d.ratio, 1),
      d.quantity_total,
      seed,
      classes=(0, 1),
      names=[f"node1_x{d.ratio:g}", "node2_x1"],
    )
  if config.scenario == "combined":
    return partition.draw(pool.labels, combined_nodes(config), seed, classes=(0, 1))
  return partition.natural(pool.groups)


@dataclasses.dataclass
class Split:
  """One repeat's nodes: names, and train / val / test indices into the pool per node."""

  names: list
  train: list
  val: list
  test: list


def make_split(config, pool: Pool, repeat: int) -> Split:
  seed = config.seed * 1000 + repeat
  d = config.data
  parts = make_partition(config, pool, seed)
  train, val, test = zip(
    *[
      partition.split_node(
        pool.labels, idx, d.val_fraction, d.test_fraction, seed + k, pool.patients
      )
      for k, idx in enumerate(parts.indices)
    ]
  )
  return Split(list(parts.names), list(train), list(val), list(test))


def round_batches(
  rng,
  pool: Pool,
  sat: Pool,
  train_sets,
  epochs: int,
  batch: int,
  hsl: bool,
  equal_steps: bool = False,
):
  """Host batches of one round: every client's `epochs` shuffled passes, the last batch of
  an epoch filled from the epoch's start. -> (batch pytree [C, S, B, ...], num_steps [C]).

  equal_steps: every client makes as many steps as the largest one, cycling its data (split
  learning needs a batch from every client at every step, as SplitAVG's code cycles loaders).
  """
  steps = np.array([epochs * math.ceil(len(t) / batch) for t in train_sets])
  if equal_steps:
    steps[:] = steps.max()
  size = pool.images.shape[1]
  out = dict(
    image=np.zeros((len(train_sets), steps.max(), batch, size, size), np.uint8),
    label=np.zeros((len(train_sets), steps.max(), batch), np.float32),
  )
  if hsl:
    out.update(sat_image=np.zeros_like(out["image"]), sat_label=np.zeros_like(out["label"]))
  for c, train in enumerate(train_sets):
    per_epoch = steps[c] // epochs
    order = np.concatenate(
      [np.resize(rng.permutation(train), per_epoch * batch) for _ in range(epochs)]
    ).reshape(steps[c], batch)
    out["image"][c, : steps[c]] = pool.images[order]
    out["label"][c, : steps[c]] = pool.labels[order]
    if hsl:
      # Each local batch is paired with a batch of the SAT, drawn by the same rule.
      draws = math.ceil(steps[c] * batch / len(sat.labels))
      sat_order = np.concatenate([rng.permutation(len(sat.labels)) for _ in range(draws)])
      sat_order = np.resize(sat_order, (steps[c], batch))
      out["sat_image"][c, : steps[c]] = sat.images[sat_order]
      out["sat_label"][c, : steps[c]] = sat.labels[sat_order]
  return out, steps
