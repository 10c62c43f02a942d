"""Instance segmentation data for SAM training: COCO json files, the phantom, TFDS masks.

A raw record (what a source returns) is one image and its instances:
  image         uint8 [H, W] (grey) or [H, W, 3]
  masks         uint8 [N, H, W] in {0, 1}, one per instance
  category_ids  int [N]: COCO category ids (for the phantom 1 = organ, 2 = lesion)
  classes       int [N]: an instance's class for prompted classification (the phantom's lesion
                label, 1 benign / 2 malignant; 0 = none; COCO: optional `class_label` per annotation)
  image_id, file_name
`prepare` pads it to static shapes, so one compiled program serves every image.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Sequence

import grain
import numpy as np
import skimage.measure
from absl import logging
from PIL import Image
from pycocotools import mask as mask_utils

from ultrajax.data import pipeline, sources, tasks
from ultrajax.models import sam as sam_lib

PHANTOM_CATEGORIES = ({"id": 1, "name": "organ"}, {"id": 2, "name": "lesion"})


class InstanceDataError(ValueError):
  """A COCO file, annotation or image that cannot be used; the message names it."""


def phantom_record(image_id: int, generated: dict) -> dict:
  """A phantom.generate dict -> raw record: the organ, and the lesion when there is one."""
  masks, cats, classes = [], [], []
  if generated["organ_mask"].any():
    masks.append(generated["organ_mask"]), cats.append(1), classes.append(0)
  if generated["lesion_mask"].any():
    masks.append(generated["lesion_mask"]), cats.append(2), classes.append(generated["label"])
  size = generated["image"].shape
  return dict(
    image=generated["image"],
    masks=np.stack(masks) if masks else np.zeros((0, *size), np.uint8),
    category_ids=np.asarray(cats, np.int32),
    classes=np.asarray(classes, np.int32),
    image_id=image_id,
    file_name=f"{generated['organ']}_{generated['probe']}_{image_id:06d}.png",
  )


class PhantomInstances:
  """`num_images` phantom images of mixed organs and probes; record i depends only on
  (seed, name, i), so 'train' and 'test' sources with different names never share an image."""

  categories = PHANTOM_CATEGORIES

  def __init__(self, name: str, num_images: int, image_size: int, seed: int):
    self._source = sources.PhantomSource(name, sources.MIXED, "", num_images, image_size, seed)
    self.name = name
    # Generating is the slow part; small sets (CPU presets, tests) are kept in memory.
    self._cache = {} if num_images * image_size**2 <= 2**26 else None

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    if self._cache is not None and i in self._cache:
      return self._cache[i]
    record = phantom_record(i, self._source[i])
    if self._cache is not None:
      self._cache[i] = record
    return record


def _decode_segmentation(seg, height: int, width: int, where: str) -> np.ndarray:
  """COCO polygon list, uncompressed RLE or compressed RLE -> uint8 [H, W]."""
  if isinstance(seg, list):
    if not seg or any(len(p) < 6 or len(p) % 2 for p in seg):
      raise InstanceDataError(f"{where}: polygon segmentation needs lists of >= 3 (x, y) pairs")
    rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
  elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
    if list(seg["size"]) != [height, width]:
      raise InstanceDataError(
        f"{where}: mask size {list(seg['size'])} (h, w) differs from the "
        f"image size {[height, width]}"
      )
    rle = mask_utils.frPyObjects(seg, height, width) if isinstance(seg["counts"], list) else seg
  else:
    raise InstanceDataError(
      f"{where}: 'segmentation' is neither a polygon list nor an RLE dict with 'counts' and 'size'"
    )
  return mask_utils.decode(rle)


class CocoInstances:
  """Instances from a COCO json file; images decoded on access.

  image_root: where `file_name`s are relative to (default: the json file's folder). Every image
  file and every annotation's image_id is checked at construction, so a broken file fails
  before training starts, naming the json and the annotation or image at fault.
  """

  def __init__(self, json_path: str, image_root: str | None = None):
    self.json_path = str(json_path)
    self.name = os.path.basename(self.json_path)
    try:
      with open(self.json_path) as f:
        data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise InstanceDataError(f"cannot read COCO file {self.json_path}: {e}") from e
    for key in ("images", "annotations", "categories"):
      if key not in data:
        raise InstanceDataError(f"{self.json_path}: no '{key}' list (not a COCO instances file)")
    root = image_root or os.path.dirname(os.path.abspath(self.json_path))
    self.categories = tuple(
      {"id": int(c["id"]), "name": str(c["name"])} for c in data["categories"]
    )
    known_cats = {c["id"] for c in self.categories}
    self.images = list(data["images"])
    by_id = {}
    for img in self.images:
      where = f"{self.json_path}: image id {img.get('id')!r}"
      for key in ("id", "file_name", "height", "width"):
        if key not in img:
          raise InstanceDataError(f"{where} has no '{key}'")
      img["path"] = os.path.join(root, img["file_name"])
      if not os.path.isfile(img["path"]):
        raise InstanceDataError(f"{where}: image file {img['path']} does not exist")
      by_id[img["id"]] = []
    for ann in data["annotations"]:
      where = f"{self.json_path}: annotation id {ann.get('id')!r}"
      if ann.get("image_id") not in by_id:
        raise InstanceDataError(
          f"{where} points to image_id {ann.get('image_id')!r}, which is not in 'images'"
        )
      if ann.get("category_id") not in known_cats:
        raise InstanceDataError(
          f"{where} has category_id {ann.get('category_id')!r}, which is not in 'categories'"
        )
      if "segmentation" not in ann:
        raise InstanceDataError(f"{where} has no 'segmentation'")
      by_id[ann["image_id"]].append(ann)
    self._annotations = [by_id[img["id"]] for img in self.images]

  def __len__(self) -> int:
    return len(self.images)

  def category_ids_of(self, i: int) -> np.ndarray:
    return np.asarray([a["category_id"] for a in self._annotations[i]], np.int32)

  def __getitem__(self, i: int) -> dict:
    img, anns = self.images[int(i)], self._annotations[int(i)]
    where = f"{self.json_path}: image id {img['id']!r}"
    try:
      image = sources.decode_image(img["path"])
    except sources.BadImageError as e:
      raise InstanceDataError(f"{where}: {e}") from e
    h, w = int(img["height"]), int(img["width"])
    if image.shape[:2] != (h, w):
      raise InstanceDataError(
        f"{where}: {img['path']} is {image.shape[0]}x{image.shape[1]} (h x w) but the json says "
        f"{h}x{w}"
      )
    masks = [
      _decode_segmentation(
        a["segmentation"], h, w, f"{self.json_path}: annotation id {a.get('id')!r}"
      )
      for a in anns
    ]
    return dict(
      image=image,
      masks=np.stack(masks) if masks else np.zeros((0, h, w), np.uint8),
      category_ids=self.category_ids_of(i),
      classes=np.asarray([a.get("class_label", 0) for a in anns], np.int32),
      image_id=img["id"],
      file_name=img["file_name"],
    )


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
  """uint8 [H, W] -> COCO polygons [[x0, y0, x1, y1, ...], ...] around each component.

  Contours at level 0.5 of the zero-padded mask run between pixel centres; pycocotools puts
  pixel (i, j) on the square [j, j + 1) x [i, i + 1), so they shift by half a pixel. Rasterised
  back, they give the same pixels up to a rim where the contour cuts corners diagonally.
  """
  padded = np.pad(mask.astype(np.float32), 1)
  polygons = []
  for contour in skimage.measure.find_contours(padded, 0.5):
    if len(contour) < 3:
      continue
    xy = contour[:, ::-1] - 0.5  # (row, col) of the padded mask -> (x, y) of the image
    polygons.append([round(float(v), 2) for v in xy.reshape(-1)])
  return polygons


def write_coco(
  json_path: str,
  records: Sequence[dict],
  categories: Sequence[dict],
  mask_format: str = "rle",
  image_dir: str = "images",
) -> str:
  """Writes records as PNGs under `<json folder>/<image_dir>` and a COCO instances json.

  mask_format: 'rle' (compressed, exact) or 'polygon'. Instances keep their `classes` as
  `class_label`. Returns json_path. Shows the format ultrajax reads (docs/formats.md).
  """
  if mask_format not in ("rle", "polygon"):
    raise ValueError(f"mask_format={mask_format!r} is not 'rle' or 'polygon'")
  folder = os.path.dirname(os.path.abspath(json_path))
  os.makedirs(os.path.join(folder, image_dir), exist_ok=True)
  images, annotations = [], []
  for record in records:
    file_name = os.path.join(image_dir, record["file_name"])
    Image.fromarray(record["image"]).save(os.path.join(folder, file_name))
    h, w = record["image"].shape[:2]
    images.append(dict(id=int(record["image_id"]), file_name=file_name, height=h, width=w))
    for mask, cat, cls in zip(record["masks"], record["category_ids"], record["classes"]):
      rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
      if mask_format == "rle":
        seg = dict(size=[int(s) for s in rle["size"]], counts=rle["counts"].decode("ascii"))
      else:
        seg = mask_to_polygons(mask)
      annotations.append(
        dict(
          id=len(annotations) + 1,
          image_id=int(record["image_id"]),
          category_id=int(cat),
          segmentation=seg,
          area=float(mask_utils.area(rle)),
          bbox=[float(v) for v in mask_utils.toBbox(rle)],
          iscrowd=0,
          class_label=int(cls),
        )
      )
  with open(json_path, "w") as f:
    json.dump(dict(images=images, annotations=annotations, categories=list(categories)), f)
  return json_path


def mask_instances(mask: np.ndarray, mode: str = "binary") -> tuple[np.ndarray, np.ndarray]:
  """A segmentation mask [H, W] -> (instance masks uint8 [N, H, W], category ids int32 [N]).

  binary: each 8-connected component of mask > 0 is an instance of category 1; class_ids: each
  class id > 0 present is one instance (category = the id). An empty mask gives N = 0. The box
  prompt comes from each instance's mask, as for COCO instances.
  """
  if mode == "binary":
    labels, n = skimage.measure.label(mask > 0, connectivity=2, return_num=True)
    values, ids = np.arange(1, n + 1), np.ones(n, np.int32)
  elif mode == "class_ids":
    labels = np.asarray(mask)
    values = np.unique(labels[labels > 0])
    ids = values.astype(np.int32)
  else:
    raise InstanceDataError(f"mask mode {mode!r} is not one of {tasks.MASK_MODES}")
  return (labels[None] == values[:, None, None]).astype(np.uint8), ids


class TfdsInstances:
  """Records `indices` of a prepared TFDS dataset (data/tfds/source.py TfdsSource) with their
  mask's instances (mask_instances, binary: the builders publish binary masks) of one category
  named after the dataset; an instance's class is its image's label's index in `classes` + 1
  (prompted classification), or 0 where the dataset has no labels."""

  def __init__(self, client, indices, classes: Sequence[str], name: str):
    if not client.has_mask:
      raise InstanceDataError(f"TFDS dataset {client.name!r} has no masks, so no instances")
    self.client, self.indices, self.classes, self.name = client, list(indices), list(classes), name
    self.categories = ({"id": 1, "name": client.name},)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    record = self.client[self.indices[int(i)]]
    masks, cats = mask_instances(record["lesion_mask"])
    cls = self.classes.index(record["label"]) + 1 if "label" in record else 0
    return dict(
      image=record["image"],
      masks=masks,
      category_ids=cats,
      classes=np.full(len(cats), cls, np.int32),
      image_id=self.indices[int(i)],
      file_name=record["path"],
    )


def tfds_instances(
  name: str, data_dir: str, split: str, test_fraction: float, seed: int
) -> tuple[TfdsInstances, TfdsInstances]:
  """(train, test) TfdsInstances of one prepared dataset, split by patient_id (test_fraction
  of the patients, seeded: data/tasks.py split_by_group); classes: its labels, sorted."""
  from ultrajax.data.tfds import source as tfds_source  # needs the [tfds] extra

  client = tfds_source.TfdsSource(name, data_dir, split)
  meta = [(r["patient_id"], r.get("label")) for r in map(client.__getitem__, range(len(client)))]
  groups = np.array([g for g, _ in meta])
  classes = sorted({label for _, label in meta if label is not None})
  splits = tasks.split_by_group(groups, (1.0 - test_fraction, 0.0, test_fraction), seed)
  return tuple(
    TfdsInstances(client, np.nonzero(splits == s)[0], classes, f"{name}_{s}")
    for s in ("train", "test")
  )


def _resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 [H, W] or [H, W, 3] -> [height, width] bilinear (PIL)."""
  return np.asarray(Image.fromarray(array).resize((width, height), Image.Resampling.BILINEAR))


def prepare(record: dict, size: int, max_instances: int, hflip: bool = False) -> dict:
  """A raw record -> static shapes for the model.

  Returns image uint8 [S, S, 3] (long side resized to S = size, zero padding bottom/right),
  masks uint8 [M, S, S] (bilinear then rounded, as the official pipeline), valid bool [M],
  category_ids / classes int32 [M] (0 where padded), hw int32 [2] (the resized image's extent).
  More than M = max_instances instances: the first M are kept.
  """
  image = tasks.to_rgb(record["image"])
  height, width = image.shape[:2]
  masks = record["masks"][:max_instances]
  if masks.shape[1:] != (height, width):
    raise InstanceDataError(
      f"image {record.get('file_name')!r}: masks are {masks.shape[1:]} but "
      f"the image is {(height, width)}"
    )
  h, w = sam_lib.preprocess_shape(height, width, size)
  # hflip mirrors the image's extent only, so the padding stays bottom/right.
  columns = slice(None, None, -1 if hflip else 1)
  out_image = np.zeros((size, size, 3), np.uint8)
  out_image[:h, :w] = _resize(image, h, w)[:, columns]
  out_masks = np.zeros((max_instances, size, size), np.uint8)
  for j, m in enumerate(masks):
    out_masks[j, :h, :w] = (_resize(m.astype(np.uint8) * 255, h, w) >= 128)[:, columns]
  n = len(masks)
  pad = lambda x: np.pad(np.asarray(x[:n], np.int32), (0, max_instances - n))
  return dict(
    image=out_image,
    masks=out_masks,
    valid=(np.arange(max_instances) < n) & out_masks.reshape(max_instances, -1).any(-1),
    category_ids=pad(record["category_ids"]),
    classes=pad(record["classes"]),
    hw=np.asarray([h, w], np.int32),
  )


class InstanceDataset:
  """A source restricted to some categories, without images that have no instance left.

  keep_categories / drop_categories: category names (at most one of them non-empty); the
  zero-shot protocol trains with drop=(target,) and evaluates with keep=(target,).
  `skipped_images` counts the images left out; `record(i)` is raw (for evaluation at the
  original resolution), `example(i)` prepared.
  """

  def __init__(
    self,
    source,
    size: int,
    max_instances: int,
    *,
    keep_categories: Sequence[str] = (),
    drop_categories: Sequence[str] = (),
  ):
    if keep_categories and drop_categories:
      raise ValueError("give keep_categories or drop_categories, not both")
    names = {c["name"]: c["id"] for c in source.categories}
    for name in (*keep_categories, *drop_categories):
      if name not in names:
        raise InstanceDataError(
          f"category {name!r} is not in {source.name} (its categories: {sorted(names)})"
        )
    selected = keep_categories or [n for n in names if n not in drop_categories]
    self.category_ids = [names[n] for n in selected]
    self.source, self.size, self.max_instances = source, size, max_instances
    # A COCO source lists an image's category ids without decoding it; others build the record.
    ids_of = getattr(source, "category_ids_of", lambda i: source[i]["category_ids"])
    self.indices = [i for i in range(len(source)) if self._keep(ids_of(i)).any()]
    self.skipped_images = len(source) - len(self.indices)
    if self.skipped_images:
      logging.info(
        f"{source.name}: skipped {self.skipped_images} of {len(source)} images without "
        f"instances of categories {sorted(selected)}."
      )
    if not self.indices:
      raise InstanceDataError(f"{source.name}: no image has an instance of the selected categories")

  def _keep(self, category_ids) -> np.ndarray:
    return np.isin(np.asarray(category_ids), self.category_ids)

  def __len__(self) -> int:
    return len(self.indices)

  def record(self, i: int) -> dict:
    """Raw record i with only the selected categories' instances."""
    raw = self.source[self.indices[i]]
    keep = self._keep(raw["category_ids"])
    return dict(
      raw,
      masks=raw["masks"][keep],
      category_ids=raw["category_ids"][keep],
      classes=raw["classes"][keep],
    )

  def example(self, i: int, hflip: bool = False) -> dict:
    return prepare(self.record(i), self.size, self.max_instances, hflip)

  def batch(self, indices: Sequence[int], flips: Sequence[bool] | None = None) -> dict:
    flips = [False] * len(indices) if flips is None else flips
    examples = [self.example(i, f) for i, f in zip(indices, flips)]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def classified_instances(dataset: InstanceDataset) -> dict:
  """Every instance of `dataset` that has a class (classes > 0), for prompted classification.

  Returns images uint8 [I, S, S, 3] (each image with such an instance, once), image_index int
  [K] (the row of `images` each instance lies in), masks uint8 [K, S, S] and classes int32 [K]
  (the source's values: the phantom's 1 benign / 2 malignant, COCO's `class_label`). Instances
  past the dataset's max_instances per image are not seen.
  """
  images, image_index, masks, classes = [], [], [], []
  for i in range(len(dataset)):
    example = dataset.example(i)
    keep = np.nonzero(example["valid"] & (example["classes"] > 0))[0]
    if len(keep):
      image_index += [len(images)] * len(keep)
      images.append(example["image"])
      masks.append(example["masks"][keep])
      classes.append(example["classes"][keep])
  if not images:
    raise InstanceDataError(
      f"{dataset.source.name}: no instance of the selected categories has a class "
      "(COCO: a `class_label` > 0)"
    )
  return dict(
    images=np.stack(images),
    image_index=np.asarray(image_index),
    masks=np.concatenate(masks),
    classes=np.concatenate(classes),
  )


_FLIP = zlib.crc32(b"hflip")


def _flipped(seed: int, position: int) -> bool:
  return np.random.default_rng([seed, _FLIP, position]).random() < 0.5


def train_dataset(
  dataset: InstanceDataset,
  batch_size: int,
  seed: int,
  hflip: bool,
  *,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.MapDataset:
  """Infinite MapDataset of this process's training batches (InstanceDataset.batch's dict of
  [B_local, ...] arrays, B_local = batch_size / process_count).

  Global batch b is stream positions b*B ... b*B + B - 1; position p is image
  perm_e[p mod n] with e = p // n and perm_e the permutation drawn from (seed, e), flipped when
  hflip and the draw from (seed, 'hflip', p) is below 0.5. Process k of P takes the k-th of P
  contiguous slices of each global batch, as data/pipeline.py's client batches.
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} is not divisible by the {process_count} processes")
  local = batch_size // process_count
  ds = pipeline._EpochShuffle(grain.MapDataset.source(range(len(dataset))), (seed,))
  ds = ds.map_with_index(lambda p, i: dataset.example(i, hflip and _flipped(seed, p)))
  return ds.batch(local, drop_remainder=True)[process_index::process_count]


def train_batches(
  dataset: InstanceDataset,
  batch_size: int,
  seed: int,
  hflip: bool,
  *,
  num_threads: int,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.DatasetIterator:
  """An iterator over train_dataset's batches that reads `num_threads` batches ahead on as many
  threads. Its position (`get_state`) is saved with a checkpoint
  (grain.checkpoint.CheckpointSave), so a restored run continues with the same batches."""
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=num_threads)
  return iter(
    train_dataset(
      dataset, batch_size, seed, hflip, process_index=process_index, process_count=process_count
    ).to_iter_dataset(options)
  )
