"""Per-node metric tables of a node study (HeteroSync Learning): AUC / accuracy / recall /
precision per node and repeat, intervals over repeats and pooled predictions, paired tests
against the reference method, the fairness summary and the table of a ratio sweep."""

from __future__ import annotations

import math

import numpy as np

from ultrajax.eval import metrics, significance

METRICS = ("auc", "accuracy", "recall", "precision")


def node_metrics(labels, probs) -> dict:
  """AUC and, at the paper's fixed 0.5 threshold, accuracy, recall and precision."""
  labels = np.asarray(labels, np.int64)
  if labels.size == 0:
    return {m: math.nan for m in METRICS}
  preds = (np.asarray(probs) >= 0.5).astype(np.int64)
  auc = metrics.auroc(labels, probs) if 0 < labels.sum() < labels.size else math.nan
  return dict(
    auc=auc,
    accuracy=metrics.accuracy(labels, preds),
    recall=metrics.recall(labels, preds, average="binary"),
    precision=metrics.precision(labels, preds, average="binary"),
  )


def metric_fn(name: str):
  """(labels, probs) -> node_metrics(...)[name], for bootstraps."""
  return lambda labels, probs: node_metrics(labels, probs)[name]


def study_tables(
  results: dict,
  node_names,
  *,
  bootstrap_samples: int,
  alpha: float,
  seed: int,
  reference: str = "hsl",
  baseline: str = "local",
):
  """Tables of a node study from results[method][repeat] = {labels_k, probs_k per node k}.

  Returns (rows, per_node, fairness, values):
    rows      one per (method, repeat, node): test size, positives and node_metrics;
    per_node  one per (method, node, metric): mean over repeats with a t-interval, the
              bootstrap CI over the pooled predictions of all repeats (the HSL paper's
              statistic) and, for every method but `reference`, the paired comparison with
              it on the same test cases (eval/significance.py);
    fairness  one per (method, metric in auc / accuracy): the per-node means' average, worst
              node, spread, std and, when `baseline` ran, each node's gain over it;
    values    (method, node, metric) -> the metric per repeat.
  """
  methods = list(results)
  rows, per_node = [], []
  values = {}  # (method, node, metric) -> [repeats]
  for method in methods:
    for r, out in enumerate(results[method]):
      for k, node in enumerate(node_names):
        labels = out[f"labels_{k}"]
        m = node_metrics(labels, out[f"probs_{k}"])
        counts = dict(n_test=len(labels), positives=int(labels.sum()))
        rows.append(dict(method=method, repeat=r, node=node, **counts, **m))
        for name, v in m.items():
          values.setdefault((method, node, name), []).append(v)
  for method in methods:
    for k, node in enumerate(node_names):
      labels = np.concatenate([out[f"labels_{k}"] for out in results[method]])
      probs = np.concatenate([out[f"probs_{k}"] for out in results[method]])
      for name in METRICS:
        v = np.asarray(values[(method, node, name)], np.float64)
        finite = v[np.isfinite(v)]
        bounds = metrics.metric_range(name)
        mean, lo, hi = metrics.mean_ci(finite, alpha, bounds) if finite.size else (math.nan,) * 3
        if labels.size and (name != "auc" or 0 < labels.sum() < labels.size):
          est, blo, bhi = metrics.bootstrap_ci(
            metric_fn(name), labels, probs, num_samples=bootstrap_samples, alpha=alpha, seed=seed
          )
        else:
          est, blo, bhi = (math.nan,) * 3
        # Every other method against the reference on the same test cases (the HSL paper:
        # paired bootstrap).
        versus = {}
        if method != reference and reference in results:
          versus = significance.versus_reference(
            metric_fn(name),
            values[(method, node, name)],
            values[(reference, node, name)],
            labels,
            probs,
            np.concatenate([out[f"probs_{k}"] for out in results[reference]]),
            num_samples=bootstrap_samples,
            alpha=alpha,
            seed=seed,
          )
        per_node.append(
          dict(
            method=method,
            node=node,
            metric=name,
            mean=mean,
            t_low=lo,
            t_high=hi,
            pooled=est,
            boot_low=blo,
            boot_high=bhi,
            repeats=int(finite.size),
            **{f"{k}_vs_{reference}": v for k, v in versus.items()},
          )
        )

  def node_means(method, name):  # [nodes]: mean over repeats, nan where never defined
    repeats = [values[(method, n, name)] for n in node_names]
    return np.array([np.nanmean(v) if np.isfinite(v).any() else np.nan for v in repeats])

  fairness = []
  for method in methods:
    for name in ("auc", "accuracy"):
      means = node_means(method, name)
      row = dict(
        method=method,
        metric=name,
        node_mean=float(np.nanmean(means)),
        worst=float(np.nanmin(means)),
        worst_node=node_names[int(np.nanargmin(means))],
        spread=float(np.nanmax(means) - np.nanmin(means)),
        std=float(np.nanstd(means)),
      )
      if baseline in results:
        gains = means - node_means(baseline, name)
        row.update({f"gain_{n}": float(g) for n, g in zip(node_names, gains)})
        row[f"nodes_worse_than_{baseline}"] = int(np.sum(gains < 0))
      fairness.append(row)
  return rows, per_node, fairness, values


def sweep_rows(summaries: dict, metric: str = "auc") -> list[dict]:
  """{ratio: run_study summary} -> one row per (ratio, method, node position) of `metric`
  (node1 / node2: node names carry the ratio, positions do not)."""
  kept = ("mean", "t_low", "t_high", "pooled", "boot_low", "boot_high", "repeats")
  rows = []
  for ratio, summary in summaries.items():
    for row in summary["per_node"]:
      if row["metric"] == metric:
        position = summary["nodes"].index(row["node"]) + 1
        where = dict(ratio=float(ratio), method=row["method"], node=f"node{position}")
        rows.append(dict(**where, node_name=row["node"], **{k: row[k] for k in kept}))
  return rows
