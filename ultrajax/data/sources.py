"""Data sources: random-access datasets of ultrasound records, one per client (site).

A source has `name` (the client), `probe` ('linear' | 'convex' | '' when unknown or mixed), `__len__`
and `__getitem__(i) -> dict`, so it is a Grain `RandomAccessDataSource` as it stands. Records hold
`image` uint8 [H, W] (grey) or [H, W, 3] and, where known, `probe`, `organ`, `label`, `organ_mask`,
`lesion_mask`, `path`, and for convex images `fan` (the probe geometry in pixels, a dict of
ultramim.geometry.Fan's fields). Sources keep only plain data (no open files, no lambdas) so they pickle into
Grain worker processes. Prepared TFDS datasets are sources too (data/tfds/source.py).
"""

from __future__ import annotations

import bisect
import concurrent.futures
import csv
import io
import math
import os
import zlib
from collections.abc import Sequence

import numpy as np
from absl import logging
from PIL import Image

from ultrajax import configlib
from ultrajax.data import dicom, phantom
from ultrajax.ultramim import geometry

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", dicom.EXTENSION)
ON_BAD_IMAGE = ("skip", "raise")
MIXED = "mixed"  # PhantomSource organ: each record draws its organ from phantom.ORGANS

# Probe per organ, our assumption (UltraFedFM's table gives no probes): linear for superficial organs,
# convex for abdominal, fetal, cardiac (phased-array sectors look alike), lung and endorectal scans.
ORGAN_PROBE = {
  **dict.fromkeys(("breast", "thyroid", "skin", "muscle", "nerve"), "linear"),
  **dict.fromkeys(
    ("liver", "kidney", "heart", "fetal_head", "lung", "pancreas", "gallbladder", "colorectum"),
    "convex",
  ),
}

# UltraFedFM Table 1 (seeds/000_876f01d9d1dfc297.txt): client, main organ, number of images.
# 'Fetal organs' -> fetal_head; PrivateUS (uterus, vessels, stomach, spleen, prostate, testis,
# parotid, lymph nodes, over four modalities) has no phantom organ and draws from all of them.
_TABLE_1 = (
  ("BUV", "breast", 25_727),
  ("CLUST", "liver", 35_626),
  ("EchoNet-Dynamic", "heart", 150_243),
  ("FETAL-PLANES", "fetal_head", 12_400),
  ("TDSC-ABUS", "breast", 126_918),
  ("Leg-3D-US", "muscle", 115_263),
  ("Thyroid-Cine-clip", "thyroid", 17_412),
  ("SYSU-FLL-CEUS", "liver", 118_485),
  ("CAMUS", "heart", 21_214),
  ("COVID-BLUES", "lung", 42_226),
  ("NerveUS", "nerve", 11_143),
  ("LEPset", "pancreas", 11_499),
  ("FPUS", "fetal_head", 20_378),
  ("GBUSV", "gallbladder", 10_553),
  ("ERUS", "colorectum", 63_426),
  ("PrivateUS", MIXED, 235_633),
)
# (name, organ, probe, num_images) of UltraFedFM's 16 pretraining clients.
DEFAULT_CLIENTS = tuple((name, organ, ORGAN_PROBE.get(organ, ""), n) for name, organ, n in _TABLE_1)


class BadImageError(configlib.DataError):
  """An image file that cannot be decoded."""


def _common_probe(probes) -> str:
  probes = set(probes)
  return probes.pop() if len(probes) == 1 else ""


def check_index(source, i) -> int:
  """int(i); IndexError naming the client when it is not a record of `source`."""
  i = int(i)
  if not 0 <= i < len(source):
    raise IndexError(f"record {i} of client {source.name!r} with {len(source)} records")
  return i


def _check_probe(probe: str, what: str) -> str:
  if probe not in ("", *phantom.PROBES):
    raise configlib.DataError(f"{what}={probe!r} is not one of {('', *phantom.PROBES)}")
  return probe


