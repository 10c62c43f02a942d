"""MMOTU: Multi-Modality Ovarian Tumor Ultrasound, 2-D part OTU_2d (Zhao et al., arXiv 2207.06799,
2022)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from ultrajax.data.tfds import base


def tumour_mask(path: str) -> np.ndarray:
  """bool [H, W]: foreground (any non-black pixel) of an OTU_2d annotation, binary or coloured."""
  with Image.open(path) as img:
    return np.asarray(img.convert("RGB")).max(-1) > 0


def read_list(path: str) -> list[tuple[str, int]]:
  """(image stem, class id) of the whitespace-separated 'name label' lines of a *_cls.txt."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist (it is part of the published dataset)")
  rows = []
  with open(path) as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      parts = line.split()
      if len(parts) != 2 or not parts[1].isdigit():
        raise ValueError(f"{path} line {n}: expected 'name label', got {line.strip()!r}")
      rows.append((os.path.splitext(parts[0])[0], int(parts[1])))
  return rows


class Mmotu(base.UltrasoundBuilder):
  """1,469 2-D ovarian tumour ultrasound images (Beijing Shijitan Hospital) with tumour masks and
  one of 8 tumour classes, in the authors' train (train_cls.txt) / val (val_cls.txt) split."""

  name = "mmotu"
  ROOT = "OTU_2d"
  CHANNELS = 3
  # Class ids 0..7 of the *_cls.txt files, in the order of the MMOTU paper / repository.
  CLASSES = (
    "chocolate_cyst",
    "serous_cystadenoma",
    "teratoma",
    "theca_cell_tumor",
    "simple_cyst",
    "normal_ovary",
    "mucinous_cystadenoma",
    "high_grade_serous_cystadenocarcinoma",
  )
  HAS_MASK = True
  SPLITS = ("train", "validation")
  HOMEPAGE = "https://github.com/cv516Buaa/MMOTU_DS2Net"
  CITATION = (
    "Zhao Q, Lyu S, Bai W, et al. MMOTU: a multi-modality ovarian tumor ultrasound image "
    "dataset for unsupervised cross-domain semantic segmentation. arXiv:2207.06799, 2022."
  )
  MANUAL_DOWNLOAD_INSTRUCTIONS = """Download MMOTU from the homepage's link and point manual_dir
  at the folder holding OTU_2d/: OTU_2d/images/<n>.JPG, OTU_2d/annotations/<n>_binary.PNG (or the
  coloured <n>.PNG), OTU_2d/train_cls.txt and OTU_2d/val_cls.txt."""

  def _generate_examples(self, manual_dir, split):
    folder = os.path.join(manual_dir, self.ROOT)
    listing = os.path.join(folder, "train_cls.txt" if split == "train" else "val_cls.txt")
    for stem, class_id in read_list(listing):
      if class_id >= len(self.CLASSES):
        raise ValueError(
          f"{listing}: {stem} has class {class_id}; MMOTU has 0..{len(self.CLASSES) - 1}"
        )
      path = os.path.join(folder, "images", stem + ".JPG")
      binary = os.path.join(folder, "annotations", stem + "_binary.PNG")
      mask = tumour_mask(
        binary if os.path.isfile(binary) else os.path.join(folder, "annotations", stem + ".PNG")
      )
      image = base.rgb(path)
      if mask.shape != image.shape[:2]:
        raise ValueError(f"mmotu: the mask of {path} is {mask.shape}, the image {image.shape[:2]}")
      # No patient ids are published: each image is its own patient.
      label = self.CLASSES[class_id]
      yield (
        stem,
        base.example(manual_dir, path, image, mask=mask, label=label, patient_id=stem, probe=""),
      )
