"""Downstream tasks: labelled images held in memory, split by patient into train/val/test.

Fine-tuning sets are small (hundreds to tens of thousands of images), so a task is loaded once,
resized to the model's square input, and kept as uint8 arrays that go to the device whole; the
training loop gathers batches there (jobs/finetune.py).

Sources (config.data.source):
  phantom   the built-in phantom: diagnosis (benign vs malignant, or all three labels) for one
            organ or several with one head, or segmentation of the lesion / organ / both.
            Every image is its own patient.
  manifest  a CSV with an image column and optional mask, label, group (patient / subject) and
            split columns; paths relative to the CSV (`../shared/data/real_us/*/labels.csv`).
  folders   root/<class>/**/*.png|jpg for classification; class names from the sub-folders.
  tfds      a prepared TFDS dataset (data.tfds_name, data/tfds/): its labels or masks, grouped
            by patient_id, spacing from pixel_size_mm.
Without a split column, patients are split with a seed by `split_fractions` (train, val, test),
so no patient straddles two splits. Images are resized to S x S without keeping the aspect ratio
(bilinear; masks nearest), and grey images become three equal channels.

Labels are checked, not guessed (docs/reliability.md gives the rules with examples and their
measured why). Classification: `classes` ('a,b,c') fixes the class order and any other label is an
error naming it and its first line; '' takes the labels found, sorted. Classes are logged with
their counts per split, with a warning for a class with a single image or missing from a split.
Segmentation masks (colour masks: the channel maximum) are read by `mask_mode`:
  binary     2 classes (background, foreground; `classes` may rename them). A 0/1 mask is taken as
             is, otherwise foreground is >= 128 (0/255 PNG and JPEG masks alike). Refused, naming
             the file and its values: more than 5% of the pixels >= 64 in the band 64..191, or all
             values below 64 but not just 0/1.
  class_ids  pixel values are class ids 0..K-1, K = len(`classes`), which must be declared
             (background first); an id outside them is an error naming the file and the ids.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os

import numpy as np
from absl import logging
from PIL import Image

from ultrajax import configlib
from ultrajax.data import phantom, sources

SPLITS = ("train", "val", "test")
TASK_TYPES = ("cls", "seg")
SEG_TARGETS = ("lesion", "organ", "organ_and_lesion")
SOURCES = ("phantom", "manifest", "folders", "tfds")
MASK_MODES = ("binary", "class_ids")
# Binary masks (see the module docstring): foreground from 128; 64..191 is the ambiguous band.
BINARY_THRESHOLD, AMBIGUOUS_BAND, MAX_AMBIGUOUS = 128, (64, 192), 0.05
PHANTOM_CLASSES = "benign,malignant"
# Manifest column with each image's pixel size in mm (square pixels; HC18's labels.csv), which
# makes segmentation distances (HD95, ASD, surface Dice tolerance) millimetres.
SPACING_COLUMN = "pixel_size_mm"


@dataclasses.dataclass
class TaskData:
  """images uint8 [N, S, S, 3]; targets int32 [N] (class ids) or uint8 [N, S, S] (class maps);
  groups [N] str (patient ids); splits [N] str in SPLITS; class_names (K,); spacing float64
  [N, 2] (row, column) mm per pixel of the S x S input where the source gives the pixel size
  (`input_spacing`), else None (distances are then in input pixels)."""

  images: np.ndarray
  targets: np.ndarray
  groups: np.ndarray
  splits: np.ndarray
  class_names: tuple[str, ...]
  task_type: str
  spacing: np.ndarray | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def indices(self, split: str) -> np.ndarray:
    return np.flatnonzero(self.splits == split)

  @classmethod
  def from_lists(
    cls, images, targets, groups, class_names, task_type: str, splits=None, spacing=None
  ) -> TaskData:
    """Per-image lists -> TaskData: targets int32 (cls) or uint8 (seg), splits '' (to be drawn
    by `split_by_group`) unless given, spacing None when empty."""
    return cls(
      np.stack(images),
      np.asarray(targets, np.int32 if task_type == "cls" else np.uint8),
      np.array(groups),
      np.array(splits or [""] * len(images), dtype=object),
      class_names,
      task_type,
      np.asarray(spacing, np.float64) if spacing else None,
    )


def to_rgb(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W], [H, W, 1] or [H, W, 3] -> [H, W, 3] (grey replicated)."""
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W] or [H, W, 3] -> uint8 [S, S, 3], bilinear (antialiased when shrinking)."""
  img = Image.fromarray(to_rgb(image))
  return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), np.uint8)


def input_spacing(pixel_size_mm: float, shape, size: int) -> tuple[float, float]:
  """(row, column) mm per pixel of the S x S model input, from the original [H, W] image's
  (square) pixel size: resizing H rows to S stretches each row by H / S (columns by W / S)."""
  return pixel_size_mm * shape[0] / size, pixel_size_mm * shape[1] / size


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """uint8 class map [H, W] -> [S, S], nearest neighbour (class ids stay class ids)."""
  return np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST), np.uint8)


def split_by_group(groups: np.ndarray, fractions, seed: int) -> np.ndarray:
  """Assigns whole groups to train/val/test in the given proportions (of groups), seeded.

  groups: [N] ids. fractions: (train, val, test) >= 0 summing to 1. Returns [N] split names.
  Each split with a positive fraction gets at least one group when there are enough groups.
  """
  fractions = np.asarray(fractions, np.float64)
  if fractions.shape != (3,) or np.any(fractions < 0) or not np.isclose(fractions.sum(), 1.0):
    raise configlib.ConfigError(
      f"config.data.split_fractions={tuple(fractions)} must be three "
      "non-negative (train, val, test) fractions summing to 1"
    )
  unique, inverse = np.unique(groups, return_inverse=True)
  order = np.random.default_rng([seed, 0x5B117]).permutation(len(unique))
  counts = np.floor(fractions * len(unique)).astype(int)
  for i in np.argsort(-(fractions * len(unique) - counts)):  # largest remainders first
    if counts.sum() == len(unique):
      break
    counts[i] += 1
  for i in range(3):  # a wanted split never ends up empty while another has groups to spare
    if fractions[i] > 0 and counts[i] == 0:
      donor = int(np.argmax(counts))
      if counts[donor] > 1:
        counts[donor] -= 1
        counts[i] += 1
  group_split = np.empty(len(unique), dtype=object)
  group_split[order] = np.repeat(SPLITS, counts)  # the group of rank r gets split r falls in
  return group_split[inverse].astype(str)


def train_subset(data: TaskData, fraction: float, seed: int) -> np.ndarray:
  """Indices of a `fraction` of the training patients (label efficiency), seeded.

  Nested: for one seed, the subset for 0.2 contains the one for 0.1. Classification subsets are
  stratified by the label of each patient's first image, so every class keeps its share.
  """
  configlib.check(0.0 < fraction <= 1.0, f"training fraction {fraction!r} is outside (0, 1]")
  train = data.indices("train")
  groups, first = np.unique(data.groups[train], return_index=True)
  rng = np.random.default_rng([seed, 0xF4AC])
  if data.task_type == "cls":
    first_label = data.targets[train[first]]
    strata = [groups[first_label == c] for c in range(data.num_classes)]
  else:
    strata = [groups]
  keep = []
  for stratum in strata:
    if len(stratum):
      ranked = stratum[rng.permutation(len(stratum))]
      keep.extend(ranked[: max(1, int(round(fraction * len(stratum))))].tolist())
  return train[np.isin(data.groups[train], keep)]


@functools.lru_cache(maxsize=8)
def _phantom_records(organ: str, num_images: int, image_size: int, seed: int) -> tuple:
  """`num_images` phantom draws of one organ (probe as sources.ORGAN_PROBE), cached per process."""
  src = sources.PhantomSource(
    f"task-{organ}", organ, sources.ORGAN_PROBE[organ], num_images, image_size, seed
  )
  return tuple(src[i] for i in range(num_images))


def phantom_task(
  task_type: str,
  organs,
  num_images_per_organ: int,
  image_size: int,
  seed: int,
  *,
  classes=("benign", "malignant"),
  seg_target: str = "lesion",
) -> TaskData:
  """Phantom diagnosis or segmentation for `organs` (one head over all of them).

  cls: images whose phantom label is in `classes` (names from phantom.LABELS), relabelled 0..K-1.
  seg: class maps 0 background, 1 lesion ('lesion') / organ ('organ') / 1 organ, 2 lesion.
  Every draw is a patient of its own; its group id is '<organ>/<index>'. Splits are left empty.
  """
  for organ in organs:
    if organ not in phantom.ORGANS:
      raise configlib.ConfigError(f"config.data.organs: {organ!r} is not one of {phantom.ORGANS}")
  images, targets, groups = [], [], []
  if task_type == "cls":
    bad = [c for c in classes if c not in phantom.LABELS]
    if bad or len(classes) < 2:
      raise configlib.ConfigError(
        f"config.data.classes={tuple(classes)}: need two or more of {phantom.LABELS}"
      )
    class_names = tuple(classes)
  else:
    if seg_target not in SEG_TARGETS:
      raise configlib.ConfigError(
        f"config.data.seg_target={seg_target!r} is not one of {SEG_TARGETS}"
      )
    both = seg_target == "organ_and_lesion"
    class_names = ("background", "organ", "lesion") if both else ("background", seg_target)
  for organ in organs:
    for i, r in enumerate(_phantom_records(organ, num_images_per_organ, image_size, seed)):
      if task_type == "cls":
        name = phantom.LABELS[r["label"]]
        if name not in class_names:
          continue
        targets.append(class_names.index(name))
      elif both:
        targets.append(np.maximum(r["organ_mask"], 2 * r["lesion_mask"]))
      else:
        targets.append(r[f"{seg_target}_mask"])
      images.append(to_rgb(r["image"]))
      groups.append(f"{organ}/{i}")
  if not images:
    raise configlib.ConfigError(
      f"the phantom gave no images of classes {class_names} for "
      f"organs {tuple(organs)}; raise config.data.num_images_per_organ"
    )
  return TaskData.from_lists(images, targets, groups, class_names, task_type)


def _names(given: str) -> tuple[str, ...]:
  return tuple(c.strip() for c in given.split(",") if c.strip())


def _class_names(values, given: str, where: str, lines=None) -> tuple[str, ...]:
  """The classes of labels `values`: `given` ('a,b,...') in its order, or the sorted labels
  found when ''. A label outside `given` raises DataError naming it (and its first line)."""
  present = sorted(set(values))
  if not given:
    counts = collections.Counter(values)
    found = ", ".join(f"{c!r} ({counts[c]} images)" for c in present)
    logging.info(
      f"{where}: config.data.classes='' so the classes are the labels found, sorted: {found}"
    )
    return tuple(present)
  names = _names(given)
  unknown = [v for v in present if v not in names]
  if unknown:
    first = "" if lines is None else f" (first at line {lines[list(values).index(unknown[0])]})"
    raise configlib.DataError(
      f"{where}: labels {unknown[:5]}{first} are not among "
      f"config.data.classes={names}; fix the label or add the class"
    )
  return names


def seg_class_names(classes: str, mask_mode: str) -> tuple[str, ...]:
  """Class names of a segmentation task read with `mask_mode` (see the module docstring)."""
  if mask_mode not in MASK_MODES:
    raise configlib.ConfigError(f"config.data.mask_mode={mask_mode!r} is not one of {MASK_MODES}")
  names = _names(classes)
  if mask_mode == "class_ids":
    if len(names) < 2:
      raise configlib.ConfigError(
        "config.data.mask_mode='class_ids' needs config.data.classes naming every class id in "
        f"order, background first (e.g. 'background,organ,lesion'); got {classes!r}"
      )
    return names
  if names and len(names) != 2:
    raise configlib.ConfigError(
      f"config.data.classes={names}: binary masks (config.data.mask_mode='binary') have 2 "
      "classes (background, foreground); for more use mask_mode='class_ids'"
    )
  return names or ("background", "foreground")


def _value_summary(mask: np.ndarray) -> str:
  values, counts = np.unique(mask, return_counts=True)
  if len(values) <= 6:
    return "{" + ", ".join(f"{v}: {c} px" for v, c in zip(values.tolist(), counts.tolist())) + "}"
  return f"{len(values)} distinct values in {values[0]}..{values[-1]}"


def mask_classes(mask: np.ndarray, mask_mode: str, class_names, path: str) -> np.ndarray:
  """A mask as read (uint8 [H, W]) -> class map uint8 [H, W] by the rule of the module docstring.

  Raises DataError naming `path` and the mask's values when they do not fit `mask_mode`.
  """
  if mask_mode == "class_ids":
    bad = np.unique(mask[mask >= len(class_names)])
    if bad.size:
      raise configlib.DataError(
        f"mask {path} has class ids {bad[:8].tolist()} outside 0..{len(class_names) - 1} of "
        f"config.data.classes={tuple(class_names)} (values {_value_summary(mask)})"
      )
    return mask.astype(np.uint8)
  if mask.max(initial=0) <= 1:
    return mask.astype(np.uint8)
  low, high = AMBIGUOUS_BAND
  bright = int(np.sum(mask >= low))
  if not bright:
    raise configlib.DataError(
      f"mask {path} has values {_value_summary(mask)}, all below {low} but not just 0/1: "
      "class ids need config.data.mask_mode='class_ids' with config.data.classes, and a 0/1 "
      "mask must be saved losslessly (PNG)"
    )
  ambiguous = int(np.sum(mask < high)) - int(np.sum(mask < low))
  if ambiguous > MAX_AMBIGUOUS * bright:
    raise configlib.DataError(
      f"mask {path} has values {_value_summary(mask)}: {ambiguous} of its {bright} pixels >= "
      f"{low} lie in {low}..{high - 1}, so it is not a 0/255 binary mask (config.data."
      "mask_mode='binary'); save it as 0/255 or 0/1, or declare class ids with "
      "config.data.mask_mode='class_ids' and config.data.classes"
    )
  return (mask >= BINARY_THRESHOLD).astype(np.uint8)


def manifest_task(
  csv_path: str,
  task_type: str,
  image_size: int,
  *,
  image_column="image",
  mask_column="mask",
  label_column="label",
  group_column="group",
  split_column="split",
  classes: str = "",
  on_bad_image: str = "raise",
  mask_mode: str = "binary",
) -> TaskData:
  """A CSV manifest as a task; image and mask paths relative to the CSV (absolute kept).

  cls needs `label_column` (class names; `classes` fixes their order, else sorted). seg needs
  `mask_column`, masks read by `mask_mode` with `classes` (module docstring). Missing group
  column: every row is its own patient. Missing split column: splits are left empty for
  `split_by_group`. Errors name the CSV, the line and the column.
  """
  columns, rows = sources.read_manifest(
    csv_path,
    (image_column, label_column if task_type == "cls" else mask_column),
    f" (needed for a {task_type} task)",
  )
  base = os.path.dirname(os.path.abspath(csv_path))
  images, targets, groups, splits, spacing = [], [], [], [], []
  if task_type == "cls":
    empty = [line for line, r in enumerate(rows, start=2) if not r[label_column].strip()]
    if empty:
      raise configlib.DataError(
        f"manifest {csv_path}: empty {label_column!r} cell on "
        f"{len(empty)} line(s), first line {empty[0]}"
      )
    labels = [r[label_column] for r in rows]
    class_names = _class_names(labels, classes, f"manifest {csv_path}", range(2, len(rows) + 2))
  else:
    class_names = seg_class_names(classes, mask_mode)
  for line, row in enumerate(rows, start=2):
    path = os.path.join(base, row[image_column])
    try:
      image = sources.decode_image(path)
    except (sources.BadImageError, FileNotFoundError) as e:
      if on_bad_image == "raise":
        raise configlib.DataError(f"manifest {csv_path} line {line}: {e}") from None
      logging.warning("manifest %s line %d: %s; skipped", csv_path, line, e)
      continue
    try:  # the mask's and the pixel size's errors name the line
      if task_type == "cls":
        targets.append(class_names.index(row[label_column]))
      elif not row[mask_column]:
        raise configlib.DataError(
          f"empty {mask_column!r} cell (a segmentation task needs a mask for every image)"
        )
      else:
        mask_path = os.path.join(base, row[mask_column])
        mask = sources.decode_image(mask_path)
        mask = mask.max(axis=-1) if mask.ndim == 3 else mask
        if mask.shape != image.shape[:2]:
          raise configlib.DataError(
            f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {path} is "
            f"{image.shape[1]}x{image.shape[0]}"
          )
        mask = mask_classes(mask, mask_mode, class_names, mask_path)
        targets.append(resize_mask(mask, image_size))
      if SPACING_COLUMN in columns:
        try:
          pixel_mm = float(row[SPACING_COLUMN])
        except ValueError:
          pixel_mm = float("nan")
        if not (np.isfinite(pixel_mm) and pixel_mm > 0):
          raise configlib.DataError(
            f"column {SPACING_COLUMN!r} is {row[SPACING_COLUMN]!r}, not a positive pixel size in mm"
          )
        spacing.append(input_spacing(pixel_mm, image.shape[:2], image_size))
    except configlib.DataError as e:
      raise configlib.DataError(f"manifest {csv_path} line {line}: {e}") from None
    images.append(resize_image(image, image_size))
    group = row[group_column] if group_column in columns else ""
    groups.append(group or f"row{line}")
    splits.append(row[split_column] if split_column in columns else "")
  bad = sorted({s for s in splits if s not in ("", *SPLITS)})
  if bad:
    raise configlib.DataError(
      f"manifest {csv_path}: column {split_column!r} has values {bad}; use {SPLITS}"
    )
  return TaskData.from_lists(images, targets, groups, class_names, task_type, splits, spacing)


def folders_task(root: str, image_size: int, classes: str = "") -> TaskData:
  """root/<class>/**/*.png|jpg|jpeg|bmp as a classification task; one patient per image."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"class folder root {root} does not exist")
  found = {
    d: sources._images_under(os.path.join(root, d))
    for d in sorted(os.listdir(root))
    if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")
  }
  empty = [d for d, paths in found.items() if not paths]
  if empty or not found:
    raise configlib.DataError(f"class folder root {root}: no images in {empty or 'any sub-folder'}")
  class_names = _class_names(
    [d for d, paths in found.items() for _ in paths], classes, f"class folders under {root}"
  )
  images, targets, groups = [], [], []
  for name, paths in found.items():
    for path in paths:
      images.append(resize_image(sources.decode_image(path), image_size))
      targets.append(class_names.index(name))
      groups.append(os.path.relpath(path, root))
  return TaskData.from_lists(images, targets, groups, class_names, "cls")


