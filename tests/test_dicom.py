"""DICOM reading: files written here with pydicom (single-frame MONOCHROME2 with PixelSpacing,
a multi-frame RGB cine, YBR_FULL, ultrasound-region spacing), checked pixel by pixel against the
arrays written, frame sampling against the rule, and as folder / manifest sources."""

import csv
import os

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
  ExplicitVRLittleEndian,
  UltrasoundMultiFrameImageStorage,
  generate_uid,
)

from ultrajax import configlib
from ultrajax.data import dicom, sources


def _write(path, frames, photometric, **header):
  """frames uint8 [F, H, W] or [F, H, W, 3] (already in `photometric`'s space) as a DICOM file."""
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality = "US"
  ds.Rows, ds.Columns = frames.shape[1:3]
  ds.SamplesPerPixel = 3 if frames.ndim == 4 else 1
  if frames.ndim == 4:
    ds.PlanarConfiguration = 0
  ds.PhotometricInterpretation = photometric
  ds.BitsAllocated = ds.BitsStored = 8
  ds.HighBit, ds.PixelRepresentation = 7, 0
  if len(frames) > 1:
    ds.NumberOfFrames = len(frames)
  for key, value in header.items():
    setattr(ds, key, value)
  ds.PixelData = np.ascontiguousarray(frames if len(frames) > 1 else frames[0]).tobytes()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  ds.save_as(path, enforce_file_format=True)
  return path


def _ybr_full(rgb):
  """ITU-R BT.601 full-range RGB -> YCbCr (DICOM YBR_FULL, PS3.3 C.7.6.3.1.2), by hand."""
  r, g, b = (rgb[..., k].astype(np.float64) for k in range(3))
  y = 0.299 * r + 0.587 * g + 0.114 * b
  cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
  cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
  return np.clip(np.rint(np.stack([y, cb, cr], -1)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("dicom")
  rng = np.random.default_rng(0)
  grey = rng.integers(0, 256, (1, 6, 8), dtype=np.uint8)
  cine = rng.integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
  colour = rng.integers(0, 256, (1, 6, 6, 3), dtype=np.uint8)
  region = Dataset()
  region.RegionSpatialFormat, region.PhysicalUnitsXDirection, region.PhysicalUnitsYDirection = (
    1,
    3,
    3,
  )
  region.PhysicalDeltaX, region.PhysicalDeltaY = 0.02, 0.025
  doppler = Dataset()  # a spectral region first (units cm/s and s), which must be passed over
  doppler.RegionSpatialFormat, doppler.PhysicalUnitsXDirection, doppler.PhysicalUnitsYDirection = (
    3,
    4,
    7,
  )
  doppler.PhysicalDeltaX, doppler.PhysicalDeltaY = 0.01, 1.5
  return {
    "grey": (
      _write(str(root / "a" / "grey.dcm"), grey, "MONOCHROME2", PixelSpacing=[0.3, 0.3]),
      grey[0],
    ),
    "cine": (
      _write(
        str(root / "b" / "cine.dcm"),
        cine,
        "RGB",
        SequenceOfUltrasoundRegions=Sequence([doppler, region]),
      ),
      cine,
    ),
    "ybr": (_write(str(root / "b" / "ybr.dcm"), _ybr_full(colour), "YBR_FULL"), colour[0]),
  }


@pytest.mark.parametrize(
  "rule, n, want",
  [
    ("middle", 7, [3]),
    ("middle", 1, [0]),
    ("all", 3, [0, 1, 2]),
    ("first:2", 7, [0, 1]),
    ("first:9", 3, [0, 1, 2]),
    ("every:3", 7, [0, 3, 6]),
    ("every:1", 2, [0, 1]),
  ],
)
def test_select_frames(rule, n, want):
  assert dicom.select_frames(n, rule) == want


@pytest.mark.parametrize("rule", ["", "last", "every:0", "first:x", "all:2", "middle:1"])
def test_bad_rule_names_the_field(rule):
  with pytest.raises(configlib.ConfigError, match="config.data.dicom_frames"):
    dicom.check_rule(rule)


def test_single_frame_grey_with_pixel_spacing(files):
  path, want = files["grey"]
  image, spacing = dicom.decode(path)
  np.testing.assert_array_equal(image, want)
  assert spacing == (0.3, 0.3)
  assert dicom.record_extras(spacing) == {"pixel_spacing_mm": "0.3,0.3", "pixel_size_mm": "0.3"}


def test_cine_frames_and_ultrasound_region_spacing(files):
  path, cine = files["cine"]
  assert dicom.frame_paths(path, "every:3") == [f"{path}#0", f"{path}#3", f"{path}#6"]
  for k in (0, 3, 6):
    image, spacing = dicom.decode(f"{path}#{k}")
    np.testing.assert_array_equal(image, cine[k])
  assert spacing == pytest.approx((0.25, 0.2))  # PhysicalDeltaY/X in cm -> mm, (row, column)
  np.testing.assert_array_equal(dicom.decode(path)[0], cine[3])  # bare path: the middle frame
  assert "pixel_size_mm" not in dicom.record_extras(spacing)  # not square
  with pytest.raises(dicom.DicomError, match="cine.dcm has 7 frame"):
    dicom.decode(f"{path}#7")


def test_ybr_full_becomes_rgb(files):
  path, rgb = files["ybr"]
  image, spacing = dicom.decode(path)
  assert spacing is None
  # YBR rounding to uint8 on writing and reading: at most 2 levels off.
  assert np.abs(image.astype(int) - rgb).max() <= 2


def test_not_dicom_is_a_bad_image(tmp_path):
  path = tmp_path / "x.dcm"
  path.write_bytes(b"not a dicom file")
  with pytest.raises(sources.BadImageError, match="x.dcm"):
    sources.decode_image(str(path))


def test_folder_and_manifest_sources_expand_frames(files, tmp_path):
  root = os.path.dirname(os.path.dirname(files["grey"][0]))
  clients = sources.folder_clients(root, dicom_frames="every:3")
  assert [c.name for c in clients] == ["a", "b"]
  assert len(clients[0]) == 1 and len(clients[1]) == 3 + 1  # cine frames 0, 3, 6 + ybr
  record = clients[1][1]
  np.testing.assert_array_equal(record["image"], files["cine"][1][3])
  assert record["pixel_spacing_mm"] == "0.25,0.2"
  assert clients[0][0]["pixel_size_mm"] == "0.3"
  manifest = tmp_path / "m.csv"
  with open(manifest, "w", newline="") as f:
    csv.writer(f).writerows(
      [["image", "client", "note"], [files["cine"][0], "s1", "x"], [files["grey"][0], "s2", "y"]]
    )
  clients = sources.manifest_clients(str(manifest), dicom_frames="first:2", extra_columns=("note",))
  assert [len(c) for c in clients] == [2, 1]
  assert [r["note"] for r in (clients[0][0], clients[0][1])] == ["x", "x"]
  np.testing.assert_array_equal(clients[0][1]["image"], files["cine"][1][1])
