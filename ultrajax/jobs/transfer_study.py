"""The cross-organ transfer study ("organ barrier", UltraFedFM Fig. 5 / URFM Fig. 8).

The script, in order:
  1. for every organ in config.organs, pretrain on that organ's phantom images only (the
     pretraining config named by config.pretrain_config, restricted with
     data.phantom_organs=<organ>), each in workdir/pretrain/<organ>;
  2. for every organ's downstream task (config.finetune_config with data.organs=<organ>), run
     the fine-tuning study with one variant per pretraining organ (plus 'scratch'), each in
     workdir/finetune/<organ>;
  3. write the matrix (rows: pretraining organ, columns: downstream task) of the selection
     metric's mean over seeds with 95% CIs and p-values against scratch (the fine-tuning
     summary's) to transfer_matrix.csv, and heatmaps of the metric
     and of its gain over scratch to transfer_matrix.png and transfer_gain.png.
With data.source='tfds' the organs are prepared TFDS datasets (docs/datasets.md): each one's
images are the only client of its pretraining, and its labels (cls) or masks (seg), as the
fine-tuning config's task_type asks, split by patient_id, are its downstream task.
Both stages resume: finished pretraining runs and finished fine-tuning cells are read back.
"""

from __future__ import annotations

import pathlib

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import periodic_actions

from ultrajax import configlib
from ultrajax.data import phantom
from ultrajax.eval import downstream
from ultrajax.jobs import finetune, pretrain
from ultrajax.train import loop
from ultrajax.viz import plots


def organs(config) -> list[str]:
  """config.organs: phantom organs, or (data.source='tfds') prepared TFDS dataset names."""
  names = [o.strip() for o in config.organs.split(",") if o.strip()]
  if config.data.source == "tfds":
    configlib.check(bool(names), f"config.organs={config.organs!r} names no TFDS dataset")
    return names
  bad = [o for o in names if o not in phantom.ORGANS]
  configlib.check(
    bool(names) and not bad,
    f"config.organs={config.organs!r}: {bad or 'empty'}; choose from {phantom.ORGANS}",
  )
  return names


def validate(config) -> None:
  """Fails at start-up naming the field: the source, the organs and, for TFDS organs, each
  dataset's labels or masks for the fine-tuning config's task_type."""
  configlib.check_choice(config, "data.source", ("phantom", "tfds"))
  names = organs(config)
  if config.data.source != "tfds":
    return
  from ultrajax.data.tfds import source as tfds_source  # needs the [tfds] extra

  task_type = finetune_config(config, names[0], []).task_type
  for name in names:
    try:
      client = tfds_source.TfdsSource(name, config.data.tfds_data_dir, config.data.tfds_split)
    except configlib.DataError as e:
      raise configlib.ConfigError(f"config.organs has {name!r}: {e}") from None
    has = {"cls": client.has_label, "seg": client.has_mask}
    configlib.check(
      any(has.values()),
      f"config.organs has {name!r}, a TFDS dataset with neither "
      "labels nor masks, so it has no downstream task",
    )
    configlib.check(
      has[task_type],
      f"config.organs has {name!r}, which has no "
      f"{'labels' if task_type == 'cls' else 'masks'} for task_type={task_type!r} of "
      f"config.finetune_config={config.finetune_config!r}; use "
      f"configs/finetune_{'seg' if task_type == 'cls' else 'cls'}.py or leave it out",
    )


def _stage_config(config, stage: str, organ: str, phantom_field: str):
  """configlib.stage_config on one organ: its TFDS dataset as the only data (fine-tuning: its
  labels or masks, split by patient_id), or its phantom images (data.<phantom_field>=organ)."""
  c = configlib.stage_config(config, stage)
  if config.data.source == "tfds":
    c.data.update(
      source="tfds",
      tfds_name=organ,
      tfds_data_dir=config.data.tfds_data_dir,
      tfds_split=config.data.tfds_split,
    )
  else:
    c.data.source = "phantom"
    c.data[phantom_field] = organ
  return c


def pretrain_config(config, organ: str):
  return _stage_config(config, "pretrain", organ, "phantom_organs")


def finetune_config(config, organ: str, variants: list[tuple[str, str]]):
  c = _stage_config(config, "finetune", organ, "organs")
  c.variants = ",".join(f"{name}={path}" for name, path in variants)
  return c


def write_matrix(
  workdir: pathlib.Path,
  rows: list[str],
  cols: list[str],
  table: dict,
  metric: str,
  tests: dict | None = None,
) -> None:
  """transfer_matrix.csv (eval/downstream.transfer_rows) and the heatmaps of the metric and of
  its gain over scratch."""
  lines = downstream.transfer_rows(rows, cols, table, metric, tests)
  downstream.write_csv(workdir / "transfer_matrix.csv", lines, decimals=None)
  matrix = np.array([[table[(r, c)][0] for c in cols] for r in rows])
  plots.heatmap(
    workdir / "transfer_matrix.png",
    matrix,
    rows,
    cols,
    title=f"test {metric} (mean over seeds)",
    xlabel="downstream task",
    ylabel="pretrained on",
  )
  if "scratch" in rows:
    gain = matrix - matrix[rows.index("scratch")][None]
    plots.heatmap(
      workdir / "transfer_gain.png",
      gain,
      rows,
      cols,
      fmt="{:+.3f}",
      title=f"gain in test {metric} over scratch",
      xlabel="downstream task",
      ylabel="pretrained on",
    )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the study; returns {(pretraining, task): (mean, low, high, n)}."""
  names = organs(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  pretrained = []
  # ETA over the 2 x organs stages (each stage also logs its own progress).
  progress = periodic_actions.ReportProgress(num_train_steps=2 * len(names), every_steps=1)
  progress(0)
  for organ in names:
    out = workdir / "pretrain" / organ
    done = out / "done.json"
    if not done.exists():
      logging.info(
        "Transfer study: pretraining on %s only (%d of %d)", organ, len(pretrained) + 1, len(names)
      )
      pretrain.run(pretrain_config(config, organ), str(out))
      loop.atomic_write(done, {"organ": organ})
    pretrained.append((organ, str(out)))
    progress(len(pretrained))
  variants = ([("scratch", "")] if config.include_scratch else []) + pretrained
  table, tests = {}, {}
  metric = None
  for organ in names:
    fc = finetune_config(config, organ, variants)
    metric = fc.train.select_metric
    logging.info(
      "Transfer study: fine-tuning on the %s task from %d starting points", organ, len(variants)
    )
    for row in finetune.run(fc, str(workdir / "finetune" / organ)):
      if row["metric"] == metric:
        table[(row["variant"], organ)] = tuple(
          row[k] for k in ("mean", "ci_low", "ci_high", "num_seeds")
        )
        tests[(row["variant"], organ)] = {
          k: row[k] for k in ("reference", "diff", "p_ttest", "p_bootstrap", "p_delong")
        }
    progress(len(names) + names.index(organ) + 1)
  row_names = [name for name, _ in variants]
  if jax.process_index() == 0:
    write_matrix(workdir, row_names, names, table, metric, tests)
  logging.info("Transfer matrix of test %s (rows: pretrained on; columns: task):", metric)
  logging.info("  %-12s %s", "", " ".join(f"{c:>10s}" for c in names))
  for r in row_names:
    logging.info("  %-12s %s", r, " ".join(f"{table[(r, c)][0]:10.4f}" for c in names))
  return table
