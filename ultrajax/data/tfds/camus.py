"""CAMUS: 2-D echocardiography (Leclerc et al., IEEE TMI 38(9):2198-2210, 2019)."""

from __future__ import annotations

import glob
import os
import zlib
from typing import ClassVar

import numpy as np

from ultrajax.data.tfds import base

# MetaImage ElementType -> numpy dtype (little endian unless BinaryDataByteOrderMSB).
_TYPES = {
  "MET_UCHAR": "u1",
  "MET_CHAR": "i1",
  "MET_USHORT": "u2",
  "MET_SHORT": "i2",
  "MET_UINT": "u4",
  "MET_INT": "i4",
  "MET_FLOAT": "f4",
  "MET_DOUBLE": "f8",
}


def read_mhd(path: str) -> tuple[np.ndarray, tuple[float, ...]]:
  """A MetaImage (.mhd header + ElementDataFile) as (array [..., Y, X] with axes in reverse
  DimSize order, ElementSpacing in DimSize order (x, y, ...))."""
  header = {}
  with open(path, encoding="latin-1") as f:
    for line in f:
      if "=" in line:
        key, value = line.split("=", 1)
        header[key.strip()] = value.strip()
  for key in ("NDims", "DimSize", "ElementType", "ElementDataFile"):
    if key not in header:
      raise ValueError(f"{path}: MetaImage header has no {key}")
  if header["ElementType"] not in _TYPES:
    raise ValueError(f"{path}: ElementType {header['ElementType']} is not one of {sorted(_TYPES)}")
  if header["ElementDataFile"] == "LOCAL":
    raise ValueError(f"{path}: ElementDataFile LOCAL (data inside the header) is not supported")
  dims = [int(v) for v in header["DimSize"].split()]
  spacing = tuple(
    float(v) for v in header.get("ElementSpacing", " ".join(["1"] * len(dims))).split()
  )
  order = ">" if header.get("BinaryDataByteOrderMSB", "False").lower() == "true" else "<"
  with open(os.path.join(os.path.dirname(path), header["ElementDataFile"]), "rb") as f:
    data = f.read()
  if header.get("CompressedData", "False").lower() == "true":
    data = zlib.decompress(data)
  values = np.frombuffer(data, order + _TYPES[header["ElementType"]])
  if values.size != np.prod(dims):
    raise ValueError(
      f"{path}: {header['ElementDataFile']} holds {values.size} values, DimSize "
      f"{dims} needs {np.prod(dims)}"
    )
  return values.reshape(dims[::-1]), spacing  # x varies fastest in the file


def _cfg(path: str) -> dict:
  """'Key: value' lines of an Info_<view>.cfg."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist (it is part of the published dataset)")
  with open(path) as f:
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}


def _frame(path: str) -> tuple[np.ndarray, tuple[float, ...]]:
  """[H, W] of a one-frame MetaImage (2-D, or 3-D with one slice) and its spacing."""
  array, spacing = read_mhd(path)
  if array.ndim == 3 and array.shape[0] == 1:
    array = array[0]
  if array.ndim != 2:
    raise ValueError(f"{path}: expected one 2-D frame, got an array of shape {array.shape}")
  return array, spacing


class Camus(base.UltrasoundBuilder):
  """2-D apical two- and four-chamber echocardiograms of 500 patients (Saint-Etienne University
  Hospital, GE Vivid E95), the end-diastole and end-systole frames of each view, with the
  experts' masks of the LV endocardium (1), LV myocardium (2) and left atrium (3)."""

  name = "camus"
  ROOT = "training"
  HAS_MASK = True
  VIEWS = ("2CH", "4CH")
  PHASES = ("ED", "ES")
  EXTRA_FEATURES: ClassVar[dict] = {
    # uint8 class ids 0..3 (`mask` is the LV cavity, class 1, as {0, 255}).
    "structures": base.tfds.features.Image(shape=(None, None, 1), dtype=np.uint8),
    "pixel_spacing_mm": base.tfds.features.Tensor(shape=(2,), dtype=np.float32),  # row, col
    "view": base.tfds.features.Text(),
    "phase": base.tfds.features.Text(),
    "image_quality": base.tfds.features.Text(),
  }
  HOMEPAGE = "https://www.creatis.insa-lyon.fr/Challenge/camus/"
  CITATION = (
    "Leclerc S, Smistad E, Pedrosa J, Ostvik A, et al. Deep learning for segmentation "
    "using an open large-scale dataset in 2D echocardiography. IEEE Trans Med Imaging "
    "38(9):2198-2210, 2019. doi:10.1109/TMI.2019.2900516"
  )
  MANUAL_DOWNLOAD_INSTRUCTIONS = """Download the CAMUS training set (MetaImage release) from the
  homepage and unpack it into manual_dir: manual_dir/training/patient<nnnn>/ with
  patient<nnnn>_{2CH,4CH}_{ED,ES}.mhd/.raw, the masks patient<nnnn>_{2CH,4CH}_{ED,ES}_gt.mhd/.raw
  and Info_{2CH,4CH}.cfg. (The 2023 NIfTI release is not read: convert it to .mhd.)"""

  def _generate_examples(self, manual_dir, split):
    patients = sorted(glob.glob(os.path.join(manual_dir, self.ROOT, "patient*")))
    if not patients:
      raise FileNotFoundError(
        f"camus: no patient*/ folders in {os.path.join(manual_dir, self.ROOT)}"
      )
    for folder in patients:
      patient = os.path.basename(folder)
      for view in self.VIEWS:
        info = _cfg(os.path.join(folder, f"Info_{view}.cfg"))
        for phase in self.PHASES:
          stem = os.path.join(folder, f"{patient}_{view}_{phase}")
          image, spacing = _frame(stem + ".mhd")
          labels, _ = _frame(stem + "_gt.mhd")
          if labels.shape != image.shape or labels.min() < 0 or labels.max() > 3:
            raise ValueError(
              f"camus: {stem}_gt.mhd has shape {labels.shape} and values "
              f"{labels.min()}..{labels.max()}; expected {image.shape} in 0..3"
            )
          row, col = spacing[1], spacing[0]  # ElementSpacing is x (column) first
          yield (
            f"{patient}_{view}_{phase}",
            base.example(
              manual_dir,
              stem + ".mhd",
              np.clip(image, 0, 255).astype(np.uint8)[..., None],
              mask=labels == 1,
              structures=labels.astype(np.uint8)[..., None],
              pixel_spacing_mm=np.array([row, col], np.float32),
              # One number only for square pixels (the released images are not all square).
              pixel_size_mm=row if abs(row - col) <= 0.01 * max(row, col) else base.NAN,
              view=view,
              phase=phase,
              image_quality=info.get("ImageQuality", ""),
              patient_id=patient,
              probe="",
            ),
          )
