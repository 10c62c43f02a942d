"""Does joining the federation help each hospital? The pieces of jobs/benefit.py (issue 20 item 5).

For every client k: a labelled task from k's own data (`phantom_client_task`,
`manifest_client_task`), the test outputs of the model fine-tuned from the federated encoder and
from the local-only one, and

  gain_k = metric(federated) - metric(local)  on k's test images, with a paired percentile
  bootstrap CI over those images (`gain_ci`; seeds are averaged inside every resample).

Across clients: `spread` (research/fl_anchors.md section 5).
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Callable

import numpy as np

from ultrajax import configlib
from ultrajax.data import phantom, sources, tasks
from ultrajax.eval import downstream, significance


def phantom_client_task(
  source: sources.PhantomSource,
  num_images: int,
  image_size: int,
  *,
  classes=("benign", "malignant"),
  split_fractions=(0.6, 0.2, 0.2),
  split_seed: int = 0,
) -> tasks.TaskData:
  """The lesion diagnosis of one phantom hospital on its own images: records 0..num_images-1 of
  its generator (the first len(source) are the images it pretrained on; record i depends only
  on (seed, name, i)), those whose label is in `classes`, resized to image_size and split by
  patient (every record its own patient)."""
  bad = [c for c in classes if c not in phantom.LABELS]
  configlib.check(
    len(classes) >= 2 and not bad,
    f"config.task.classes={','.join(classes)!r}: need two or more of {phantom.LABELS}",
  )
  client = sources.PhantomSource(
    source.name, source.organ, source.probe, num_images, source.image_size, source.seed
  )
  images, targets, groups = [], [], []
  for i in range(num_images):
    r = client[i]
    name = phantom.LABELS[r["label"]]
    if name in classes:
      images.append(tasks.resize_image(r["image"], image_size))
      targets.append(classes.index(name))
      groups.append(f"{source.name}/{i}")
  configlib.check(
    len(images) > 0,
    f"client {source.name!r}: no phantom images of {classes} "
    f"among {num_images}; raise config.task.images_per_client",
  )
  groups = np.array(groups)
  splits = tasks.split_by_group(groups, split_fractions, split_seed)
  data = tasks.TaskData(
    np.stack(images), np.asarray(targets, np.int32), groups, splits, tuple(classes), "cls"
  )
  _check_splits(data, f"client {source.name!r}")
  return data


def manifest_client_task(
  csv_path: str,
  client: str,
  out_csv: pathlib.Path,
  image_size: int,
  *,
  client_column: str = "client",
  image_column: str = "image",
  label_column: str = "label",
  group_column: str = "group",
  split_column: str = "split",
  classes: str = "",
  split_fractions=(0.6, 0.2, 0.2),
  split_seed: int = 0,
) -> tasks.TaskData:
  """One manifest client's labelled rows as a classification task: its rows are written to
  out_csv (image paths made absolute) and read by tasks.manifest_task; split by patient unless
  the manifest has a split column. A manifest without the label column raises naming it."""
  _, rows = sources.read_manifest(
    csv_path,
    (image_column, client_column, label_column),
    " (needed for the per-hospital benefit report)",
  )
  mine = [r for r in rows if r[client_column] == client]
  configlib.check(bool(mine), f"manifest {csv_path}: no row has {client_column}={client!r}")
  base = os.path.dirname(os.path.abspath(csv_path))
  rows = [{**r, image_column: os.path.join(base, r[image_column])} for r in mine]
  downstream.write_csv(out_csv, rows, decimals=None)
  data = tasks.manifest_task(
    str(out_csv),
    "cls",
    image_size,
    image_column=image_column,
    label_column=label_column,
    group_column=group_column,
    split_column=split_column,
    classes=classes,
  )
  if np.all(data.splits == ""):
    data.splits = tasks.split_by_group(data.groups, split_fractions, split_seed)
  _check_splits(data, f"manifest {csv_path} client {client!r}")
  return data


def _check_splits(data: tasks.TaskData, where: str) -> None:
  for split in tasks.SPLITS:
    configlib.check(
      bool(np.any(data.splits == split)),
      f"{where}: the {split!r} split of its labelled task is empty "
      f"({len(data.groups)} images); raise config.task.images_per_client",
    )


def gain_ci(
  metric_fn: Callable,
  targets,
  outputs_fed,
  outputs_local,
  *,
  num_samples: int = 1000,
  seed: int = 0,
) -> significance.Comparison:
  """metric(federated) - metric(local) on one client's test images, paired bootstrap 95% CI.

  targets: [N]; outputs_*: [S, N, ...] the S seeds' test outputs of each model. The metric of a
  model is the mean over its seeds of metric_fn(targets, outputs[s]); every resample draws N
  test images and scores all seeds of both models on them (significance.paired_bootstrap).
  """
  fed, local = np.asarray(outputs_fed), np.asarray(outputs_local)
  if fed.shape != local.shape or fed.ndim < 2 or fed.shape[1] != len(targets):
    raise ValueError(
      f"gain_ci needs outputs [S, N, ...] of equal shape with N = {len(targets)} "
      f"targets, got {fed.shape} and {local.shape}"
    )

  def over_seeds(y, out):  # out: [n, S, ...]
    return float(np.mean([metric_fn(y, out[:, s]) for s in range(out.shape[1])]))

  fed, local = np.moveaxis(fed, 0, 1), np.moveaxis(local, 0, 1)  # [N, S, ...]
  return significance.paired_bootstrap(
    over_seeds, np.asarray(targets), fed, local, num_samples=num_samples, seed=seed
  )


def gini(values) -> float:
  """Gini coefficient of non-negative values: sum_ij |a_i - a_j| / (2 K^2 mean); 0 = all equal."""
  a = np.asarray(values, np.float64)
  if a.size == 0 or a.mean() == 0:
    return math.nan
  return float(np.abs(a[:, None] - a[None, :]).sum() / (2 * a.size**2 * a.mean()))


def jain(values) -> float:
  """Jain's fairness index (sum a)^2 / (K sum a^2): 1 when all equal, 1/K when one has it all."""
  a = np.asarray(values, np.float64)
  den = a.size * np.sum(a * a)
  return float(a.sum() ** 2 / den) if den > 0 else math.nan


def spread(values, weights=None) -> dict:
  """Summary over clients of one per-client number (nan clients left out): mean (each client
  counts once), weighted mean (by `weights`, e.g. test sizes), std (ddof 0), min, max,
  bottom-25% mean (the worst ceil(K/4)), max - min gap, Gini and Jain (nan unless all >= 0), K
  and `negative` (clients below 0, who lose by joining)."""
  a = np.asarray(values, np.float64)
  w = np.ones_like(a) if weights is None else np.asarray(weights, np.float64)
  keep = np.isfinite(a)
  a, w = a[keep], w[keep]
  if a.size == 0:
    return dict(num_clients=0)
  worst = np.sort(a)[: math.ceil(a.size / 4)]
  return dict(
    num_clients=int(a.size),
    mean=float(a.mean()),
    weighted_mean=float(np.sum(w * a) / np.sum(w)),
    std=float(a.std()),
    min=float(a.min()),
    max=float(a.max()),
    bottom25_mean=float(worst.mean()),
    gap=float(a.max() - a.min()),
    # Gini and Jain measure how evenly a non-negative score is shared: not for gains.
    gini=gini(a) if a.min() >= 0 else math.nan,
    jain=jain(a) if a.min() >= 0 else math.nan,
    negative=int(np.sum(a < 0)),
  )
