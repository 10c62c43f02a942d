"""Host input pipeline: MAE augmentation and per-client Grain pipelines stacked into chunks.

Each client k reads its source through its own Grain pipeline:

  source -> shuffle (new permutation every epoch) -> repeat forever
         -> augment (RandomResizedCrop, flip; RNG from (seed, k, position in the stream))
         -> batches of B_local -> this process's share -> prefetching iterator

Global batch b of client k is the b-th run of `batch_size` consecutive records of k's
shuffled stream; process p of P owns its p-th contiguous slice. Every random choice depends
only on (seed, k, stream position), never on threads, prefetching or process count, so the
union over processes is the single-process batch and a restored state continues bitwise.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import operator
import sys
from collections.abc import Callable

import grain
import numpy as np
from absl import flags
from PIL import Image

from ultrajax import configlib
from ultrajax.data import sources


def random_resized_crop_params(
  rng: np.random.Generator, height: int, width: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)
):
  """torchvision's `RandomResizedCrop.get_params`, drawing from `rng`.

  Returns (top, left, h, w) of a crop inside a [height, width] image.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    # Python's round (half to even) as torchvision, so borderline sizes match.
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: the largest centred crop whose aspect ratio is inside `ratio`.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def augment(
  image: np.ndarray,
  rng: np.random.Generator,
  image_size: int,
  crop_scale=(0.2, 1.0),
  hflip: bool = True,
) -> np.ndarray:
  """MAE's training transform on the host: RandomResizedCrop (bicubic), then flip (p=0.5).

  image: uint8 [H, W] (grey), [H, W, 1] or [H, W, 3]. Returns uint8 [S, S, 3], S = image_size.
  Grey images are resized on one channel and replicated afterwards: resizing is per channel,
  so this equals MAE's `convert('RGB')` first, at a third of the cost.
  """
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.dtype != np.uint8 or not (image.ndim == 2 or image.shape[-1] == 3):
    raise ValueError(f"augment expects uint8 [H, W] or [H, W, 3], got {image.dtype} {image.shape}")
  top, left, h, w = random_resized_crop_params(rng, *image.shape[:2], scale=crop_scale)
  flip = hflip and rng.random() < 0.5
  return resize_rgb(image[top : top + h, left : left + w], image_size, flip)


def resize_rgb(image: np.ndarray, image_size: int, flip: bool = False) -> np.ndarray:
  """uint8 [H, W] or [H, W, 3] -> [S, S, 3]: resized (bicubic), mirrored when `flip`; grey is
  replicated to 3 channels after resizing."""
  out = np.asarray(
    Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BICUBIC)
  )
  if flip:
    out = out[:, ::-1]
  if out.ndim == 2:
    out = np.repeat(out[:, :, None], 3, axis=2)
  return np.ascontiguousarray(out)


class _EpochShuffle(grain.MapDataset):
  """`parent` repeated forever, epoch e in the permutation drawn from (*entropy, e).

  Does what `shuffle(seed).repeat()` does, but Grain's index_shuffle costs ~3 ms per record
  at n=16, 0.4 ms at n=100 and 30 us at n=1000 (measured, grain 0.2.18), more than the
  augmentation on small clients; a cached permutation costs O(n) once per epoch.
  """

  def __init__(self, parent: grain.MapDataset, entropy: tuple[int, ...]):
    super().__init__(parent)
    self._entropy = entropy
    self._permutations = {}

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"_EpochShuffle(entropy={self._entropy})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, i = divmod(index, len(self._parent))
    return self._parent[int(self._permutation(epoch)[i])]

  def _permutation(self, epoch: int) -> np.ndarray:
    """[n] int. Thread-safe without a lock: a race only recomputes the same permutation."""
    perm = self._permutations.get(epoch)
    if perm is None:
      perm = np.random.default_rng([*self._entropy, epoch]).permutation(len(self._parent))
      # Prefetch threads straddle a few epochs at a time; older ones are finished.
      self._permutations = {e: p for e, p in self._permutations.items() if e > epoch - 4}
      self._permutations[epoch] = perm
    return perm


