"""BUS-BRA: breast ultrasound with BI-RADS (Gomez-Flores et al., Medical Physics 51:3110, 2024)."""

from __future__ import annotations

import os
import re
from typing import ClassVar

from ultrajax.data.tfds import base

_ID = re.compile(r"^bus_(\d+)-[a-z]+$")


class BusBra(base.UltrasoundBuilder):
  """1,875 breast B-mode images of 1,064 women (National Cancer Institute, Rio de Janeiro; four
  scanners) with biopsy-proven pathology, BI-RADS 2-5 and lesion masks."""

  name = "bus_bra"
  ROOT = "Images"
  CLASSES = ("benign", "malignant")
  HAS_MASK = True
  EXTRA_FEATURES: ClassVar[dict] = {
    "birads": base.tfds.features.Text(),
    "device": base.tfds.features.Text(),
  }
  HOMEPAGE = "https://doi.org/10.5281/zenodo.7730709"
  CITATION = (
    "Gomez-Flores W, Gregorio-Calas MJ, Coelho de Albuquerque Pereira W. BUS-BRA: a "
    "breast ultrasound dataset for assessing computer-aided diagnosis systems. Medical "
    "Physics 51(4):3110-3123, 2024."
  )
  MANUAL_DOWNLOAD_INSTRUCTIONS = """Download BUS-BRA from Zenodo and unpack it into manual_dir:
  manual_dir/bus_data.csv (ID e.g. bus_0001-l, Pathology, BIRADS, Device, ...),
  manual_dir/Images/<ID>.png and manual_dir/Masks/mask_<n>-<side>.png."""

  def _generate_examples(self, manual_dir, split):
    csv_path = os.path.join(manual_dir, "bus_data.csv")
    for n, row in enumerate(base.read_csv(csv_path), start=2):
      where = f"{csv_path} line {n}"
      key = base.column(row, "ID", where)
      patient = _ID.match(key)
      if not patient:
        raise ValueError(f"{where}: ID {key!r} is not bus_<patient>-<view>")
      path = os.path.join(manual_dir, self.ROOT, key + ".png")
      mask = base.binary_mask(os.path.join(manual_dir, "Masks", "mask" + key[3:] + ".png"))
      yield (
        key,
        base.example(
          manual_dir,
          path,
          base.grey(path),
          mask=mask,
          label=base.column(row, "Pathology", where).lower(),
          patient_id=str(int(patient[1])),
          probe="linear",
          birads=base.column(row, "BIRADS", where),
          device=base.column(row, "Device", where),
        ),
      )
