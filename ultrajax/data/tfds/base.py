"""The parts every ultrasound TFDS builder shares: features, manual_dir checks, reading files.

A builder reads one public dataset exactly as its publishers distribute it, from `manual_dir`
(`tfds build ... --manual_dir=DIR`), and writes the features below. Records are only ever in the
publishers' own splits ('train', plus 'test' where they publish one with labels); ultrajax splits
by `patient_id` when it reads them (ultrajax/data/tfds/source.py, data/tasks.py).

Features (all builders):
  image         uint8 [H, W, C] PNG, C = CHANNELS (1 for grey sets, 3 where published in colour)
  patient_id    str: the patient / subject / exam, as precise as the publishers make it
  pixel_size_mm float32: mm per pixel (square pixels); NaN where the publishers give none
  probe         str: 'linear' | 'convex' | '' (unknown or mixed)
  file_name     str: the image's path relative to manual_dir
and, where the dataset has them: mask uint8 [H, W, 1] in {0, 255}; label (ClassLabel of CLASSES).
"""

from __future__ import annotations

import abc
import csv
import os
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

NAN = float("nan")


class UltrasoundBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the ultrasound builders. Subclasses set the class attributes and `_generate_examples`;
  their docstring is the dataset's description."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict] = {"1.0.0": "First release."}
  CHANNELS = 1  # image channels as published
  CLASSES: tuple[str, ...] = ()  # label names; () when the set has no image-level label
  HAS_MASK = False
  ROOT = ""  # the folder the publishers' archive unpacks to, checked in manual_dir
  CITATION = ""
  HOMEPAGE = ""
  EXTRA_FEATURES: ClassVar[dict] = {}  # more features, name -> tfds feature

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
      "image": tfds.features.Image(shape=(None, None, self.CHANNELS), dtype=np.uint8),
      "patient_id": tfds.features.Text(),
      "pixel_size_mm": tfds.features.Scalar(np.float32),
      "probe": tfds.features.Text(),
      "file_name": tfds.features.Text(),
      **self.EXTRA_FEATURES,
    }
    if self.HAS_MASK:
      features["mask"] = tfds.features.Image(shape=(None, None, 1), dtype=np.uint8)
    if self.CLASSES:
      features["label"] = tfds.features.ClassLabel(names=list(self.CLASSES))
    return self.dataset_info_from_configs(
      description=self.__doc__,
      features=tfds.features.FeaturesDict(features),
      homepage=self.HOMEPAGE,
      citation=self.CITATION,
    )

  SPLITS = ("train",)  # the publishers' splits

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    if not os.path.isdir(os.path.join(manual_dir, self.ROOT)):
      raise FileNotFoundError(
        f"{self.name}: {os.path.join(manual_dir, self.ROOT)} does not exist; unpack the dataset "
        f"into the manual_dir so that it holds {self.ROOT}/ (see MANUAL_DOWNLOAD_INSTRUCTIONS)"
      )
    return {split: self._generate_examples(manual_dir, split) for split in self.SPLITS}

  @abc.abstractmethod
  def _generate_examples(self, manual_dir: str, split: str):
    """Yields (key, example) of `split` read from `manual_dir`."""


def example(
  manual_dir: str, path: str, image, *, patient_id: str, probe: str, mask=None, **features
) -> dict:
  """One record's features: image uint8 [H, W, C]; mask bool [H, W] (None: a set without masks);
  file_name: `path` relative to manual_dir; pixel_size_mm NaN unless given in `features` (the
  label and the set's own features)."""
  record = dict(image=image, patient_id=patient_id, probe=probe, pixel_size_mm=NAN)
  if mask is not None:
    record["mask"] = np.where(mask, 255, 0).astype(np.uint8)[..., None]  # [H, W, 1] in {0, 255}
  return dict(record, **features, file_name=os.path.relpath(path, manual_dir))


def grey(path: str) -> np.ndarray:
  """uint8 [H, W, 1] of an image file (colour averaged by PIL's 'L' conversion)."""
  with Image.open(path) as img:
    return np.asarray(img.convert("L"), np.uint8)[..., None]


def rgb(path: str) -> np.ndarray:
  """uint8 [H, W, 3] of an image file (grey replicated, alpha dropped)."""
  with Image.open(path) as img:
    return np.asarray(img.convert("RGB"), np.uint8)


def binary_mask(path: str) -> np.ndarray:
  """bool [H, W]: a published mask (any mode, colour: the channel maximum) thresholded at 128."""
  with Image.open(path) as img:
    values = np.asarray(img.convert("RGB") if img.mode not in ("1", "L") else img.convert("L"))
  return (values.max(-1) if values.ndim == 3 else values) >= 128


def read_csv(path: str) -> list[dict]:
  """Rows of a publisher's CSV (',' or ';' separated, BOM and padded header names stripped)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist (it is part of the published dataset)")
  with open(path, newline="", encoding="utf-8-sig") as f:
    text = f.read()
  delimiter = ";" if text.split("\n", 1)[0].count(";") > text.split("\n", 1)[0].count(",") else ","
  rows = list(csv.DictReader(text.splitlines(), delimiter=delimiter))
  return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in rows]


def column(row: dict, name: str, where: str) -> str:
  """row[name]; KeyError naming `where` and the columns found when `row` has no `name`."""
  if name not in row:
    raise KeyError(f"{where} has no column {name!r}; it has {sorted(row)}")
  return row[name]
