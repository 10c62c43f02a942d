"""Per-hospital benefit report (issue 20 item 5): does joining the federation help every site?

The script, in order:
  1. federated pretraining with config.pretrain_config (+ pretrain_overrides) in
     workdir/pretrain/federated, or the finished run named by config.federated_workdir;
  2. every client's local-only encoder. local_baseline='pretrain': the same pretraining config on
     that client's data alone (data.clients=<its name>; same rounds, local epochs, batch and
     schedule, so the client takes exactly its federated number of local steps) in
     workdir/pretrain/local_<k>. local_baseline='scratch': a randomly initialised encoder, a
     cheaper stand-in labelled 'scratch' everywhere (it measures the gain over no pretraining,
     not over pretraining alone);
  3. every client's own labelled task (phantom clients: the lesion labels of their own
     generator's records, eval/benefit.py; manifest clients: their rows' task.label_column),
     fine-tuned with config.finetune_config from both encoders, finetune num_seeds seeds each
     (jobs/finetune.py train_one; cells in workdir/finetune/<k>_<client>/<variant>/seed_<s>);
  4. benefit.csv: per client both test metrics (finetune train.select_metric, mean over seeds),
     the gain (positive = joining helped) with a paired bootstrap 95% CI over the client's test
     images and its p-value; benefit_summary.csv: the spread over clients (mean, test-size
     weighted mean, std, min, bottom 25%, gap, Gini, Jain, clients with a negative gain);
     benefit.png.
Every stage resumes: pretraining from its workdir, finished fine-tuning cells are read back.
"""

from __future__ import annotations

import copy
import pathlib
import re

import jax
import ml_collections
import numpy as np
from absl import logging

from ultrajax import configlib, pretrain_checks
from ultrajax.data import clients as clients_lib
from ultrajax.eval import benefit, downstream
from ultrajax.jobs import finetune, pretrain
from ultrajax.train import loop, resume, sharding
from ultrajax.viz import benefit as benefit_viz

BASELINES = ("pretrain", "scratch")
SOURCES = ("phantom", "manifest")


def finetune_config(config) -> ml_collections.ConfigDict:
  c = configlib.stage_config(config, "finetune")
  c.fractions = (1.0,)
  return c


def validate(config) -> None:
  """Fails at start-up naming the field: this job's own and both stage configs'."""
  c = configlib
  c.check_choice(config, "local_baseline", BASELINES)
  c.check_range(config, "task.images_per_client", 1)
  c.check_range(config, "bootstrap_samples", 1)
  lo, mid, hi = config.task.split_fractions
  c.check(
    min(lo, mid, hi) > 0 and abs(lo + mid + hi - 1) < 1e-6,
    f"config.task.split_fractions={tuple(config.task.split_fractions)} must be three "
    "positive shares summing to 1",
  )
  pc, fc = configlib.stage_config(config, "pretrain"), finetune_config(config)
  pretrain_checks.validate(pc)
  finetune.validate(fc)
  c.check(
    pc.data.source in SOURCES,
    f"config.pretrain_config data.source={pc.data.source!r}: "
    f"the benefit report needs labelled clients, one of {SOURCES}",
  )
  c.check(
    not pc.data.pool_clients,
    "config.pretrain_config has data.pool_clients=True: the "
    "benefit report needs the federated clients (use configs/pretrain_fed.py)",
  )
  c.check(
    fc.task_type == "cls",
    f"config.finetune_config={config.finetune_config!r} has "
    f"task_type={fc.task_type!r}; the benefit report fine-tunes a classification task",
  )
  if config.federated_workdir:
    c.check(
      pathlib.Path(config.federated_workdir).is_dir(),
      f"config.federated_workdir={config.federated_workdir!r} is not a folder",
    )


def raw_clients(pc) -> list:
  """The pretraining clients as plain sources (no SMAT partners, every image, no subset)."""
  c = copy.deepcopy(pc)
  c.ultramim.smat, c.data.fraction, c.data.clients = False, 1.0, ""
  return clients_lib.client_sources(c)


def client_task(config, pc, source, k: int, image_size: int, workdir: pathlib.Path):
  t = config.task
  if pc.data.source == "phantom":
    return benefit.phantom_client_task(
      source,
      t.images_per_client,
      image_size,
      classes=tuple(x.strip() for x in t.classes.split(",") if x.strip()),
      split_fractions=tuple(t.split_fractions),
      split_seed=t.split_seed,
    )
  d = pc.data
  return benefit.manifest_client_task(
    d.manifest,
    source.name,
    workdir / "tasks" / f"{_dirname(k, source.name)}.csv",
    image_size,
    client_column=d.client_column,
    image_column=d.image_column,
    label_column=t.label_column,
    group_column=t.group_column,
    split_column=t.split_column,
    classes=t.classes,
    split_fractions=tuple(t.split_fractions),
    split_seed=t.split_seed,
  )


def _dirname(k: int, name: str) -> str:
  return f"{k:02d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"


