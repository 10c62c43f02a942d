"""HC18: fetal head circumference challenge (van den Heuvel et al., PLoS ONE 13:e0200412, 2018)."""

from __future__ import annotations

import os
import re
from typing import ClassVar

import numpy as np
from scipy import ndimage
from skimage import draw, measure

from ultrajax.data.tfds import base

_SUBJECT = re.compile(r"^(\d+)_")


def fill_ellipse(outline: np.ndarray) -> np.ndarray:
  """bool [H, W]: the head region of an HC18 annotation, a 1-pixel ellipse outline.

  A closed outline is filled; one cut by the image border (nothing enclosed) is replaced by the
  least-squares ellipse through its pixels, rasterised inside the image. Already filled
  annotations (some re-hosts ship them) come back unchanged.
  """
  outline = outline.astype(bool)
  filled = ndimage.binary_fill_holes(outline)
  if filled.sum() > outline.sum() or ndimage.binary_erosion(outline).any():
    return filled
  rows, cols = np.nonzero(outline)
  model = measure.EllipseModel.from_estimate(np.stack([cols, rows], 1).astype(float))
  if len(rows) < 5 or not model:
    raise ValueError(f"cannot fit an ellipse to an outline of {len(rows)} pixels")
  (xc, yc), (a, b) = model.center, model.axis_lengths
  rr, cc = draw.ellipse(yc, xc, b, a, shape=outline.shape, rotation=-model.theta)
  region = np.zeros_like(outline)
  region[rr, cc] = True
  return region | outline


class Hc18(base.UltrasoundBuilder):
  """999 annotated 2-D fetal-head standard planes (551 pregnant women, Radboud UMC, Voluson E8 /
  730 with curved probes) with the skull ellipse, pixel size and head circumference."""

  name = "hc18"
  ROOT = "training_set"
  HAS_MASK = True
  EXTRA_FEATURES: ClassVar[dict] = {"head_circumference_mm": base.tfds.features.Scalar(np.float32)}
  HOMEPAGE = "https://hc18.grand-challenge.org/"
  CITATION = (
    "van den Heuvel TLA, de Bruijn D, de Korte CL, van Ginneken B. Automated measurement "
    "of fetal head circumference using 2D ultrasound images. PLoS ONE 13(8):e0200412, "
    "2018. doi:10.5281/zenodo.1327317"
  )
  MANUAL_DOWNLOAD_INSTRUCTIONS = """Download training_set.zip and
  training_set_pixel_size_and_HC.csv from https://zenodo.org/records/1327317 into manual_dir:
  manual_dir/training_set/<n>_HC.png + <n>_HC_Annotation.png and
  manual_dir/training_set_pixel_size_and_HC.csv. (The test set has no annotations.)"""

  def _generate_examples(self, manual_dir, split):
    csv_path = os.path.join(manual_dir, "training_set_pixel_size_and_HC.csv")
    for n, row in enumerate(base.read_csv(csv_path), start=2):
      where = f"{csv_path} line {n}"
      name = base.column(row, "filename", where)
      path = os.path.join(manual_dir, self.ROOT, name)
      outline = base.binary_mask(path[:-4] + "_Annotation.png")
      subject = _SUBJECT.match(name)
      if not subject:
        raise ValueError(f"{where}: file name {name!r} does not start with a subject number")
      yield (
        name[:-4],
        base.example(
          manual_dir,
          path,
          base.grey(path),
          mask=fill_ellipse(outline),
          # 010_HC.png and 010_2HC.png are two planes of one pregnancy.
          patient_id=str(int(subject[1])),
          pixel_size_mm=float(base.column(row, "pixel size(mm)", where)),
          head_circumference_mm=float(base.column(row, "head circumference (mm)", where)),
          probe="convex",
        ),
      )