def class_counts(data: TaskData) -> np.ndarray:
  """[K, 3] int: images of each class in train/val/test (segmentation: images showing it)."""
  if data.task_type == "cls":
    present = data.targets[:, None] == np.arange(data.num_classes)
  else:
    present = np.stack(
      [np.any(data.targets == k, axis=(1, 2)) for k in range(data.num_classes)], axis=1
    )
  return np.stack([present[data.splits == s].sum(axis=0) for s in SPLITS], axis=1)


def log_class_counts(data: TaskData, where: str) -> None:
  """Logs each class's images per split; warns for a class with one image (a label typo?) or
  missing from a split (its metrics, e.g. AUROC, are then undefined there)."""
  counts = class_counts(data)
  what = "images" if data.task_type == "cls" else "images showing it"
  for name, row in zip(data.class_names, counts):
    per_split = ", ".join(f"{s} {n}" for s, n in zip(SPLITS, row.tolist()))
    logging.info(f"{where}: class {name!r}: {row.sum()} {what} ({per_split})")
    if row.sum() == 1 and data.task_type == "cls":
      logging.warning(
        f"{where}: class {name!r} has a single image: a misspelt label? Declaring "
        "config.data.classes makes unknown labels an error."
      )
    missing = [s for s, n in zip(SPLITS, row.tolist()) if n == 0]
    if missing:
      logging.warning(
        f"{where}: class {name!r} has no image in the {'/'.join(missing)} split(s); metrics "
        "that need every class there (AUROC, per-class Dice) are undefined."
      )


