"""Prepared TFDS datasets as ultrajax client sources (data.source='tfds').

`tfds.data_source` opens the array_record files for random access, so a TfdsSource is a Grain
RandomAccessDataSource like the folder and manifest sources and goes through the same pipeline.
Records: image uint8 [H, W] (grey) or [H, W, 3]; probe; path ('<name>/<split>/<file_name>');
patient_id; pixel_size_mm (str, '' when unknown, as manifest extras are); label (class name) and
lesion_mask uint8 [H, W] in {0, 1} where the dataset has them.
"""

from __future__ import annotations

import math
import os

import numpy as np

from ultrajax import configlib
from ultrajax.data import sources


def _open(name: str, data_dir: str, split: str):
  import tensorflow_datasets as tfds

  from ultrajax.data import tfds as us_tfds  # registers the builders

  root = os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)
  if not os.path.isdir(os.path.join(root, name)):
    raise configlib.DataError(
      f"config.data.tfds_name={name!r}: {os.path.join(root, name)} does not exist; prepare it "
      f"with python -m ultrajax.data.tfds --name={name} --manual_dir=... --data_dir={root} "
      f"(builders: {', '.join(sorted(us_tfds.BUILDERS))}; docs/datasets.md)"
    )
  try:
    return tfds.data_source(name, split=split, data_dir=root, download=False)
  except Exception as e:  # tfds raises several types for a dataset that is not prepared
    raise configlib.DataError(
      f"config.data.tfds_name={name!r}: cannot open split {split!r} in "
      f"{root}: {str(e).splitlines()[0]}"
    ) from e


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


class TfdsSource:
  """One prepared TFDS dataset split as a client named `name`; opened lazily in each process
  (the open array_record readers do not pickle into Grain workers)."""

  def __init__(self, name: str, data_dir: str = "", split: str = "train"):
    self.name, self.data_dir, self.split = name, data_dir, split
    self._source = _open(name, data_dir, split)
    self._length = len(self._source)
    if not self._length:
      raise configlib.DataError(f"TFDS dataset {name!r} split {split!r} is empty")
    self.probe = ""  # records carry their own probe; a common one would mean reading them all
    features = self._source.dataset_info.features
    self._classes = features["label"].names if "label" in features else None
    self.has_label, self.has_mask = "label" in features, "mask" in features

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_source"}

  def __setstate__(self, state):
    self.__dict__.update(state, _source=None)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, i: int) -> dict:
    i = sources.check_index(self, i)
    if self._source is None:
      self._source = _open(self.name, self.data_dir, self.split)
    ex = self._source[i]
    image = np.asarray(ex["image"], np.uint8)
    size = float(ex["pixel_size_mm"])
    record = {
      "image": image[..., 0] if image.shape[-1] == 1 else image,
      "probe": _text(ex["probe"]),
      "path": f"{self.name}/{self.split}/{_text(ex['file_name'])}",
      "patient_id": _text(ex["patient_id"]),
      "pixel_size_mm": "" if math.isnan(size) else repr(size),
    }
    if self._classes is not None:
      record["label"] = self._classes[int(ex["label"])]
    if "mask" in ex:
      record["lesion_mask"] = (np.asarray(ex["mask"])[..., 0] >= 128).astype(np.uint8)
    return record


def tfds_clients(names: str, data_dir: str = "", split: str = "train") -> list[TfdsSource]:
  """One client per name of the comma-separated `names` (config.data.tfds_name)."""
  listed = [n.strip() for n in names.split(",") if n.strip()]
  if not listed:
    raise configlib.ConfigError(f"config.data.tfds_name={names!r} names no dataset")
  return [TfdsSource(n, data_dir, split) for n in listed]


def tfds_task(
  name: str, data_dir: str, split: str, task_type: str, image_size: int, classes: str = ""
):
  """A prepared dataset as a downstream task (data/tasks.py TaskData) for fine-tuning: cls uses
  its labels (`classes` fixes their order, '' = the dataset's label names that occur, sorted),
  seg its masks (binary: background, foreground); groups are patient_id, so tasks.load_task splits
  by patient; spacing comes from pixel_size_mm where the dataset has it for every image."""
  from ultrajax.data import tasks

  client = TfdsSource(name, data_dir, split)
  where = f"TFDS dataset {name!r} split {split!r}"
  records = [client[i] for i in range(len(client))]
  if task_type == "cls" and "label" not in records[0]:
    raise configlib.ConfigError(
      f"{where} has no image labels; use it for task_type='seg' or pretraining"
    )
  if task_type == "seg" and "lesion_mask" not in records[0]:
    raise configlib.ConfigError(f"{where} has no masks; use it for task_type='cls' or pretraining")
  if task_type == "cls":
    class_names = tasks._class_names([r["label"] for r in records], classes, where)
    targets = [class_names.index(r["label"]) for r in records]
  else:
    class_names = tasks.seg_class_names(classes, "binary")
    targets = [tasks.resize_mask(r["lesion_mask"], image_size) for r in records]
  spacing = None
  if all(r["pixel_size_mm"] for r in records):
    spacing = [
      tasks.input_spacing(float(r["pixel_size_mm"]), r["image"].shape[:2], image_size)
      for r in records
    ]
  images = [tasks.resize_image(r["image"], image_size) for r in records]
  groups = [r["patient_id"] for r in records]
  return tasks.TaskData.from_lists(images, targets, groups, class_names, task_type, None, spacing)
