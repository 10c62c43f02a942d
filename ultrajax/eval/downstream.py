"""Scores of a downstream (diagnosis / segmentation) test: batched predictions, metric tables
with bootstrap CIs, the study summary over seeds with tests against a reference variant, the
transfer matrix's rows and CSV tables."""

from __future__ import annotations

import csv
import io
import math
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from ultrajax.eval import metrics, significance
from ultrajax.train import loop
from ultrajax.ultramim import corruption

CLS_METRICS = (
  "auroc",
  "average_precision",
  "accuracy",
  "f1",
  "precision",
  "recall",
  "specificity",
  "npv",
  "ece",
)
# Distances (hd95, asd; nsd's tolerance) in mm where the task knows the pixel size, else pixels.
SEG_METRICS = ("dice", "iou", "hd95", "asd", "nsd")
LOWER_IS_BETTER = ("hd95", "asd", "ece")


def padded_batches(fn, count: int, size: int) -> np.ndarray:
  """fn(rows [size]) -> [size, ...] over rows 0 .. count - 1 in batches of `size`, the last one
  padded with its final row and cut back (one shape, one compile) -> [count, ...]."""
  out = [
    np.asarray(jax.device_get(fn(np.minimum(np.arange(i, i + size), count - 1))))
    for i in range(0, count, size)
  ]
  return np.concatenate(out)[:count]


def predict_batches(
  predict, params, images: np.ndarray, batch_size: int, data_sharding
) -> np.ndarray:
  """predict(params, batch) over every image, in batches of `batch_size` (padded_batches);
  batches are placed by `data_sharding` and the outputs must come back replicated (each
  process reads them whole)."""
  batch = lambda rows: predict(params, loop.put_global(images[rows], data_sharding))
  return padded_batches(batch, len(images), batch_size)


def cls_scores(labels: np.ndarray, probs: np.ndarray) -> dict:
  """Every classification metric on one split (two classes: the positive class's probability)."""
  k = probs.shape[1]
  s = probs[:, 1] if k == 2 else probs
  preds = probs.argmax(axis=1)
  avg = "binary" if k == 2 else "macro"
  return {
    "auroc": metrics.auroc(labels, s),
    "average_precision": metrics.average_precision(labels, s),
    "accuracy": metrics.accuracy(labels, preds),
    "f1": metrics.f1(labels, preds, average=avg, num_classes=k),
    "precision": metrics.precision(labels, preds, average=avg, num_classes=k),
    "recall": metrics.recall(labels, preds, average=avg, num_classes=k),
    "specificity": metrics.specificity(labels, preds, average=avg, num_classes=k),
    "npv": metrics.npv(labels, preds, average=avg, num_classes=k),
    "ece": metrics.expected_calibration_error(labels, probs),
  }


def seg_per_image(
  targets: np.ndarray, preds: np.ndarray, num_classes: int, spacing=None, nsd_tolerance: float = 2.0
) -> dict:
  """Per-image SEG_METRICS, each averaged over the foreground classes. [N] each.

  spacing: [N, 2] (row, column) mm per input pixel (TaskData.spacing), so hd95 / asd are in mm
  and the surface Dice tolerance is `nsd_tolerance` mm; None: all three in input pixels.
  """
  spacing = (1.0, 1.0) if spacing is None else spacing
  out = {name: [] for name in SEG_METRICS}
  for c in range(1, num_classes):
    p, t = preds == c, targets == c
    out["dice"].append(metrics.dice(p, t))
    out["iou"].append(metrics.iou(p, t))
    out["hd95"].append(metrics.hd95(p, t, spacing))
    out["asd"].append(metrics.average_surface_distance(p, t, spacing))
    out["nsd"].append(metrics.surface_dice(p, t, nsd_tolerance, spacing))
  with warnings.catch_warnings():  # nanmean of all-nan columns (hd95 with one mask empty)
    warnings.simplefilter("ignore", RuntimeWarning)
    return {k: np.nanmean(np.stack(v), axis=0) for k, v in out.items()}


def split_scores(
  task_type, targets, outputs, num_classes, spacing=None, nsd_tolerance: float = 2.0
) -> dict:
  if task_type == "cls":
    return cls_scores(targets, outputs)
  per_image = seg_per_image(targets, outputs, num_classes, spacing, nsd_tolerance)
  return {
    k: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for k, v in per_image.items()
  }