class PhantomSource:
  """`num_images` phantom records of one client; record i depends only on (seed, name, i).

  organ: one of phantom.ORGANS, or MIXED (each record draws its organ, and with probe '' the
  organ's probe from ORGAN_PROBE). probe: one of phantom.PROBES ('' only with MIXED).
  """

  def __init__(
    self, name: str, organ: str, probe: str, num_images: int, image_size: int, seed: int
  ):
    if organ not in (*phantom.ORGANS, MIXED):
      raise ValueError(f"organ={organ!r} is not one of {(*phantom.ORGANS, MIXED)}")
    if probe not in phantom.PROBES and not (probe == "" and organ == MIXED):
      raise ValueError(f"probe={probe!r} is not one of {phantom.PROBES}")
    if num_images < 1:
      raise ValueError(f"num_images={num_images!r} is below 1")
    self.name, self.organ, self.probe = name, organ, probe
    self.num_images, self.image_size, self.seed = int(num_images), int(image_size), int(seed)
    # A stable hash: Python's hash() of a str changes from process to process.
    self._client_key = zlib.crc32(name.encode())

  def __len__(self) -> int:
    return self.num_images

  def __getitem__(self, i: int) -> dict:
    i = check_index(self, i)
    rng = np.random.default_rng([self.seed, self._client_key, i])
    organ = phantom.ORGANS[rng.integers(len(phantom.ORGANS))] if self.organ == MIXED else self.organ
    return phantom.generate(rng, organ, self.probe or ORGAN_PROBE[organ], self.image_size)


def default_client_sources(
  scale: float, image_size: int, seed: int, num_clients: int = 16, min_images: int = 64
) -> list[PhantomSource]:
  """Phantom clients shaped like the first `num_clients` of DEFAULT_CLIENTS, each with
  max(min_images, floor(count * scale)) images."""
  if not 1 <= num_clients <= len(DEFAULT_CLIENTS):
    raise ValueError(f"num_clients={num_clients!r} is not in 1..{len(DEFAULT_CLIENTS)}")
  if not scale >= 0:
    raise ValueError(f"scale={scale!r} is not >= 0")
  return [
    PhantomSource(name, organ, probe, max(min_images, math.floor(n * scale)), image_size, seed)
    for name, organ, probe, n in DEFAULT_CLIENTS[:num_clients]
  ]


