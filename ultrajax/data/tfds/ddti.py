"""DDTI: Digital Database of Thyroid Images (Pedraza et al., SPIE 9287, 2015)."""

from __future__ import annotations

import glob
import json
import os
import re
from typing import ClassVar
from xml.etree import ElementTree

import numpy as np
from skimage import draw

from ultrajax.data.tfds import base

_IMAGE = re.compile(r"^(\d+)_(\d+)\.jpg$")


def polygons_mask(svg: str, shape, where: str) -> np.ndarray:
  """bool [H, W]: the union of a DDTI mark's polygons, JSON [{"points": [{"x", "y"}, ...]}, ...]."""
  mask = np.zeros(shape, bool)
  try:
    regions = json.loads(svg) if svg and svg.strip() else []
    for region in regions:
      xs = [float(p["x"]) for p in region["points"]]
      ys = [float(p["y"]) for p in region["points"]]
      mask[draw.polygon(ys, xs, shape=shape)] = True
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{where}: the <svg> polygons cannot be read: {e}") from e
  return mask


class Ddti(base.UltrasoundBuilder):
  """Thyroid B-mode images (IDIME, Bogota) with nodule outlines, TI-RADS and findings, one XML
  file per case."""

  name = "ddti"
  HAS_MASK = True
  EXTRA_FEATURES: ClassVar[dict] = {
    k: base.tfds.features.Text()
    for k in ("tirads", "composition", "echogenicity", "margins", "calcifications", "age", "sex")
  }
  HOMEPAGE = "http://cimalab.unal.edu.co/?lang=en&mod=program&id=5"
  CITATION = (
    "Pedraza L, Vargas C, Narvaez F, Duran O, Munoz E, Romero E. An open access thyroid "
    "ultrasound image database. Proc. SPIE 9287, 10th International Symposium on Medical "
    "Information Processing and Analysis, 92870W, 2015."
  )
  MANUAL_DOWNLOAD_INSTRUCTIONS = """Download the DDTI archive from the homepage and unpack it
  into manual_dir: manual_dir/<case>.xml (number, age, sex, composition, echogenicity, margins,
  calcifications, tirads and one <mark> per image: <image>k</image><svg>polygons</svg>) next
  to manual_dir/<case>_<k>.jpg."""

  def _generate_examples(self, manual_dir, split):
    for path in sorted(glob.glob(os.path.join(manual_dir, "*.jpg"))):
      m = _IMAGE.match(os.path.basename(path))
      if not m:
        continue
      xml_path = os.path.join(manual_dir, m[1] + ".xml")
      root = ElementTree.parse(xml_path).getroot()
      image = base.grey(path)
      marks = [k for k in root.findall("mark") if (k.findtext("image") or "").strip() == m[2]]
      if not marks:
        raise ValueError(f"{xml_path} has no <mark> for image {m[2]} ({path})")
      mask = np.zeros(image.shape[:2], bool)
      for mark in marks:
        mask |= polygons_mask(mark.findtext("svg"), image.shape[:2], xml_path)
      yield (
        f"{m[1]}_{m[2]}",
        base.example(
          manual_dir,
          path,
          image,
          mask=mask,
          patient_id=str(int(m[1])),
          probe="linear",
          **{k: (root.findtext(k) or "").strip() for k in self.EXTRA_FEATURES},
        ),
      )
