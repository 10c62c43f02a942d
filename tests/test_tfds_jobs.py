"""Prepared TFDS datasets in the transfer study (datasets as organs) and the SAM job (instances
from masks), on tiny datasets built from the dummy layouts of test_tfds_builders.py."""

import pathlib

import numpy as np
import pytest
from scipy import ndimage

pytest.importorskip(
  "tensorflow_datasets", reason="tensorflow_datasets is not installed (pip install '.[tfds]')"
)
pytest.importorskip("tensorflow", reason="TFDS builds need TensorFlow (pip install '.[tfds]')")

from test_tfds_builders import LAYOUTS  # the dummy published layouts

from ultrajax import configlib
from ultrajax.data import clients as clients_lib, instances, tasks, tfds as us_tfds
from ultrajax.data.tfds import source
from ultrajax.jobs import sam, transfer_study

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """{name: expected records}, data_dir: BUSI (labels + masks), HC18 (masks), FETAL_PLANES_DB
  (labels) built from their dummy layouts."""
  root = tmp_path_factory.mktemp("tfds_jobs")
  rng = np.random.default_rng(0)
  expected = {}
  for name in ("busi", "hc18", "fetal_planes_db"):
    expected[name] = LAYOUTS[name](str(root / "manual" / name), rng)
    us_tfds.build(name, str(root / "manual" / name), str(root / "data"))
  return expected, str(root / "data")


def _components(mask):
  """scipy's 8-connected components of mask > 0: {(row slice, col slice): area}."""
  labels, _ = ndimage.label(mask > 0, structure=np.ones((3, 3)))
  return {
    (s[0].start, s[0].stop, s[1].start, s[1].stop): int(np.sum(labels == k + 1))
    for k, s in enumerate(ndimage.find_objects(labels))
  }


def _boxes_and_areas(masks):
  """Each instance mask's (row0, row1, col0, col1) box (ends exclusive) and area, by hand."""
  out = {}
  for m in masks:
    rows, cols = np.nonzero(m)
    out[(rows.min(), rows.max() + 1, cols.min(), cols.max() + 1)] = int(m.sum())
  return out


def test_mask_instances_are_components_or_class_ids():
  rng = np.random.default_rng(3)
  mask = (ndimage.gaussian_filter(rng.random((40, 48)), 2) > 0.53).astype(np.uint8) * 255
  mask[0, 0] = mask[1, 1] = 255  # touching diagonally: one component under 8-connectivity
  masks, cats = instances.mask_instances(mask)
  assert len(masks) >= 3 and np.all(cats == 1) and masks.dtype == np.uint8
  assert _boxes_and_areas(masks) == _components(mask)
  np.testing.assert_array_equal(masks.sum(0), mask > 0)  # a partition of the foreground
  ids = np.zeros((6, 7), np.uint8)
  ids[1:3, 1:3], ids[4:6, 0:7], ids[0, 6] = 5, 2, 5  # class 5 in two pieces is one instance
  masks, cats = instances.mask_instances(ids, "class_ids")
  assert cats.tolist() == [2, 5]
  for m, c in zip(masks, cats):
    np.testing.assert_array_equal(m, ids == c)
  empty, cats = instances.mask_instances(np.zeros((5, 4), np.uint8))
  assert empty.shape == (0, 5, 4) and cats.shape == (0,)
  with pytest.raises(instances.InstanceDataError, match="'rgb'"):
    instances.mask_instances(ids, "rgb")


def _sam_config(data_dir):
  config = configlib.load_config_module(REPO / "configs" / "sam_ultrasound.py").get_config("smoke")
  config.data.update(
    source="tfds", tfds_name="busi", tfds_data_dir=data_dir, tfds_test_fraction=0.34
  )
  config.classification.category = "busi"
  return config


