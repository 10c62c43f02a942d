"""BUSI: Breast Ultrasound Images (Al-Dhabyani et al., Data in Brief 28:104863, 2020)."""

from __future__ import annotations

import glob
import os
import re

from absl import logging

from ultrajax.data.tfds import base

_NAME = re.compile(r"^(?P<stem>(?P<label>benign|malignant|normal) \((?P<n>\d+)\))\.png$")


class Busi(base.UltrasoundBuilder):
  """780 breast B-mode images (600 women, Baheya Hospital, LOGIQ E9 with a linear probe) in
  benign / malignant / normal, each with one or more lesion masks (merged)."""

  name = "busi"
  ROOT = "Dataset_BUSI_with_GT"
  CHANNELS = 3
  CLASSES = ("benign", "malignant", "normal")
  HAS_MASK = True
  HOMEPAGE = "https://scholar.cu.edu.eg/?q=afahmy/pages/dataset"
  CITATION = (
    "Al-Dhabyani W, Gomaa M, Khaled H, Fahmy A. Dataset of breast ultrasound images. "
    "Data in Brief 28:104863, 2020."
  )
  MANUAL_DOWNLOAD_INSTRUCTIONS = """Download Dataset_BUSI_with_GT.zip from the homepage and
  unpack it into manual_dir: manual_dir/Dataset_BUSI_with_GT/{benign,malignant,normal}/
  "<label> (<n>).png" with "<label> (<n>)_mask.png" (and _mask_1.png, ... for further lesions)."""

  def _generate_examples(self, manual_dir, split):
    for label in self.CLASSES:
      for path in sorted(glob.glob(os.path.join(manual_dir, self.ROOT, label, "*.png"))):
        m = _NAME.match(os.path.basename(path))
        if not m:
          continue  # a mask, or a file that is not part of the set
        image = base.rgb(path)
        mask = base.binary_mask(path[:-4] + "_mask.png")
        for extra in sorted(glob.glob(glob.escape(path[:-4]) + "_mask_*.png")):
          more = base.binary_mask(extra)
          if more.shape != mask.shape:  # BUSI ships a few masks of other images' sizes
            logging.warning(
              "busi: %s is %s, not the image's %s; left out", extra, more.shape, mask.shape
            )
            continue
          mask |= more
        if mask.shape != image.shape[:2]:
          raise ValueError(f"busi: mask of {path} is {mask.shape}, the image {image.shape[:2]}")
        key = f"{label}_{m['n']}"
        # BUSI gives no patient ids: each image is its own patient (it has known near-duplicates).
        yield (
          key,
          base.example(
            manual_dir, path, image, mask=mask, label=label, patient_id=key, probe="linear"
          ),
        )