def _check_targets(data: TaskData, where: str) -> None:
  k = data.num_classes
  if data.targets.size and (data.targets.min() < 0 or data.targets.max() >= k):
    bad = np.unique(data.targets[(data.targets < 0) | (data.targets >= k)])[:5].tolist()
    raise configlib.DataError(f"{where}: labels {bad} are outside 0..{k - 1} ({data.class_names})")


def load_task(data_config, task_type: str, image_size: int) -> TaskData:
  """The task named by config.data, split into train/val/test (see the module docstring).

  An empty split raises naming it; so do labels out of range and masks of the wrong size.
  """
  c = data_config
  if task_type not in TASK_TYPES:
    raise configlib.ConfigError(f"config.task_type={task_type!r} is not one of {TASK_TYPES}")
  if c.source not in SOURCES:
    raise configlib.ConfigError(f"config.data.source={c.source!r} is not one of {SOURCES}")
  mask_mode = c.get("mask_mode", "binary")
  if task_type == "seg":  # a bad field fails first
    seg_class_names(c.classes if c.source != "phantom" else "", mask_mode)
  if c.source == "phantom":
    organs = _names(c.organs)
    data = phantom_task(
      task_type,
      organs,
      c.num_images_per_organ,
      image_size,
      c.phantom_seed,
      classes=_names(c.classes or PHANTOM_CLASSES),
      seg_target=c.seg_target,
    )
    where = f"phantom {task_type} task on {organs}"
  elif c.source == "manifest":
    fields = ("image_column", "mask_column", "label_column", "group_column", "split_column")
    data = manifest_task(
      c.manifest,
      task_type,
      image_size,
      **{field: getattr(c, field) for field in (*fields, "classes", "on_bad_image")},
      mask_mode=mask_mode,
    )
    where = f"manifest {c.manifest}"
  elif c.source == "tfds":
    from ultrajax.data.tfds import source as tfds_source  # needs the [tfds] extra

    data = tfds_source.tfds_task(
      c.tfds_name, c.tfds_data_dir, c.tfds_split, task_type, image_size, c.classes
    )
    where = f"TFDS dataset {c.tfds_name}"
  else:
    if task_type != "cls":
      raise configlib.ConfigError(
        "config.data.source='folders' is for classification; use a "
        "manifest with a mask column for segmentation"
      )
    data = folders_task(c.root, image_size, c.classes)
    where = f"class folders {c.root}"
  _check_targets(data, where)
  if np.all(data.splits == ""):
    data.splits = split_by_group(data.groups, c.split_fractions, c.split_seed)
  elif np.any(data.splits == ""):
    raise configlib.DataError(
      f"{where}: the split column is empty for {int(np.sum(data.splits == ''))} rows"
    )
  for split in SPLITS:
    if not np.any(data.splits == split):
      raise configlib.DataError(
        f"{where}: the {split!r} split is empty ({len(data.groups)} images, "
        f"{len(np.unique(data.groups))} patients; split_fractions="
        f"{tuple(c.split_fractions)})"
      )
  per_split = ", ".join(f"{s} {int(np.sum(data.splits == s))}" for s in SPLITS)
  logging.info(
    f"{where}: {len(data.images)} images of {len(np.unique(data.groups))} patients, "
    f"{per_split}; classes {data.class_names}"
  )
  log_class_counts(data, where)
  return data