def test_sam_instances_from_tfds_masks(built):
  """BUSI: the benign image's two lesions are two instances, the normal image's empty mask none;
  boxes and areas are scipy's components of the stored mask; train / test split by patient."""
  expected, data_dir = built
  config = _sam_config(data_dir)
  sam.validate(config)
  train, test = sam.instance_sources(config, "sam", (1, 1))
  assert len(train) + len(test) == len(expected["busi"]) and len(test) >= 1
  patients = [{train.client[i]["patient_id"] for i in s.indices} for s in (train, test)]
  assert not patients[0] & patients[1]
  client = source.TfdsSource("busi", data_dir)
  counts = {}
  for split in (train, test):
    for i in range(len(split)):
      record = split[i]
      stored = client[split.indices[i]]
      label = stored["label"]
      counts[label] = len(record["masks"])
      assert _boxes_and_areas(record["masks"]) == _components(stored["lesion_mask"])
      cls = ("benign", "malignant", "normal").index(label) + 1  # sorted labels, from 1
      assert record["classes"].tolist() == [cls] * len(record["masks"])
  assert counts == {"benign": 2, "malignant": 1, "normal": 0}
  # Through the job's datasets(): images without instances (normal) are skipped.
  train_set, test_set = sam.datasets(config)
  assert train_set.skipped_images + test_set.skipped_images == 1
  assert train.categories == ({"id": 1, "name": "busi"},)
  config.data.tfds_name = "busi,hc18"
  with pytest.raises(configlib.ConfigError, match="config.data.tfds_name"):
    sam.validate(config)
  config.data.update(tfds_name="busi", tfds_test_fraction=1.0)
  with pytest.raises(configlib.ConfigError, match="config.data.tfds_test_fraction"):
    sam.validate(config)
  config.data.update(tfds_name="fetal_planes_db", tfds_test_fraction=0.5)
  with pytest.raises(configlib.ConfigError, match="tfds_name='fetal_planes_db' has no masks"):
    sam.validate(config)
  config.data.tfds_name = "busi"
  config.classification.update(enabled=True, category="lesion")
  with pytest.raises(configlib.ConfigError, match="config.classification.category='lesion'"):
    sam.validate(config)


def _transfer_config(data_dir, organs, finetune="finetune_seg"):
  config = configlib.load_config_module(REPO / "configs" / "transfer_study.py").get_config("smoke")
  config.data.update(source="tfds", tfds_data_dir=data_dir)
  config.organs = organs
  config.finetune_config = f"configs/{finetune}.py:smoke"
  return config


def test_transfer_study_organs_from_tfds(built):
  """Each dataset is one organ: its images the only pretraining client, its masks (seg) or
  labels (cls) the downstream task, split by patient."""
  expected, data_dir = built
  config = _transfer_config(data_dir, "busi, hc18")
  transfer_study.validate(config)
  assert transfer_study.organs(config) == ["busi", "hc18"]
  for organ in ("busi", "hc18"):
    pc = transfer_study.pretrain_config(config, organ)
    pc.ultramim.smat = False  # (SMAT partners would add records)
    clients = clients_lib.client_sources(pc)  # (central pretraining pools its one client)
    assert [s.name for c in clients for s in c.sources] == [organ]
    assert len(clients[0]) == len(expected[organ])
    want = source.TfdsSource(organ, data_dir)
    for i in range(len(want)):
      np.testing.assert_array_equal(clients[0][i]["image"], want[i]["image"])
    fc = transfer_study.finetune_config(config, organ, [("scratch", "")])
    assert (fc.data.source, fc.data.tfds_name, fc.data.tfds_data_dir) == ("tfds", organ, data_dir)
  # BUSI's task (3 patients: one per split) is its masks, then, with finetune_cls, its labels.
  for finetune, task_type in (("finetune_seg", "seg"), ("finetune_cls", "cls")):
    config = _transfer_config(data_dir, "busi", finetune)
    transfer_study.validate(config)
    fc = transfer_study.finetune_config(config, "busi", [])
    assert fc.task_type == task_type
    data = tasks.load_task(fc.data, fc.task_type, 16)
    want = source.tfds_task("busi", data_dir, "train", task_type, 16)
    order, want_order = np.argsort(data.groups), np.argsort(want.groups)
    np.testing.assert_array_equal(data.images[order], want.images[want_order])
    np.testing.assert_array_equal(data.targets[order], want.targets[want_order])
    assert sorted(data.splits) == ["test", "train", "val"]  # by patient: one image each


def test_transfer_study_tfds_fields_are_checked(built, monkeypatch):
  data_dir = built[1]
  with pytest.raises(configlib.ConfigError, match="'hc18', which has no labels"):
    transfer_study.validate(_transfer_config(data_dir, "busi,hc18", "finetune_cls"))
  with pytest.raises(configlib.ConfigError, match="'fetal_planes_db', which has no masks"):
    transfer_study.validate(_transfer_config(data_dir, "fetal_planes_db"))
  with pytest.raises(configlib.ConfigError, match="config.organs has 'camus'"):
    transfer_study.validate(_transfer_config(data_dir, "busi,camus"))
  with pytest.raises(configlib.ConfigError, match="config.organs"):
    transfer_study.validate(_transfer_config(data_dir, " , "))
  config = _transfer_config(data_dir, "busi")
  config.data.source = "coco"
  with pytest.raises(configlib.ConfigError, match="config.data.source"):
    transfer_study.validate(config)

  class Unlabelled:  # a dataset with images only
    has_label = has_mask = False

    def __init__(self, *args):
      pass

  monkeypatch.setattr(source, "TfdsSource", Unlabelled)
  with pytest.raises(configlib.ConfigError, match="'busi', a TFDS dataset with neither labels"):
    transfer_study.validate(_transfer_config(data_dir, "busi"))
