"""Per-hospital benefit report (issue 20 item 5): eval/benefit.py and the job's wiring."""

import csv
import json
import math
import pathlib

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from ultrajax import configlib
from ultrajax.data import phantom, sources, tasks
from ultrajax.eval import benefit


def test_gain_ci_equals_a_numpy_bootstrap_of_the_seed_mean_auroc():
  rng = np.random.default_rng(3)
  n, seeds = 40, 2
  y = rng.integers(0, 2, n)
  fed = rng.random((seeds, n, 2))
  fed[..., 1] += 0.5 * y  # the federated model separates the classes better
  local = rng.random((seeds, n, 2))
  auroc = lambda yy, p: roc_auc_score(yy, p[:, 1])  # noqa: E731
  got = benefit.gain_ci(auroc, y, fed, local, num_samples=100, seed=7)

  def mean_auroc(out, rows):
    return np.mean([roc_auc_score(y[rows], out[s, rows, 1]) for s in range(seeds)])

  draws = np.random.default_rng(7)
  deltas = []
  for _ in range(100):
    rows = draws.integers(0, n, n)
    if len(np.unique(y[rows])) == 2:
      deltas.append(mean_auroc(fed, rows) - mean_auroc(local, rows))
  everything = np.arange(n)
  assert got.diff == pytest.approx(
    mean_auroc(fed, everything) - mean_auroc(local, everything), abs=1e-12
  )
  low, high = np.percentile(deltas, [2.5, 97.5])
  assert (got.ci_low, got.ci_high) == pytest.approx((low, high), abs=1e-12)
  assert got.ci_low > 0  # the better model's gain is clearly positive
  same = benefit.gain_ci(auroc, y, fed, fed.copy(), num_samples=50)
  assert (same.diff, same.ci_low, same.ci_high, same.pvalue) == (0.0, 0.0, 0.0, 1.0)
  with pytest.raises(ValueError, match="equal shape"):
    benefit.gain_ci(auroc, y, fed, local[:1])


def test_spread_matches_hand_computed_fairness_statistics():
  s = benefit.spread([0.6, 0.8, 0.7, 0.9], weights=[10, 30, 20, 40])
  assert s["mean"] == pytest.approx(0.75)
  assert s["weighted_mean"] == pytest.approx(0.80)
  assert s["std"] == pytest.approx(math.sqrt(0.0125))
  assert (s["min"], s["max"], s["bottom25_mean"]) == pytest.approx((0.6, 0.9, 0.6))
  assert s["gap"] == pytest.approx(0.3)
  assert s["gini"] == pytest.approx(2.0 / (2 * 16 * 0.75))  # sum_ij |a_i - a_j| = 2.0
  assert s["jain"] == pytest.approx(9.0 / 9.2)
  assert s["negative"] == 0
  # Extremes: one client has it all -> Gini (K-1)/K, Jain 1/K; gains may be negative.
  assert benefit.gini([0, 0, 0, 1]) == pytest.approx(0.75)
  assert benefit.jain([0, 0, 0, 1]) == pytest.approx(0.25)
  g = benefit.spread([0.1, -0.2, np.nan, 0.05])
  assert g["num_clients"] == 3 and g["negative"] == 1 and math.isnan(g["gini"])


def test_phantom_client_task_uses_the_hospitals_own_images_and_labels():
  source = sources.PhantomSource("BUV", "breast", "linear", 16, 48, seed=0)
  data = benefit.phantom_client_task(source, 80, 32, split_fractions=(0.5, 0.25, 0.25))
  records = [source[i] for i in range(16)]  # the images it pretrained on come first
  kept = [i for i, r in enumerate(records) if phantom.LABELS[r["label"]] != "normal"]
  first = [int(g.split("/")[1]) for g in data.groups[: len(kept)]]
  assert first == kept
  for j, i in enumerate(kept):
    np.testing.assert_array_equal(data.images[j], tasks.resize_image(records[i]["image"], 32))
    assert data.class_names[data.targets[j]] == phantom.LABELS[records[i]["label"]]
  assert data.images.shape[1:] == (32, 32, 3) and set(data.splits) == set(tasks.SPLITS)
  assert len(set(data.groups)) == len(data.groups)
  with pytest.raises(configlib.ConfigError, match="config.task.classes"):
    benefit.phantom_client_task(source, 20, 32, classes=("benign", "cyst"))


