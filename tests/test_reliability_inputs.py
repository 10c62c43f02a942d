"""Refused inputs (docs/reliability.md): masks, labels, manifests, weight files, config errors.

Each test writes the bad input for real and checks the error names the file, line, key or value.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags
from PIL import Image

from ultrajax import configlib, ultramim
from ultrajax.data import pipeline, sources, tasks
from ultrajax.interop import files, load
from ultrajax.models import mae

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(name: str, preset: str = "smoke"):
  return configlib.load_config_module(REPO / "configs" / name).get_config(preset)


def _ellipse(h=48, w=64) -> np.ndarray:
  """A 0/255 binary mask: an off-centre ellipse (a lesion), uint8 [h, w]."""
  yy, xx = np.mgrid[:h, :w]
  return np.where(((yy - 20) / 12) ** 2 + ((xx - 30) / 17) ** 2 < 1, 255, 0).astype(np.uint8)


def _seg_manifest(root: pathlib.Path, masks: dict, ext: str = "png") -> pathlib.Path:
  """One image per mask; masks {name: uint8 [H, W]} saved as `ext` (JPEG at quality 75)."""
  rows = []
  for name, mask in masks.items():
    Image.fromarray(np.full(mask.shape, 90, np.uint8)).save(root / f"{name}.png")
    Image.fromarray(mask).save(
      root / f"{name}_m.{ext}", **({"quality": 75} if ext == "jpg" else {})
    )
    rows.append([f"{name}.png", f"{name}_m.{ext}"])
  path = root / f"masks_{ext}.csv"
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows([["image", "mask"], *rows])
  return path


# ----------------------------------------------------------------------------- masks
def test_jpeg_and_png_binary_masks_give_the_same_two_classes(tmp_path):
  masks = {f"m{i}": np.roll(_ellipse(), 3 * i, axis=1) for i in range(3)}
  png = tasks.manifest_task(str(_seg_manifest(tmp_path, masks, "png")), "seg", 32)
  jpg_path = _seg_manifest(tmp_path, masks, "jpg")
  raw = np.asarray(Image.open(tmp_path / "m0_m.jpg"))
  assert len(np.unique(raw)) > 2 and raw.max() > 128  # JPEG noise around 0 and 255, as in the wild
  jpg = tasks.manifest_task(str(jpg_path), "seg", 32)
  assert png.class_names == jpg.class_names == ("background", "foreground")
  np.testing.assert_array_equal(jpg.targets, png.targets)
  # Independent reference: the 0/255 masks thresholded, resized by nearest neighbour.
  want = np.stack(
    [
      np.asarray(
        Image.fromarray((m > 0).astype(np.uint8)).resize((32, 32), Image.Resampling.NEAREST)
      )
      for m in masks.values()
    ]
  )
  np.testing.assert_array_equal(png.targets, want)
  # A 0/1 mask is taken as is.
  assert tasks.mask_classes((_ellipse() > 0).astype(np.uint8), "binary", (), "x").max() == 1


def test_ambiguous_binary_masks_are_refused_naming_file_and_values(tmp_path):
  half = (_ellipse() // 255 * 128).astype(np.uint8)  # a binary mask stored as 0/128
  path = _seg_manifest(tmp_path, {"a": _ellipse(), "b": half})
  with pytest.raises(
    configlib.DataError,
    match=r"line 3: mask .*b_m\.png has values \{0: \d+ px, "
    r"128: \d+ px\}.* not a 0/255 binary mask",
  ):
    tasks.manifest_task(str(path), "seg", 32)
  with open(tmp_path / "blank.csv", "w", newline="") as f:
    csv.writer(f).writerows([["image", "mask"], ["a.png", "a_m.png"], ["a.png", ""]])
  with pytest.raises(configlib.DataError, match=r"blank\.csv line 3: empty 'mask' cell"):
    tasks.manifest_task(str(tmp_path / "blank.csv"), "seg", 32)
  ids = (_ellipse() // 255).astype(np.uint8)
  ids[:5, :5] = 2  # class ids {0, 1, 2} read as a binary mask
  with pytest.raises(configlib.DataError, match=r"all below 64 but not just 0/1.*class_ids"):
    tasks.mask_classes(ids, "binary", ("background", "foreground"), "ids.png")


def test_class_id_masks_are_checked_against_the_declared_classes(tmp_path):
  ids = (_ellipse() // 255).astype(np.uint8)
  ids[:5, :5] = 2
  path = _seg_manifest(tmp_path, {"a": ids})
  data = tasks.manifest_task(
    str(path), "seg", 32, mask_mode="class_ids", classes="background,organ,lesion"
  )
  assert data.class_names == ("background", "organ", "lesion")
  assert set(np.unique(data.targets)) == {0, 1, 2}
  with pytest.raises(configlib.DataError, match=r"a_m\.png has class ids \[2\] outside 0\.\.1"):
    tasks.manifest_task(str(path), "seg", 32, mask_mode="class_ids", classes="background,organ")
  with pytest.raises(
    configlib.ConfigError, match="mask_mode='class_ids' needs config.data.classes"
  ):
    tasks.manifest_task(str(path), "seg", 32, mask_mode="class_ids")
  config = _config("finetune_seg.py")
  config.data.mask_mode = "ids"
  from ultrajax.jobs import finetune

  with pytest.raises(configlib.ConfigError, match="config.data.mask_mode='ids'"):
    finetune.validate(config)


# ----------------------------------------------------------------------------- labels
def _cls_manifest(root: pathlib.Path, labels, encoding="utf-8") -> pathlib.Path:
  (root / "img").mkdir(exist_ok=True)
  rows = []
  for i, label in enumerate(labels):
    Image.fromarray(np.full((8, 8), i, np.uint8)).save(root / "img" / f"{i}.png")
    rows.append([f"img/{i}.png", label, f"p{i}"])
  path = root / "labels.csv"
  text = io.StringIO()
  csv.writer(text).writerows([["image", "label", "group"], *rows])
  path.write_bytes(text.getvalue().encode(encoding))
  return path


def test_label_typo_is_an_error_and_inferred_classes_are_logged_with_counts(tmp_path, caplog):
  labels = ["benign", "malignant"] * 10 + ["maligant"]
  path = _cls_manifest(tmp_path, labels)
  with pytest.raises(
    configlib.DataError,
    match=r"labels \['maligant'\] \(first at line 22\) are "
    r"not among config.data.classes=\('benign', 'malignant'\)",
  ):
    tasks.manifest_task(str(path), "cls", 8, classes="benign,malignant")
  blank = _cls_manifest(tmp_path, ["benign", "", "malignant"])
  with pytest.raises(configlib.DataError, match=r"empty 'label' cell on 1 line\(s\), first line 3"):
    tasks.manifest_task(str(blank), "cls", 8)
  path = _cls_manifest(tmp_path, labels)
  data_config = _config("finetune_cls.py").data
  assert data_config.classes == ""  # real data: the labels found by default
  data_config.update(source="manifest", manifest=str(path))
  with caplog.at_level(logging.INFO):
    data = tasks.load_task(data_config, "cls", 8)
  assert data.class_names == ("benign", "maligant", "malignant")
  log = caplog.text
  assert "the labels found, sorted: 'benign' (10 images), 'maligant' (1 images)" in log
  counts = tasks.class_counts(data)
  assert counts.sum() == len(labels) and counts[1].sum() == 1
  for name, row in zip(data.class_names, counts):
    line = ", ".join(f"{s} {n}" for s, n in zip(tasks.SPLITS, row.tolist()))
    assert f"class {name!r}: {row.sum()} images ({line})" in log
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("'maligant' has a single image" in m for m in warned)
  assert any("'maligant' has no image in the" in m for m in warned)


def test_latin1_manifest_is_refused_naming_file_and_line(tmp_path):
  path = _cls_manifest(tmp_path, ["benign", "malignant", "Hôpital"], encoding="latin-1")
  with pytest.raises(configlib.DataError, match=r"labels\.csv line 4: byte b'\\xf4' is not UTF-8"):
    tasks.manifest_task(str(path), "cls", 8)


# ----------------------------------------------------------------------------- images and n_k
def test_undecodable_images_are_left_out_of_n_k_and_warned_once(tmp_path, caplog):
  site = tmp_path / "siteA"
  site.mkdir()
  for i in range(6):
    Image.fromarray(np.full((12, 12), 40 * i, np.uint8)).save(site / f"{i}.png")
  good = (site / "0.png").read_bytes()
  (site / "5.png").write_bytes(good[: len(good) // 2])  # truncated
  (site / "6.png").write_bytes(b"")  # zero bytes
  with caplog.at_level(logging.WARNING):
    (client,) = sources.folder_clients(tmp_path)
    data = pipeline.ClientBatches([client], 2, 8, seed=0, num_threads=1)
    for _ in range(6):  # two epochs of the 5 usable images
      next(data)
    data.close()
  assert len(client) == 5 and data.num_images.tolist() == [5]
  for name in ("5.png", "6.png"):
    assert sum(name in r.getMessage() and "left out" in r.getMessage() for r in caplog.records) == 1


# ----------------------------------------------------------------------------- weight files
def test_damaged_weight_files_name_the_file(tmp_path):
  pytest.importorskip("torch")
  files.save_state_dict(tmp_path / "ok.safetensors", {"a": np.zeros(4, np.float32)})
  files.save_state_dict(tmp_path / "ok.pth", {"a": np.zeros(4, np.float32)})
  for suffix in ("safetensors", "pth"):
    good = (tmp_path / f"ok.{suffix}").read_bytes()
    (tmp_path / f"cut.{suffix}").write_bytes(good[: len(good) // 2])
    (tmp_path / f"random.{suffix}").write_bytes(np.random.default_rng(0).bytes(600))
    for bad in ("cut", "random"):
      with pytest.raises(configlib.DataError, match=rf"{bad}\.{suffix}: ") as info:
        files.load_state_dict(tmp_path / f"{bad}.{suffix}")
      assert "Python objects" not in str(info.value)
  np.testing.assert_array_equal(files.load_state_dict(tmp_path / "ok.pth")["a"], np.zeros(4))
  (tmp_path / "a_file").write_text("")
  with pytest.raises(configlib.DataError, match=r"cannot write .*a_file/x\.safetensors") as info:
    files.save_state_dict(tmp_path / "a_file" / "x.safetensors", {"a": np.zeros(2, np.float32)})
  assert ".tmp" not in str(info.value)


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory):
  """(round folder holding a smoke MAE whose cls_token is NaN, its config)."""
  import orbax.checkpoint as ocp

  config = _config("pretrain_fed.py")
  model = nnx.eval_shape(lambda: mae.mae_from_config(config.model, nnx.Rngs(0)))
  params = jax.tree.map(
    lambda x: np.zeros(x.shape, x.dtype), nnx.to_pure_dict(nnx.state(model, nnx.Param))
  )
  params["encoder"]["cls_token"] = np.full_like(params["encoder"]["cls_token"], np.nan)
  folder = tmp_path_factory.mktemp("nan") / "3"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(folder / "params", params)
  return folder, config, model


def test_export_and_init_from_refuse_nonfinite_weights(nan_checkpoint, tmp_path):
  from ultrajax import export

  folder, config, model = nan_checkpoint
  with pytest.raises(
    configlib.DataError,
    match=r"non-finite weights .* 1 of 30 tensors, e\.g\. "
    r"\['cls_token'\]",
  ):
    export.export(folder, "timm", tmp_path / "x.safetensors", config=config)
  assert not (tmp_path / "x.safetensors").exists()
  with pytest.raises(configlib.DataError, match=r"tensor encoder/cls_token holds NaN"):
    load.load_init_params(folder, model)
  tensors = {
    "blocks.0.attn.qkv.weight": np.zeros((6, 2), np.float32),
    "norm.weight": np.array([1.0, np.inf], np.float32),
  }
  files.save_state_dict(tmp_path / "inf.safetensors", tensors)
  with pytest.raises(configlib.DataError, match=r"inf\.safetensors: tensor norm\.weight holds"):
    load.load_init_params(tmp_path / "inf.safetensors", model)


def test_finetune_encoder_from_nonfinite_checkpoint_and_damaged_meta_json(nan_checkpoint):
  import orbax.checkpoint as ocp

  from ultrajax import export

  folder, _, model = nan_checkpoint
  encoder = jax.tree.map(
    lambda x: np.zeros(x.shape, x.dtype), nnx.to_pure_dict(nnx.state(model.encoder, nnx.Param))
  )
  with pytest.raises(configlib.DataError, match=r"3: tensor cls_token holds NaN"):
    load.load_encoder(folder, encoder)
  meta = folder.parent / "meta_json" / "meta"
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
    ckptr.save(meta, {"config": "{}"})
  (meta / "metadata").write_text('{"config": "{\\"a\\": 1')  # cut off mid-string
  with pytest.raises(configlib.DataError, match=r"meta_json/meta: damaged JSON"):
    export.saved_config(meta.parent)


def test_init_from_a_checkpoint_of_another_width_is_a_user_error(nan_checkpoint):
  folder, config, _ = nan_checkpoint
  wider = config.model.copy_and_resolve_references()
  wider.update(width=128)
  model = nnx.eval_shape(lambda: mae.mae_from_config(wider, nnx.Rngs(0)))
  with pytest.raises(configlib.DataError, match=rf"{re.escape(str(folder))}.*\b128\b"):
    load.load_init_params(folder, model)


# ----------------------------------------------------------------------------- config and CLI
def test_main_reports_a_config_error_in_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  env.pop(configlib.VERBOSE_ENV, None)
  cls = "--config=configs/finetune_cls.py:smoke"
  for flags_, message in (
    ([cls, "--config.num_seeds=0"], "error: config.num_seeds=0 is outside [1, None]"),
    (
      [cls, "--config.num_seed=2"],
      ("error: a --config.* flag names no config field: 'num_seed' Did you mean \"num_seeds\""),
    ),
    (["--config=configs/finetune_clss.py"], "error: --config: Configuration is not available"),
  ):
    done = subprocess.run(
      [sys.executable, "-m", "ultrajax.main", *flags_, f"--workdir={tmp_path}/w"],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
    )
    assert done.returncode == 1 and message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
  assert not (tmp_path / "w").exists()  # refused before anything was written


def test_user_errors_show_their_traceback_only_when_verbose(monkeypatch, capsys):
  def main(argv):
    raise configlib.DataError("manifest x.csv line 3: bad")

  monkeypatch.delenv(configlib.VERBOSE_ENV, raising=False)
  with pytest.raises(SystemExit) as exit_info:
    configlib.report_user_errors(main)([])
  assert exit_info.value.code == 1
  assert capsys.readouterr().err.startswith("error: manifest x.csv line 3: bad  [DataError")
  with pytest.raises(configlib.DataError):
    configlib.report_user_errors(main, lambda: True)([])
  monkeypatch.setenv(configlib.VERBOSE_ENV, "1")
  with pytest.raises(configlib.DataError):
    configlib.report_user_errors(main)([])
  with pytest.raises(KeyError):  # a bug keeps its traceback
    configlib.report_user_errors(lambda argv: {}["x"])([])


def test_tuple_fields_are_overridden_from_the_command_line():
  argv = [
    "prog",
    f"--config={REPO / 'configs' / 'pretrain_fed.py'}:smoke",
    "--config.sharding_rules=(('.*kernel', 'fsdp'), ('.*', 'replicated'))",
  ]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
  values(argv)
  assert holder.value.sharding_rules == ((".*kernel", "fsdp"), (".*", "replicated"))
  # ml_collections cannot override lists: no preset of any config file may hold one.
  for path in sorted((REPO / "configs").glob("*.py")):
    config = configlib.load_config_module(path).get_config(None)
    leaves = [(k, v) for k, v in config.to_dict().items()]
    while leaves:
      key, value = leaves.pop()
      if isinstance(value, dict):
        leaves += [(f"{key}.{k}", v) for k, v in value.items()]
      assert not isinstance(value, list), f"{path.name}: config.{key} is a list"


# ----------------------------------------------------------------------------- texture, segment
def test_texture_scores_take_uint8_images_as_the_pipeline_makes_them():
  images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  np.testing.assert_allclose(
    np.asarray(ultramim.texture_scores(images, 8)),
    np.asarray(ultramim.texture_scores(images / 255.0, 8)),
    rtol=1e-5,
    atol=1e-3,
  )
  with pytest.raises(TypeError, match="int32"):
    ultramim.texture_scores(images.astype(np.int32), 8)


def test_segment_names_an_undecodable_image(tmp_path):
  from ultrajax import segment

  Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "ok.png")
  good = (tmp_path / "ok.png").read_bytes()
  (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
  with pytest.raises(configlib.DataError, match=r"cannot decode image .*cut\.png"):
    segment.read_image(tmp_path / "cut.png")