def client_dataset(
  source,
  client: int,
  batch_size: int,
  image_size: int,
  *,
  seed: int,
  crop_scale=(0.2, 1.0),
  hflip: bool = True,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.MapDataset:
  """Infinite MapDataset of this process's batches of one client: uint8 [B_local, S, S, 3].

  Element b is the process_index-th of process_count slices of global batch b.
  """
  local = batch_size // process_count
  ds = _EpochShuffle(grain.MapDataset.source(source), (seed, client))
  # random_map seeds each record's RNG with its stream position, so results do not depend
  # on which thread reads it or when; its 32-bit seed is hashed from (seed, client).
  ds = ds.map(operator.itemgetter("image")).random_map(
    functools.partial(augment, image_size=image_size, crop_scale=tuple(crop_scale), hflip=hflip),
    seed=int(np.random.SeedSequence([seed, client]).generate_state(1)[0]),
  )
  # Sub-batch m covers stream positions [m * local, (m + 1) * local); global batch b is
  # sub-batches b * P .. b * P + P - 1, so this process takes every P-th from its index.
  return ds.batch(local, drop_remainder=True)[process_index::process_count]


def epoch_layout(sources, batch_size: int, process_count: int):
  """(images per client [C], drop-last steps per epoch [C], per-process batch) of clients
  that each fill at least one batch; ValueError naming the client or the batch otherwise."""
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} is not divisible by the {process_count} processes")
  num_images = np.array([len(s) for s in sources], np.int64)
  for source, n in zip(sources, num_images):
    if n < batch_size:
      raise configlib.ConfigError(
        f"client {source.name!r} has {n} images, fewer than config.data.batch_size={batch_size}"
      )
  return num_images, num_images // batch_size, batch_size // process_count


class ClientBatches(grain.DatasetIterator):
  """Per-client Grain pipelines stacked along a client axis, for federated training.

  Attributes:
    num_images: [C] int, records per client.
    steps_per_epoch: [C] int, n_k // batch_size (drop_last, as the official loaders). The
      stream itself runs on across epochs: a batch may span an epoch boundary.
    local_batch_size: batch_size // process_count images per client and step.

  A grain DatasetIterator, so `grain.checkpoint.CheckpointSave/Restore(obj)` write and read
  its state as JSON; `next(obj)` is one step of every client: uint8 [C, B_local, S, S, 3].
  """

  def __init__(
    self,
    sources: list,
    batch_size: int,
    image_size: int,
    *,
    seed: int,
    crop_scale=(0.2, 1.0),
    hflip: bool = True,
    num_threads: int = 8,
    prefetch_buffer_size: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
  ):
    """prefetch_buffer_size: batches read ahead per client; None: num_threads, which keeps
    every thread busy. Host memory ~ C * buffer * B_local * S * S * 3 bytes.

    worker_count: Grain worker processes per client (0: none, the threads of this process).
    Decoding and PIL resizing hold the GIL, so threads share one core; worker b of W makes
    the client's batches b, b + W, ... (each with num_threads threads) and Grain interleaves
    them back in order, so batches and checkpoints are those of worker_count=0. Sources and
    their records must pickle (the workers are separate processes)."""
    if not sources:
      raise ValueError("ClientBatches needs at least one source")
    if worker_count < 0:
      raise ValueError(f"worker_count={worker_count} is below 0")
    self.num_images, self.steps_per_epoch, self.local_batch_size = epoch_layout(
      sources, batch_size, process_count
    )
    self.image_size = image_size
    buffer = num_threads if prefetch_buffer_size is None else prefetch_buffer_size
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=buffer)

    def stream(k, source):
      ds = client_dataset(
        source,
        k,
        batch_size,
        image_size,
        seed=seed,
        crop_scale=crop_scale,
        hflip=hflip,
        process_index=process_index,
        process_count=process_count,
      ).to_iter_dataset(options)
      if worker_count:
        if not flags.FLAGS.is_parsed():  # Grain's workers read its absl flags (their defaults)
          flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(
          grain.MultiprocessingOptions(
            num_workers=worker_count, per_worker_buffer_size=max(buffer, 1)
          )
        )
      return iter(ds)

    self._start([stream(k, source) for k, source in enumerate(sources)])

  def _start(self, iterators: list) -> None:
    super().__init__(iterators)
    # Drains all clients at once, so no client's prefetch sits idle behind another's.
    self._pool = concurrent.futures.ThreadPoolExecutor(len(iterators), "client_batches")

  @property
  def num_clients(self) -> int:
    return len(self._parents)

  def _zeros(self, shape: tuple[int, int]):
    """Zero batches for [L, K] slots: uint8 [L, K, B_local, S, S, 3]."""
    s = self.image_size
    return np.zeros((*shape, self.local_batch_size, s, s, 3), np.uint8)

  def next_batches(self, client_ids: np.ndarray):
    """client_ids: [L, K] int (-1 = none) -> `_zeros`' [L, K, B_local, ...] filled.

    Slot (l, k) holds the next batch of client client_ids[l, k]; a client's slots are filled
    in row-major order. Slots of -1 are zeros and consume no data, so idle lane steps do not
    shift any client's stream.
    """
    self._assert_not_closed()
    client_ids = np.asarray(client_ids)
    if (
      client_ids.ndim != 2
      or client_ids.min(initial=-1) < -1
      or (client_ids.max(initial=-1) >= self.num_clients)
    ):
      raise ValueError(
        f"client_ids must be [L, K] ints in [-1, {self.num_clients}), got shape "
        f"{client_ids.shape} with values {np.unique(client_ids)[:8]}"
      )
    out = self._zeros(client_ids.shape)
    fills = [
      self._pool.submit(self._fill, self._parents[c], zip(*np.nonzero(client_ids == c)), out)
      for c in np.unique(client_ids[client_ids >= 0])
    ]
    for fill in fills:
      fill.result()
    return out

  @staticmethod
  def _fill(iterator, slots, out) -> None:
    """Writes the iterator's next batch to out[l, k] for each slot (l, k) in turn (out: an
    array, or a dict of arrays filled from the batch's entries)."""
    for slot in slots:
      batch = next(iterator)
      if isinstance(out, dict):
        for key, array in out.items():
          array[slot] = batch[key]
      else:
        out[slot] = batch

  def __next__(self) -> np.ndarray:
    return self.next_batches(np.arange(self.num_clients)[:, None])[:, 0]

  def get_state(self) -> dict:
    """JSON-serializable: each client iterator's position (its next global batch)."""
    return {"clients": [it.get_state() for it in self._parents]}

  def set_state(self, state: dict) -> None:
    clients = state["clients"]
    if len(clients) != self.num_clients:
      raise ValueError(f"state holds {len(clients)} clients, this pipeline has {self.num_clients}")
    for it, client_state in zip(self._parents, clients):
      it.set_state(client_state)

  def close(self) -> None:
    # DatasetIterator.__del__ calls close also when __init__ raised before the pool existed.
    if hasattr(self, "_pool"):
      self._pool.shutdown()
      super().close()


