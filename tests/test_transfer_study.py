"""The cross-organ transfer study end to end on its smoke preset."""

import csv
import pathlib

import numpy as np
import pytest

from ultrajax import configlib
from ultrajax.jobs import transfer_study

REPO = pathlib.Path(__file__).resolve().parents[1]


def smoke_config():
  return configlib.load_config_module(REPO / "configs" / "transfer_study.py").get_config("smoke")


def test_transfer_study_smoke_writes_matrix_and_heatmaps(tmp_path):
  table = transfer_study.run(smoke_config(), str(tmp_path))
  assert set(table) == {
    (r, c) for r in ("scratch", "breast", "thyroid") for c in ("breast", "thyroid")
  }
  with open(tmp_path / "transfer_matrix.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 6
  for row in rows:
    mean = float(row["auroc_mean"])
    assert np.isnan(mean) or 0.0 <= mean <= 1.0
    expected_gain = mean - table[("scratch", row["task"])][0]
    np.testing.assert_allclose(float(row["gain_over_scratch"]), expected_gain, atol=1e-4)
    # Each pretrained cell is tested against scratch on the same test images.
    assert row["reference"] == ("" if row["pretraining"] == "scratch" else "scratch")
    if row["reference"]:
      assert 0.0 < float(row["p_bootstrap"]) <= 1.0
  assert (tmp_path / "transfer_matrix.png").stat().st_size > 0
  assert (tmp_path / "transfer_gain.png").stat().st_size > 0
  # Each pretraining saw only its own organ.
  assert (tmp_path / "pretrain" / "breast" / "done.json").exists()


def test_transfer_study_rejects_unknown_organs_and_fields():
  config = smoke_config()
  config.organs = "breast,spleen"
  with pytest.raises(configlib.ConfigError, match="spleen"):
    transfer_study.organs(config)
  config = smoke_config()
  with pytest.raises(configlib.ConfigError, match="pretrain_overrides.fed.num_epochs"):
    config.pretrain_overrides = {"fed": {"num_epochs": 3}}
    transfer_study.pretrain_config(config, "breast")