def decode_image(path: str) -> np.ndarray:
  """An image file as uint8 [H, W] (grey) or [H, W, 3] (colour); raises BadImageError.

  Alpha is dropped (ultrasound exports use it only as opaque padding), palettes are expanded to
  RGB, 16-bit grey is rounded to 8 bits (v / 257), 1-bit becomes {0, 255}. DICOM ('<file>.dcm',
  or '<file>.dcm#<frame>'): the frame as dicom.decode reads it.
  """
  if dicom.is_dicom(path):
    return _decode_dicom(path)[0]
  try:
    with Image.open(path) as img:
      img.load()
      if img.mode in ("L", "RGB"):
        return np.array(img, np.uint8)
      if img.mode in ("1", "LA"):
        return np.array(img.convert("L"), np.uint8)
      if img.mode.startswith("I"):  # I;16, I;16B, I: 16-bit grey
        wide = np.clip(np.asarray(img, np.int64), 0, 65535)
        return ((wide + 128) // 257).astype(np.uint8)
      return np.array(img.convert("RGB"), np.uint8)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise BadImageError(f"cannot decode image {path}: {e}") from e


def _decode_dicom(path: str):
  try:
    return dicom.decode(path)
  except dicom.DicomError as e:
    raise BadImageError(str(e)) from e


def _dicom_frames(paths, fields, rule: str):
  """paths with each bare DICOM file replaced by its frames under `rule` (unreadable headers kept
  as they are, for on_bad_image), and the per-record `fields` repeated to match."""
  expanded = [[p] for p in paths]
  for j, p in enumerate(paths):
    if dicom.is_dicom(p) and dicom.split_frame(p)[1] is None:
      try:
        expanded[j] = dicom.frame_paths(p, rule)
      except dicom.DicomError:
        pass
  return (
    [f for frames in expanded for f in frames],
    [dict(v) for v, frames in zip(fields, expanded) for _ in frames],
  )


class FolderSource:
  """Image files of one client, decoded on access.

  paths: image files (the record order). record_probes: a probe per record (default: `probe` for
  all); `probe` is then their common value, or ''. extras: a dict of strings per record, merged into
  it. on_bad_image: 'raise' (BadImageError naming the file) or 'skip' (warn once per file, return
  the next decodable record, wrapping, so the length and record order stay fixed).
  drop_undecodable: with 'skip', decode every file once now and keep only those that decode
  (warning once for each other), so len() and the client's FedAvg weight n_k count usable images;
  it costs one pass over the files (about one local epoch of decoding), on all cores.
  dicom_frames: the frames each DICOM file gives (data/dicom.py rule), its records in frame order;
  they carry the header's spacing ('pixel_spacing_mm', and 'pixel_size_mm' for square pixels).
  """

  def __init__(
    self,
    name: str,
    paths: Sequence[str],
    probe: str = "",
    on_bad_image: str = "skip",
    *,
    record_probes: Sequence[str] | None = None,
    extras: Sequence[dict] | None = None,
    drop_undecodable: bool = False,
    dicom_frames: str = "middle",
  ):
    if on_bad_image not in ON_BAD_IMAGE:
      raise ValueError(f"on_bad_image={on_bad_image!r} is not one of {ON_BAD_IMAGE}")
    if not paths:
      raise ValueError(f"client {name!r} has no images")
    if record_probes is None:
      record_probes = [_check_probe(probe, "probe")] * len(paths)
    extras = [{}] * len(paths) if extras is None else extras
    for what, values in (("record_probes", record_probes), ("extras", extras)):
      if len(values) != len(paths):
        raise ValueError(
          f"{what} has {len(values)} entries for {len(paths)} paths of client {name!r}"
        )
    # Each record's fields besides its image, path and DICOM spacing: its probe, then its extras.
    fields = [
      {"probe": _check_probe(p, f"probe of {path}"), **e}
      for p, e, path in zip(record_probes, extras, paths)
    ]
    paths, self._fields = _dicom_frames(paths, fields, dicom_frames)
    self.name, self.paths, self.on_bad_image = name, [str(p) for p in paths], on_bad_image
    self._warned: dict[str, object] = {}  # path -> the call that warned (prefetch threads race)
    if drop_undecodable and on_bad_image == "skip":
      self._drop_undecodable()
    self.probe = _common_probe(f["probe"] for f in self._fields)

  def _drop_undecodable(self) -> None:
    def error(path):
      try:
        decode_image(path)
      except BadImageError as e:
        return e

    with concurrent.futures.ThreadPoolExecutor(min(32, os.cpu_count() or 1)) as pool:
      errors = list(pool.map(error, self.paths))
    for e in filter(None, errors):
      logging.warning("%s; left out of client %r", e, self.name)
    keep = [i for i, e in enumerate(errors) if e is None]
    if not keep:
      raise BadImageError(
        f"client {self.name!r}: none of its {len(self.paths)} images decodes "
        f"(first: {self.paths[0]})"
      )
    if len(keep) < len(self.paths):
      logging.warning(
        f"client {self.name!r}: {len(self.paths) - len(keep)} of {len(self.paths)} images do "
        f"not decode and are left out (FedAvg weight n_k = {len(keep)})"
      )
      self.paths = [self.paths[i] for i in keep]
      self._fields = [self._fields[i] for i in keep]

  def __len__(self) -> int:
    return len(self.paths)

  def _record(self, i: int) -> dict:
    path = self.paths[i]
    image, spacing = _decode_dicom(path) if dicom.is_dicom(path) else (decode_image(path), None)
    return {"image": image, "path": path, **dicom.record_extras(spacing), **self._fields[i]}

  def __getitem__(self, i: int) -> dict:
    n, i = len(self.paths), check_index(self, i)
    for j in range(i, i + n):
      try:
        return self._record(j % n)
      except BadImageError as e:
        if self.on_bad_image == "raise":
          raise
        path = self.paths[j % n]
        token = object()
        if self._warned.setdefault(path, token) is token:  # one atomic step under the GIL
          logging.warning(
            f"{e}; client {self.name!r} serves the next decodable image in its place "
            f"({len(self._warned)} unreadable file(s) skipped so far)"
          )
    raise BadImageError(
      f"client {self.name!r}: none of its {n} images decodes (first: {self.paths[0]})"
    )


def _is_image(name: str) -> bool:
  # Dot files are metadata (macOS '._x.png' AppleDouble files are not images).
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(folder: str) -> list[str]:
  """Image files anywhere below `folder` (symlinks followed, hidden entries skipped), sorted."""
  found = []
  for parent, dirs, files in os.walk(folder, followlinks=True):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    found += [os.path.join(parent, f) for f in files if _is_image(f)]
  return sorted(found)


def folder_clients(
  root: str, probe: str = "", on_bad_image: str = "skip", dicom_frames: str = "middle"
) -> list[FolderSource]:
  """One client per immediate sub-directory of `root` (sorted by name), holding the
  png/jpg/jpeg/bmp files and the `dicom_frames` frames of the dcm files found anywhere below it.
  A root with images and no sub-directories is a single client named after the root. Raises
  FileNotFoundError for a missing root and ValueError for a sub-directory without images, a root
  without any, or images directly in a root that also has sub-directories.
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"image folder root {root} does not exist or is not a directory")
  entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
  subdirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
  loose = [os.path.join(root, e) for e in entries if _is_image(e) and e not in subdirs]
  client = lambda name, paths: FolderSource(
    name, paths, probe, on_bad_image, drop_undecodable=True, dicom_frames=dicom_frames
  )
  if not subdirs:
    if not loose:
      raise configlib.DataError(
        f"image folder root {root} has no sub-directories containing images (and no images)"
      )
    return [client(os.path.basename(os.path.abspath(root)), loose)]
  if loose:
    raise configlib.DataError(
      f"image folder root {root} has {len(loose)} images next to its client "
      f"sub-directories (e.g. {loose[0]}); move them into a sub-directory"
    )
  clients = []
  for d in subdirs:
    paths = _images_under(os.path.join(root, d))
    if not paths:
      raise configlib.DataError(
        f"client sub-directory {os.path.join(root, d)} contains no "
        f"{'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images"
      )
    clients.append(client(d, paths))
  return clients


def read_manifest(csv_path: str, required=(), why: str = "") -> tuple[list[str], list[dict]]:
  """(column names, rows as dicts) of a CSV manifest in UTF-8 (a BOM is ignored).

  Raises FileNotFoundError for a missing file and DataError (a ValueError), naming the file, for
  text that is not UTF-8 (with its line), a malformed CSV line, a missing `required` column
  (`why` says what it is needed for) or a manifest without rows.
  """
  if not os.path.isfile(csv_path):
    raise FileNotFoundError(f"manifest {csv_path} does not exist")
  with open(csv_path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = raw[: e.start].count(b"\n") + 1
    raise configlib.DataError(
      f"manifest {csv_path} line {line}: byte {raw[e.start : e.start + 1]!r} is not UTF-8 (the "
      "file is in another encoding, e.g. Latin-1 / Windows-1252); save it as UTF-8"
    ) from None
  reader = csv.DictReader(io.StringIO(text, newline=""))
  try:
    columns = list(reader.fieldnames or ())
    rows = list(reader)
  except csv.Error as e:
    raise configlib.DataError(f"manifest {csv_path} line {reader.line_num}: {e}") from None
  for column in required:
    if column not in columns:
      raise configlib.DataError(
        f"manifest {csv_path} has no column {column!r}{why}; its columns are {columns}"
      )
  if not rows:
    raise configlib.DataError(f"manifest {csv_path} lists no images")
  return columns, rows


def manifest_clients(
  csv_path: str,
  image_column: str = "image",
  client_column: str = "client",
  probe_column: str = "probe",
  default_probe: str = "",
  on_bad_image: str = "skip",
  extra_columns: tuple[str, ...] = (),
  dicom_frames: str = "middle",
) -> list[FolderSource]:
  """Clients listed in a CSV file, in order of first appearance.

  Image paths are relative to the CSV's directory (absolute ones are kept). Without `client_column`
  in the header all rows form one client named after the CSV's stem; without `probe_column` every
  record has `default_probe` (as does an empty probe cell). `extra_columns` are copied into each
  record as strings. Optional FAN_COLUMNS give a convex image's probe geometry in its pixels
  (record['fan'], for SMAT; rows with them all empty have none). Raises ValueError for a missing
  column, bad geometry (naming the line) or an empty manifest and FileNotFoundError for a missing
  CSV or missing images. Images ending .dcm give the `dicom_frames` frames, each with the row's
  extras.
  """
  csv_path = os.fspath(csv_path)
  _check_probe(default_probe, "default_probe")
  columns, rows = read_manifest(csv_path, (image_column, *extra_columns))
  base = os.path.dirname(os.path.abspath(csv_path))
  stem = os.path.splitext(os.path.basename(csv_path))[0]
  groups: dict[str, list[tuple]] = {}  # client -> (path, probe, extras) of each of its rows
  fan_columns = [c for c in FAN_COLUMNS if c in columns]
  if fan_columns and len(fan_columns) < len(FAN_COLUMNS):
    raise configlib.DataError(
      f"manifest {csv_path} has fan geometry columns {fan_columns} but not "
      f"{[c for c in FAN_COLUMNS if c not in columns]}; give all of "
      f"{list(FAN_COLUMNS)} or none"
    )
  for n, row in enumerate(rows, start=2):  # line 1 is the header
    client = row[client_column] if client_column in columns else stem
    if not client:
      raise configlib.DataError(f"manifest {csv_path} line {n}: empty {client_column!r}")
    probe = (row[probe_column] if probe_column in columns else "") or default_probe
    extras = {c: row[c] or "" for c in extra_columns}
    if fan_columns and (fan := _manifest_fan(row, probe, f"manifest {csv_path} line {n}")):
      extras["fan"] = fan
    groups.setdefault(client, []).append((os.path.join(base, row[image_column]), probe, extras))
  missing = [p for group in groups.values() for p, _, _ in group if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(
      f"manifest {csv_path}: {len(missing)} of {len(rows)} images are missing, e.g. {missing[:3]}"
    )
  return [
    FolderSource(
      client,
      [path for path, _, _ in group],
      on_bad_image=on_bad_image,
      record_probes=[probe for _, probe, _ in group],
      drop_undecodable=True,
      dicom_frames=dicom_frames,
      extras=[extras for _, _, extras in group],
    )
    for client, group in groups.items()
  ]


# A convex image's fan in its pixels (ultramim.geometry.Fan's fields), optional manifest columns.
FAN_COLUMNS = geometry.FIELDS


def _manifest_fan(row: dict, probe: str, where: str) -> dict | None:
  """The fan of a manifest row (None when its FAN_COLUMNS are all empty); DataError naming `where`."""
  cells = {c: (row[c] or "").strip() for c in FAN_COLUMNS}
  if not any(cells.values()):
    return None
  empty = [c for c, v in cells.items() if not v]
  if empty:
    raise configlib.DataError(
      f"{where}: fan geometry {empty} empty; give all of {list(FAN_COLUMNS)} or none"
    )
  if probe != "convex":
    raise configlib.DataError(
      f"{where}: fan geometry given for probe {probe!r}; only 'convex' images have a fan"
    )
  values = {}
  for c, v in cells.items():
    try:
      values[c] = float(v)
    except ValueError:
      raise configlib.DataError(f"{where}: {c}={v!r} is not a number") from None
  try:
    return geometry.check_fan(values, where)._asdict()
  except ValueError as e:
    raise configlib.DataError(str(e)) from None


class PooledSource:
  """Every record of `sources` in order, as one source (centralized training): record i of the
  pool is record i - offset[k] of source k; probe = their common probe, or ''."""

  def __init__(self, sources: Sequence, name: str = "pooled"):
    if not sources:
      raise ValueError("PooledSource needs at least one source")
    self.sources, self.name = list(sources), name
    self.probe = _common_probe(s.probe for s in self.sources)
    self._ends = np.cumsum([len(s) for s in self.sources]).tolist()

  def __len__(self) -> int:
    return self._ends[-1]

  def __getitem__(self, i: int) -> dict:
    i = check_index(self, i)
    k = bisect.bisect_right(self._ends, i)
    return self.sources[k][i - (self._ends[k - 1] if k else 0)]


class SubsetSource:
  """Records `indices` of `source`, in that order; keeps its name and probe."""

  def __init__(self, source, indices: Sequence[int]):
    self.source, self.indices = source, [int(i) for i in indices]
    self.name, self.probe = source.name, source.probe

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    return self.source[self.indices[int(i)]]


def fraction_of(source, fraction: float, seed: int):
  """A random `fraction` of a client's images (data-fraction scaling studies): max(1,
  round(fraction * n)) records (drawn_subset), kept in their order; the source itself when
  fraction is 1."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction={fraction!r} is not in (0, 1]")
  if fraction == 1.0:
    return source
  return SubsetSource(source, drawn_subset(source, max(1, round(fraction * len(source))), seed))


def drawn_subset(source, k: int, seed: int) -> np.ndarray:
  """[k] sorted indices of `source`'s records drawn without replacement from (seed, crc32 of
  its name)."""
  rng = np.random.default_rng([int(seed), zlib.crc32(source.name.encode())])
  return np.sort(rng.choice(len(source), k, replace=False))