class ScanModePartners:
  """SMAT: the n records of source, then round(ratio * n) scan-mode partners.

  ratio is synthetic per real image (1 = UltraFedFM's 1:1): partner j converts source record
  j mod n while whole passes fit, then sources.drawn_subset(source, rest, seed), in order;
  a ratio over 1 repeats partners (the warp is deterministic), weighting them up.
  convert maps a record dict to its partner in the other scan mode (e.g. linear -> convex).
  Where it returns None (probe unknown) the partner is the record itself: the length, and so
  the shuffles, batch boundaries and client weights, stay fixed and deterministic instead of
  depending on which records happen to convert. Keeps `name`; `probe` is '' (mixed).
  """

  def __init__(
    self, source, convert: Callable[[dict], dict | None], ratio: float = 1.0, seed: int = 0
  ):
    if not ratio >= 0:
      raise ValueError(f"ratio={ratio!r} is not >= 0")
    self.source, self.convert = source, convert
    self.name, self.probe = source.name, ""
    n = len(source)
    full, rest = divmod(round(ratio * n), n)
    # partner j converts source record self.of[j]
    self.of = np.concatenate(
      [np.tile(np.arange(n), full), sources.drawn_subset(source, rest, seed)]
    ).astype(np.int64)

  def __len__(self) -> int:
    return len(self.source) + len(self.of)

  def __getitem__(self, index: int) -> dict:
    n, index = len(self.source), sources.check_index(self, index)
    if index < n:
      return self.source[index]
    record = self.source[int(self.of[index - n])]
    converted = self.convert(record)
    return record if converted is None else converted