def test_report(
  task_type,
  targets,
  outputs,
  num_classes,
  num_samples: int,
  seed: int,
  spacing=None,
  nsd_tolerance: float = 2.0,
) -> dict:
  """{metric: [estimate, low, high]} with percentile-bootstrap 95% CIs over test images, every
  metric scored on the same resampled images (one bootstrap for all)."""
  if task_type == "cls":
    cis = metrics.bootstrap_cis(cls_scores, targets, outputs, num_samples=num_samples, seed=seed)
    return {name: list(v) for name, v in cis.items()}
  per_image = seg_per_image(targets, outputs, num_classes, spacing, nsd_tolerance)
  table = np.stack([per_image[name] for name in SEG_METRICS], axis=1)  # [N, M]
  cis = metrics.bootstrap_cis(seg_means, table, num_samples=num_samples, seed=seed)
  report = {name: list(v) for name, v in cis.items()}
  report["hd95_undefined_images"] = int(np.sum(~np.isfinite(per_image["hd95"])))
  report["distance_unit"] = "px" if spacing is None else "mm"
  return report


def seg_means(table: np.ndarray) -> dict:
  """{metric: mean over images} of a per-image table [N, len(SEG_METRICS)]; images where a
  metric is undefined (nan: one mask empty) are left out."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return dict(zip(SEG_METRICS, np.nanmean(table, axis=0)))


def blurred(images_u8: np.ndarray, sigma: float, chunk: int = 64) -> np.ndarray:
  """[N, S, S, 3] uint8 under a Gaussian blur of `sigma` input pixels (scipy's reflect borders),
  rounded back to uint8; sigma 0 returns the images."""
  if sigma == 0:
    return images_u8
  out = []
  for i in range(0, len(images_u8), chunk):
    x = corruption.gaussian_blur(jnp.asarray(images_u8[i : i + chunk], jnp.float32), float(sigma))
    out.append(np.clip(np.round(np.asarray(x)), 0, 255).astype(np.uint8))
  return np.concatenate(out)


def better(metric: str, new: float, old: float) -> bool:
  if not math.isfinite(new):
    return False
  if not math.isfinite(old):
    return True
  return new < old if metric in LOWER_IS_BETTER else new > old


def reference_variant(study: list[tuple[str, str]]) -> str:
  """The variant every other one is tested against: 'scratch' if the study has it, else the first."""
  names = [name for name, _ in study]
  return "scratch" if "scratch" in names else names[0]


def paired_cell_tests(cell: dict, ref: dict, num_samples: int) -> dict:
  """{metric: {'bootstrap': p[, 'delong': p]}} of a cell against the reference variant's cell of
  the same seed and fraction, paired over their saved test outputs (the same test images):
  paired bootstrap of every metric, and DeLong for a binary AUROC. {} when either cell saved no
  outputs or their test images differ."""
  paths = [pathlib.Path(c["run_dir"]) / "test_outputs.npz" for c in (cell, ref)]
  if not all(path.exists() for path in paths):
    return {}
  with np.load(paths[0]) as fa, np.load(paths[1]) as fb:
    a, b = dict(fa), dict(fb)
  if not np.array_equal(a["test_index"], b["test_index"]):
    return {}
  if "probs" in a:
    fn, args = cls_scores, (a["targets"], a["probs"], b["probs"])
  else:
    fn, args = seg_means, (None, a["per_image"], b["per_image"])
  boot = significance.paired_bootstrap(fn, *args, num_samples=num_samples, seed=cell["seed"])
  out = {name: {"bootstrap": c.pvalue} for name, c in boot.items()}
  targets = a.get("targets")
  if "probs" in a and a["probs"].shape[1] == 2 and 0 < targets.sum() < len(targets):
    out["auroc"]["delong"] = significance.delong_test(
      targets, a["probs"][:, 1], b["probs"][:, 1]
    ).pvalue
  return out


def _cell_value(cell: dict, name: str) -> float:
  """A test metric ('auroc') or a blurred one ('auroc@blur2' = results['blur']['2']['auroc'];
  nan for a cell tested without that blur, e.g. one finished before eval.blur_sigmas was set)."""
  metric, _, sigma = name.partition("@blur")
  if sigma:
    return cell.get("blur", {}).get(sigma, {}).get(metric, math.nan)
  return cell["test"][metric][0]


def summarise(
  cells: list[dict], metric_names, reference: str | None = None, num_samples: int = 1000
) -> list[dict]:
  """Rows of (variant, fraction, metric, mean, low, high, n, values) over seeds, and the tests
  against the `reference` variant at the same fraction: diff (mean over seeds of variant minus
  reference), p_ttest (two-sided paired t-test over seeds), and per seed (space-separated, as
  `values`) p_bootstrap (paired bootstrap over test images) and p_delong (binary AUROC), where
  the cells saved their test outputs. Cells tested under blur add rows 'metric@blur<sigma>'."""
  rows = []
  tests = {}
  refs = {(c["fraction"], c["seed"]): c for c in cells if c["variant"] == reference}
  for c in cells:
    ref = refs.get((c["fraction"], c["seed"]))
    if c["variant"] != reference and ref is not None and "run_dir" in c and "run_dir" in ref:
      tests[(c["variant"], c["fraction"], c["seed"])] = paired_cell_tests(c, ref, num_samples)
  keys = sorted({(c["variant"], c["fraction"]) for c in cells}, key=lambda k: (k[0], -k[1]))
  for variant, fraction in keys:
    group = sorted(
      (c for c in cells if c["variant"] == variant and c["fraction"] == fraction),
      key=lambda c: c["seed"],
    )
    blur_names = [
      f"{m}@blur{s}"
      for s in (group[0].get("blur") or {})
      for m in metric_names
      if all(s in c.get("blur", {}) for c in group)
    ]
    ref_group = [refs.get((fraction, c["seed"])) for c in group]
    compare = variant != reference and all(r is not None for r in ref_group)
    for name in (*metric_names, *blur_names):
      values = np.array([_cell_value(c, name) for c in group], np.float64)
      mean, low, high = metrics.mean_ci(values, bounds=metrics.metric_range(name.split("@")[0]))
      row = {
        "variant": variant,
        "fraction": fraction,
        "metric": name,
        "mean": mean,
        "ci_low": low,
        "ci_high": high,
        "num_seeds": len(values),
        "values": " ".join(f"{v:.4f}" for v in values),
        "reference": reference if compare else "",
        "diff": math.nan,
        "p_ttest": math.nan,
        "p_bootstrap": "",
        "p_delong": "",
      }
      if compare:
        t = significance.paired_ttest(values, [_cell_value(r, name) for r in ref_group])
        per_seed = [tests.get((variant, fraction, c["seed"]), {}).get(name, {}) for c in group]
        row.update(
          diff=t.diff,
          p_ttest=t.pvalue,
          **{
            f"p_{kind}": " ".join(f"{p[kind]:.4g}" for p in per_seed if kind in p)
            for kind in ("bootstrap", "delong")
          },
        )
      rows.append(row)
  return rows


def transfer_rows(
  rows: list[str], cols: list[str], table: dict, metric: str, tests: dict | None = None
) -> list[dict]:
  """The transfer matrix as table rows, one per (pretraining source, downstream task), formatted
  for CSV. table[(source, task)] = (mean, low, high, n) over seeds; tests[(source, task)]: the
  fine-tuning summary's columns of that cell against its reference variant (scratch when the
  study has it): reference, diff, p_ttest, p_bootstrap, p_delong. gain_over_scratch is the
  mean minus scratch's on the same task (nan without scratch)."""
  tests = tests or {}
  test_columns = ("reference", "diff", "p_ttest", "p_bootstrap", "p_delong")
  out = []
  for r in rows:
    for c in cols:
      mean, low, high, n = table[(r, c)]
      gain = mean - table[("scratch", c)][0] if ("scratch", c) in table else math.nan
      cell = {k: tests.get((r, c), {}).get(k, "") for k in test_columns}
      out.append(
        {
          "pretraining": r,
          "task": c,
          f"{metric}_mean": f"{mean:.4f}",
          "ci_low": f"{low:.4f}",
          "ci_high": f"{high:.4f}",
          "num_seeds": n,
          "gain_over_scratch": f"{gain:.4f}",
          **{k: f"{v:.4g}" if isinstance(v, float) else v for k, v in cell.items()},
        }
      )
  return out


def write_csv(path, rows: list[dict], decimals: int | None = 4) -> None:
  """rows (dicts; the columns are their keys in order of appearance) -> CSV at `path`, floats
  with `decimals` decimals (None: as Python prints them). Written atomically (loop.atomic_write:
  a killed run leaves the previous table, never a torn one); parent folders are created."""
  columns = list(dict.fromkeys(k for row in rows for k in row))
  fmt = (lambda v: v) if decimals is None else (lambda v: f"{v:.{decimals}f}")
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, columns)
  writer.writeheader()
  for row in rows:
    writer.writerow({k: fmt(v) if isinstance(v, float) else v for k, v in row.items()})
  loop.atomic_write(path, text.getvalue())