def test_manifest_client_task_reads_only_that_clients_rows(tmp_path):
  folder = tmp_path / "data"
  folder.mkdir()
  rows = []
  for c in ("a", "b"):
    for i in range(10):
      name = f"{c}{i}.png"
      Image.fromarray(np.full((20, 20), 10 * i + (c == "b"), np.uint8)).save(folder / name)
      rows.append(
        {"image": name, "client": c, "label": "pos" if i % 2 else "neg", "group": f"{c}-{i}"}
      )
  csv_path = folder / "m.csv"
  with open(csv_path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  data = benefit.manifest_client_task(
    str(csv_path), "b", tmp_path / "out" / "b.csv", 16, split_fractions=(0.4, 0.3, 0.3)
  )
  assert len(data.images) == 10 and data.class_names == ("neg", "pos")
  assert sorted(data.groups.tolist()) == sorted(f"b-{i}" for i in range(10))
  assert set(np.unique(data.images[..., 0]) % 10) == {1}  # client b's pixel values only
  with pytest.raises(configlib.DataError, match="'diagnosis'"):
    benefit.manifest_client_task(
      str(csv_path), "b", tmp_path / "out" / "x.csv", 16, label_column="diagnosis"
    )


def _smoke_config(**overrides):
  c = configlib.load_config_file("configs/benefit.py:smoke", "config")
  for k, v in overrides.items():
    configlib.get_field(c, k)  # exists
    parent, _, name = k.rpartition(".")
    (c if not parent else configlib.get_field(c, parent))[name] = v
  return c


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("local_baseline", "alone", "config.local_baseline"),
    ("bootstrap_samples", 0, "config.bootstrap_samples"),
    ("task.split_fractions", (0.5, 0.5, 0.0), "config.task.split_fractions"),
    ("finetune_config", "configs/finetune_seg.py:smoke", "task_type='seg'"),
  ],
)
def test_validate_names_the_bad_field(field, value, message):
  from ultrajax.jobs import benefit as job

  with pytest.raises(configlib.ConfigError, match=message.replace("(", r"\(")):
    job.validate(_smoke_config(**{field: value}))


def test_job_pretrains_each_client_alone_and_reports_gains(tmp_path, monkeypatch):
  """The job's wiring with the two training stages replaced by recorders: the local pretraining
  gets one client each, every cell is fine-tuned from the right encoder, and benefit.csv holds
  the gains eval/benefit.py computes from the cells' test outputs."""
  from ultrajax.jobs import benefit as job, finetune, pretrain
  from ultrajax.train import resume

  pretrained, tuned = [], []

  def fake_pretrain(config, workdir):
    pretrained.append((config.data.clients, config.fed.lanes, workdir))
    pathlib.Path(workdir).mkdir(parents=True)

  def fake_train_one(config, data, run_dir, *, init_path, fraction, seed, mesh):
    tuned.append((run_dir.parent.name, init_path, len(data.images)))
    test = data.indices("test")
    y = data.targets[test]
    rng = np.random.default_rng([seed, len(tuned)])
    score = rng.random(len(test)) + (y if run_dir.parent.name == "federated" else 0)
    probs = np.stack([1 - score / 2, score / 2], axis=1)
    run_dir.mkdir(parents=True)
    np.savez(run_dir / "test_outputs.npz", test_index=test, targets=y, probs=probs)
    result = {
      "test": {"auroc": [roc_auc_score(y, probs[:, 1]), 0, 0]},
      "seed": seed,
      "config": resume.snapshot(config, exclude=finetune.STUDY_FIELDS),
    }
    (run_dir / "results.json").write_text(json.dumps(result))
    return result

  monkeypatch.setattr(pretrain, "run", fake_pretrain)
  monkeypatch.setattr(finetune, "train_one", fake_train_one)
  config = _smoke_config(**{"task.images_per_client": 80, "bootstrap_samples": 30})
  rows = job.run(config, str(tmp_path))
  assert [p[:2] for p in pretrained] == [("", 0), ("BUV", 0), ("CLUST", 0)]
  fed_dir, local_dirs = pretrained[0][2], [p[2] for p in pretrained[1:]]
  assert [(v, i) for v, i, _ in tuned] == [
    ("federated", fed_dir),
    ("local", local_dirs[0]),
    ("federated", fed_dir),
    ("local", local_dirs[1]),
  ]
  with open(tmp_path / "benefit.csv") as f:
    table = list(csv.DictReader(f))
  assert [r["client"] for r in table] == ["BUV", "CLUST"]
  for row, written in zip(rows, table):
    k = rows.index(row)
    cells = {
      v: np.load(
        next((tmp_path / "finetune").glob(f"{k:02d}_*")) / v / "seed_0" / "test_outputs.npz"
      )
      for v in ("federated", "local")
    }
    auroc = lambda y, p: roc_auc_score(y, p[:, 1])  # noqa: E731
    want = benefit.gain_ci(
      auroc,
      cells["federated"]["targets"],
      cells["federated"]["probs"][None],
      cells["local"]["probs"][None],
      num_samples=30,
      seed=0,
    )
    assert (row["gain"], row["ci_low"], row["ci_high"]) == pytest.approx(
      (want.diff, want.ci_low, want.ci_high), abs=1e-12
    )
    assert float(written["gain"]) == pytest.approx(row["gain"], abs=1e-4)
  summary = list(csv.DictReader(open(tmp_path / "benefit_summary.csv")))
  assert [s["quantity"] for s in summary] == ["federated", "local", "gain"]
  assert float(summary[2]["mean"]) == pytest.approx(np.mean([r["gain"] for r in rows]), abs=1e-4)
  assert (tmp_path / "benefit.png").stat().st_size > 0
  # Finished pretraining and cells are read back, not rerun.
  pretrained.clear()
  tuned.clear()
  assert job.run(config, str(tmp_path)) == rows
  assert pretrained == [] and tuned == []