def _pretrain_once(config, out: pathlib.Path) -> str:
  """Runs (or resumes) one pretraining in `out` unless it finished before."""
  done = out / "done.json"
  if not done.exists():
    pretrain.run(config, str(out))
    loop.atomic_write(done, {"clients": config.data.clients})
  return str(out)


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs (or resumes) the report; returns the per-client rows (also in benefit.csv)."""
  validate(config)
  with resume.WorkdirLock(workdir):
    return _run(config, pathlib.Path(workdir))


def _run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> list[dict]:
  workdir.mkdir(parents=True, exist_ok=True)
  pc, fc = configlib.stage_config(config, "pretrain"), finetune_config(config)
  clients = raw_clients(pc)
  fed_dir = config.federated_workdir or _pretrain_once(pc, workdir / "pretrain" / "federated")
  baseline = "local" if config.local_baseline == "pretrain" else "scratch"
  mesh = sharding.make_mesh(clients=1, data=fc.mesh.data)
  metric = fc.train.select_metric
  sign = -1.0 if metric in downstream.LOWER_IS_BETTER else 1.0
  rows = []
  for k, source in enumerate(clients):
    local_dir = ""
    if config.local_baseline == "pretrain":
      lc = copy.deepcopy(pc)
      lc.data.clients, lc.fed.lanes = source.name, 0  # lanes: speed only; one client here
      logging.info("Benefit report: pretraining client %d (%s) alone", k, source.name)
      local_dir = _pretrain_once(lc, workdir / "pretrain" / f"local_{k:02d}")
    data = client_task(config, pc, source, k, fc.model.image_size, workdir)
    outputs, values = {}, {}
    for variant, init in (("federated", fed_dir), (baseline, local_dir)):
      seeds = [fc.seed + s for s in range(fc.num_seeds)]
      run_dirs = [
        workdir / "finetune" / _dirname(k, source.name) / variant / f"seed_{s}" for s in seeds
      ]
      cells = [
        finetune.read_or_train(fc, data, d, init_path=init, fraction=1.0, seed=s, mesh=mesh)
        for d, s in zip(run_dirs, seeds)
      ]
      values[variant] = float(np.mean([c["test"][metric][0] for c in cells]))
      outs = [np.load(d / "test_outputs.npz") for d in run_dirs]
      outputs[variant] = (outs[0]["targets"], np.stack([o["probs"] for o in outs]))
    targets = outputs["federated"][0]
    gain = benefit.gain_ci(
      lambda y, p: sign * downstream.cls_scores(y, p)[metric],
      targets,
      outputs["federated"][1],
      outputs[baseline][1],
      num_samples=config.bootstrap_samples,
      seed=config.seed,
    )
    rows.append(
      {
        "client": source.name,
        "num_train": int(len(data.indices("train"))),
        "num_test": int(len(targets)),
        f"federated_{metric}": values["federated"],
        f"{baseline}_{metric}": values[baseline],
        "gain": gain.diff,
        "ci_low": gain.ci_low,
        "ci_high": gain.ci_high,
        "p_bootstrap": gain.pvalue,
        "num_seeds": fc.num_seeds,
      }
    )
    logging.info(
      "client %s: %s federated %.4f, %s %.4f, gain %+.4f [%.4f, %.4f]",
      source.name,
      metric,
      values["federated"],
      baseline,
      values[baseline],
      gain.diff,
      gain.ci_low,
      gain.ci_high,
    )
  summary = [
    {"quantity": name, **benefit.spread([r[col] for r in rows], [r["num_test"] for r in rows])}
    for name, col in (
      ("federated", f"federated_{metric}"),
      (baseline, f"{baseline}_{metric}"),
      ("gain", "gain"),
    )
  ]
  for row in summary:  # clients whose gain CI lies wholly below / above 0
    gains = row["quantity"] == "gain"
    row["ci_below_zero"] = sum(r["ci_high"] < 0 for r in rows) if gains else ""
    row["ci_above_zero"] = sum(r["ci_low"] > 0 for r in rows) if gains else ""
  if jax.process_index() == 0:
    downstream.write_csv(workdir / "benefit.csv", rows)
    downstream.write_csv(workdir / "benefit_summary.csv", summary)
    benefit_viz.gain_plot(
      workdir / "benefit.png",
      [r["client"] for r in rows],
      [r[f"federated_{metric}"] for r in rows],
      [r[f"{baseline}_{metric}"] for r in rows],
      [r["gain"] for r in rows],
      [r["ci_low"] for r in rows],
      [r["ci_high"] for r in rows],
      metric=metric,
      local_label="local only" if baseline == "local" else "scratch (random init)",
    )
  g = summary[-1]
  logging.info(
    "Gain in test %s over %s: mean %+.4f, min %+.4f, %d of %d clients negative "
    "(%d with the CI below 0)",
    metric,
    baseline,
    g["mean"],
    g["min"],
    g["negative"],
    g["num_clients"],
    g["ci_below_zero"],
  )
  return rows
