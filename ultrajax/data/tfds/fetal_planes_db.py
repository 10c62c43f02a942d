"""FETAL_PLANES_DB: common maternal-fetal planes (Burgos-Artizzu et al., Sci Rep 10:10200, 2020)."""

from __future__ import annotations

import os
from typing import ClassVar

from ultrajax.data.tfds import base


class FetalPlanesDb(base.UltrasoundBuilder):
  """12,400 maternal-fetal screening images of 1,792 patients (two Barcelona hospitals, several
  operators and machines) in six plane classes, with the authors' train/test split."""

  name = "fetal_planes_db"
  ROOT = "Images"
  CLASSES = (
    "Fetal abdomen",
    "Fetal brain",
    "Fetal femur",
    "Fetal thorax",
    "Maternal cervix",
    "Other",
  )
  SPLITS = ("train", "test")
  EXTRA_FEATURES: ClassVar[dict] = {
    "brain_plane": base.tfds.features.Text(),
    "us_machine": base.tfds.features.Text(),
    "operator": base.tfds.features.Text(),
  }
  HOMEPAGE = "https://zenodo.org/records/3904280"
  CITATION = (
    "Burgos-Artizzu XP, Coronado-Gutierrez D, Valenzuela-Alcaraz B, et al. Evaluation of "
    "deep convolutional neural networks for automatic classification of common maternal "
    "fetal ultrasound planes. Sci Rep 10:10200, 2020."
  )
  MANUAL_DOWNLOAD_INSTRUCTIONS = """Download FETAL_PLANES_ZENODO.zip from the homepage and unpack
  it into manual_dir: manual_dir/FETAL_PLANES_DB_data.csv (';'-separated: Image_name, Patient_num,
  Plane, Brain_plane, Operator, US_Machine, Train) and manual_dir/Images/<Image_name>.png."""

  def _generate_examples(self, manual_dir, split):
    csv_path = os.path.join(manual_dir, "FETAL_PLANES_DB_data.csv")
    for n, row in enumerate(base.read_csv(csv_path), start=2):
      where = f"{csv_path} line {n}"
      if (base.column(row, "Train", where) == "1") != (split == "train"):
        continue
      name = base.column(row, "Image_name", where)
      plane = base.column(row, "Plane", where)
      if plane not in self.CLASSES:
        raise ValueError(f"{where}: Plane {plane!r} is not one of {self.CLASSES}")
      path = os.path.join(manual_dir, self.ROOT, name + ".png")
      yield (
        name,
        base.example(
          manual_dir,
          path,
          base.grey(path),
          label=plane,
          patient_id=base.column(row, "Patient_num", where),
          probe="",  # transabdominal and transvaginal probes
          brain_plane=base.column(row, "Brain_plane", where),
          us_machine=base.column(row, "US_Machine", where),
          operator=base.column(row, "Operator", where),
        ),
      )
