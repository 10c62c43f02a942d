"""Precomputed teacher targets for fixed-view schedules (URFM feature MIM without the teacher
forward in the training step).

With a fixed view (the whole image resized to the model's size, no random crop or flip), a
record's teacher tokens never change, so they are computed once and read back with the image.
Layout of a cache folder (one pair per client, row i = record i of that client's source):

  meta.json                      what the targets depend on (teacher, block, grids, data ...)
  client_000_images.npy          uint8   [n_0, S, S, 3]  the fixed views
  client_000_teacher.npy         float16 [n_0, N, D]     teacher tokens aligned to the student
                                                         grid, before target normalisation
Plain .npy rather than ArrayRecord: every record has the same shape, so a memory map gives
random access without per-record serialisation or decoding, and any numpy can read it. The
folder is written under a temporary name and renamed, so an interrupted build leaves no cache.
Batches come from per-client Grain pipelines with the same epoch shuffle and per-process
slicing as the augmenting pipeline (data/pipeline.py), and checkpoint the same way.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Callable

import grain
import numpy as np
from absl import logging

from ultrajax import configlib
from ultrajax.data import pipeline

META = "meta.json"
DTYPES = ("float16", "float32")


def fixed_view(image: np.ndarray, image_size: int) -> np.ndarray:
  """The whole image resized (bicubic) to [S, S, 3] uint8; grey replicated to 3 channels."""
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  return pipeline.resize_rgb(image, image_size)


def _files(directory: pathlib.Path, client: int) -> tuple[pathlib.Path, pathlib.Path]:
  return (
    directory / f"client_{client:03d}_images.npy",
    directory / f"client_{client:03d}_teacher.npy",
  )


def build(
  directory,
  sources: list,
  image_size: int,
  targets_fn: Callable[[np.ndarray], np.ndarray],
  meta: dict,
  *,
  batch_size: int = 64,
  dtype: str = "float16",
) -> pathlib.Path:
  """Writes the cache of `sources` to `directory` (which must not exist).

  targets_fn: uint8 [b, S, S, 3] -> [b, N, D] teacher targets (b <= batch_size; the last
  batch of a client is padded to batch_size so one compiled program serves all).
  """
  directory = pathlib.Path(directory)
  if dtype not in DTYPES:
    raise ValueError(f"cache dtype {dtype!r} is not one of {DTYPES}")
  tmp = directory.with_name(directory.name + ".partial")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  for k, source in enumerate(sources):
    n = len(source)
    images = np.lib.format.open_memmap(
      _files(tmp, k)[0], "w+", np.uint8, (n, image_size, image_size, 3)
    )
    feats = None
    for start in range(0, n, batch_size):
      stop = min(start + batch_size, n)
      batch = np.zeros((batch_size, image_size, image_size, 3), np.uint8)
      for i in range(start, stop):
        batch[i - start] = fixed_view(source[i]["image"], image_size)
      out = np.asarray(targets_fn(batch))[: stop - start]
      if feats is None:
        feats = np.lib.format.open_memmap(_files(tmp, k)[1], "w+", dtype, (n, *out.shape[1:]))
      images[start:stop] = batch[: stop - start]
      feats[start:stop] = out.astype(dtype)
    images.flush()
    feats.flush()
    logging.info(
      f"teacher cache: client {k} {source.name!r}, {n} images, targets {feats.shape[1:]} {dtype}"
    )
    del images, feats
  (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
  tmp.rename(directory)
  return directory


def check_meta(directory, meta: dict) -> None:
  """Raises ValueError naming every field where the cache was built for something else."""
  directory = pathlib.Path(directory)
  path = directory / META
  if not path.is_file():
    raise ValueError(
      f"{directory} exists but is not a teacher cache (no {META}); remove it "
      "or point config.teacher.cache_dir elsewhere"
    )
  stored = configlib.flatten(json.loads(path.read_text()))
  meta = configlib.flatten(json.loads(json.dumps(meta)))  # tuples -> lists, as stored
  diff = [
    f"{k}: cache has {stored.get(k)!r}, this run {meta.get(k)!r}"
    for k in sorted(set(stored) | set(meta))
    if stored.get(k) != meta.get(k)
  ]
  if diff:
    raise ValueError(
      f"teacher cache {directory} was built for another setting; remove it or "
      "use another config.teacher.cache_dir:\n  " + "\n  ".join(diff)
    )


class CacheSource:
  """Random access to one client's cached records: {'images': [S,S,3], 'teacher': [N,D]}."""

  def __init__(self, directory, client: int, name: str = ""):
    image_file, feature_file = _files(pathlib.Path(directory), client)
    self.images = np.load(image_file, mmap_mode="r")
    self.teacher = np.load(feature_file, mmap_mode="r")
    self.name = name or f"cache client {client}"

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict:
    return dict(images=np.asarray(self.images[index]), teacher=np.asarray(self.teacher[index]))


class CachedBatches(pipeline.ClientBatches):
  """`pipeline.ClientBatches` over a teacher cache: `next_batches(client_ids)` gives
  {'images': uint8 [L, K, B_local, S, S, 3], 'teacher': [L, K, B_local, N, D]}.

  Same stream semantics (epoch shuffle from (seed, client), drop-last batches, per-process
  slices) and the same checkpointable state, without augmentation (fixed views).
  """

  def __init__(
    self,
    directory,
    names: list[str],
    batch_size: int,
    *,
    seed: int,
    num_threads: int = 8,
    process_index: int = 0,
    process_count: int = 1,
  ):
    sources = [CacheSource(directory, k, name) for k, name in enumerate(names)]
    self.num_images, self.steps_per_epoch, local = pipeline.epoch_layout(
      sources, batch_size, process_count
    )
    self.local_batch_size = local
    self.image_size = sources[0].images.shape[1]
    self.feature_shape = sources[0].teacher.shape[1:]
    self.feature_dtype = sources[0].teacher.dtype
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=num_threads)
    iterators = []
    for k, source in enumerate(sources):
      ds = pipeline._EpochShuffle(grain.MapDataset.source(source), (seed, k))
      ds = ds.batch(local, drop_remainder=True)[process_index::process_count]
      iterators.append(iter(ds.to_iter_dataset(options)))
    self._start(iterators)  # ClientBatches' own set-up augments

  def _zeros(self, shape: tuple[int, int]) -> dict:
    s, b = self.image_size, self.local_batch_size
    return dict(
      images=np.zeros((*shape, b, s, s, 3), np.uint8),
      teacher=np.zeros((*shape, b, *self.feature_shape), self.feature_dtype),
    )
