"""Ultrasound DICOM: single images and multi-frame cine loops as uint8 frames with pixel spacing.

A folder or manifest source lists `*.dcm` files like images; each file becomes the frames picked
by the rule `config.data.dicom_frames`:
  'middle'    one frame, the middle one (index n // 2; a single-frame file gives its image)
  'all'       every frame
  'first:N'   frames 0..N-1 (fewer when the loop is shorter)
  'every:N'   frames 0, N, 2N, ...
A selected frame is addressed as '<file>.dcm#<index>' (frame_paths); a bare '<file>.dcm' means
its middle frame.

Pixels: MONOCHROME2 stays grey, MONOCHROME1 is inverted to it, RGB stays RGB and YBR_FULL /
YBR_FULL_422 (what ultrasound scanners often store) are converted to RGB by pydicom (ITU-R BT.601
full range); PALETTE COLOR goes through its lookup table. More than 8 bits stored are scaled to
0..255. Spacing (mm per pixel, (row, column)): PixelSpacing when present, else the first 2-D
region of SequenceOfUltrasoundRegions measured in cm (PhysicalUnits 3), PhysicalDeltaY/X x 10.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom import pixels

from ultrajax import configlib

EXTENSION = ".dcm"
RULES = ("middle", "all", "first:N", "every:N")
_CM = 3  # PhysicalUnitsX/YDirection code for cm
_REGION_2D = 1  # RegionSpatialFormat code for a 2-D tissue or flow image


class DicomError(configlib.DataError):
  """A DICOM file that cannot be read as ultrasound frames."""


def is_dicom(path: str) -> bool:
  return split_frame(path)[0].lower().endswith(EXTENSION)


def split_frame(path: str) -> tuple[str, int | None]:
  """'<file>.dcm#3' -> ('<file>.dcm', 3); a path without a frame index -> (path, None)."""
  head, sep, tail = path.rpartition("#")
  if sep and head.lower().endswith(EXTENSION) and tail.isdigit():
    return head, int(tail)
  return path, None


def check_rule(rule: str) -> tuple[str, int]:
  """(kind, N) of a frame rule; ConfigError naming config.data.dicom_frames for anything else."""
  kind, _, n = rule.partition(":")
  if kind in ("middle", "all") and not n:
    return kind, 0
  if kind in ("first", "every") and n.isdigit() and int(n) >= 1:
    return kind, int(n)
  raise configlib.ConfigError(f"config.data.dicom_frames={rule!r} is not one of {RULES} (N >= 1)")


def select_frames(num_frames: int, rule: str) -> list[int]:
  """Indices of the frames of a `num_frames` loop that `rule` keeps (module docstring)."""
  kind, n = check_rule(rule)
  if kind == "middle":
    return [num_frames // 2]
  if kind == "first":
    return list(range(min(n, num_frames)))
  return list(range(0, num_frames, n if kind == "every" else 1))


def _header(path: str):
  try:
    return pydicom.dcmread(path, stop_before_pixels=True)
  except (OSError, pydicom.errors.InvalidDicomError) as e:
    raise DicomError(f"cannot read DICOM {path}: {e}") from e


def num_frames(ds) -> int:
  return int(ds.get("NumberOfFrames", 1) or 1)


def frame_paths(path: str, rule: str) -> list[str]:
  """'<path>#<k>' for each frame k of the file that `rule` keeps (reads the header only)."""
  return [f"{path}#{k}" for k in select_frames(num_frames(_header(path)), rule)]


def spacing_mm(ds) -> tuple[float, float] | None:
  """(row, column) mm per pixel from a dataset's header (module docstring), or None."""
  if "PixelSpacing" in ds:
    row, col = (float(v) for v in ds.PixelSpacing)
    return row, col
  for region in ds.get("SequenceOfUltrasoundRegions", ()):
    if (
      region.get("RegionSpatialFormat") == _REGION_2D
      and region.get("PhysicalUnitsXDirection") == _CM
      and region.get("PhysicalUnitsYDirection") == _CM
    ):
      return abs(float(region.PhysicalDeltaY)) * 10, abs(float(region.PhysicalDeltaX)) * 10
  return None


def _to_uint8(values: np.ndarray, bits: int) -> np.ndarray:
  values = np.clip(values.astype(np.int64), 0, None)
  if bits > 8:
    values = (values * 255 + (2**bits - 1) // 2) // (2**bits - 1)
  return np.clip(values, 0, 255).astype(np.uint8)


def decode(path: str) -> tuple[np.ndarray, tuple[float, float] | None]:
  """(frame uint8 [H, W] grey or [H, W, 3] RGB, spacing (row, col) mm or None) of
  '<file>.dcm#<k>' (a bare '<file>.dcm': its middle frame); DicomError naming the file."""
  file, index = split_frame(path)
  ds = _header(file)
  n = num_frames(ds)
  index = n // 2 if index is None else index
  if not 0 <= index < n:
    raise DicomError(f"DICOM {file} has {n} frame(s); frame {index} does not exist")
  photometric = str(ds.get("PhotometricInterpretation", ""))
  try:
    # raw=False: pydicom converts YBR_FULL / YBR_FULL_422 to RGB.
    frame = pixels.pixel_array(file, index=index if n > 1 else None)
  except Exception as e:  # pydicom raises many types for unsupported or damaged pixel data
    raise DicomError(f"cannot decode the pixels of DICOM {file} frame {index}: {e}") from e
  bits = int(ds.get("BitsStored", 8))
  if photometric == "PALETTE COLOR":
    frame = pixels.apply_color_lut(frame, ds)
    bits = 16 if frame.dtype == np.uint16 else 8
  elif photometric == "MONOCHROME1":
    frame = (2**bits - 1) - frame.astype(np.int64)
  elif photometric not in ("MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422"):
    raise DicomError(
      f"DICOM {file}: PhotometricInterpretation {photometric!r} is not supported "
      "(MONOCHROME1/2, RGB, YBR_FULL(_422), PALETTE COLOR)"
    )
  return _to_uint8(frame, bits), spacing_mm(ds)


def record_extras(spacing: tuple[float, float] | None) -> dict:
  """A frame's spacing as record strings: 'pixel_spacing_mm' 'row,col' and, for square pixels
  (within 1%), 'pixel_size_mm' (the manifest column that makes distances millimetres)."""
  if spacing is None:
    return {}
  row, col = spacing
  extras = {"pixel_spacing_mm": f"{row!r},{col!r}"}
  if abs(row - col) <= 0.01 * max(row, col):
    extras["pixel_size_mm"] = repr((row + col) / 2)
  return extras
