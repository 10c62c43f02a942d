"""`bench pipeline`: host input pipeline img/s at 224 px, ultrajax next to the official MAE one.

Three rows per worker count W (W = 0: no worker processes, the loading process's threads):
  - ultrajax, JPEG folder: data/pipeline.py's ClientBatches on a folder source (decode, MAE's
    RandomResizedCrop + flip) with W Grain worker processes;
  - official MAE, JPEG folder: torchvision ImageFolder + RandomResizedCrop(224, scale=(0.2, 1),
    interpolation=3) + RandomHorizontalFlip + ToTensor + Normalize (MAE's main_pretrain.py) in
    a torch DataLoader with num_workers=W, shuffled, drop_last;
  - ultrajax, phantom: the same pipeline on phantom records drawn on the fly (no files).
The folder is written once per run to a temporary directory: phantom images saved as JPEG.
The first max(W, 1) batches (each worker's start-up: workers take batches in turn) are left
out of each figure. img/s per core divides by min(max(W, 1), cores); img/CPU-s divides by the
CPU time that the loading process and its worker processes used while timed (all their
threads: ultrajax's Grain threads and PyTorch's intra-op threads count too).
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import time

import psutil
from PIL import Image

from ultrajax.data import pipeline, sources

IMAGE_SIZE = 224
MAE_MEAN, MAE_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_jpeg_folder(
  root: pathlib.Path, num_images: int, size: int, seed: int = 0
) -> pathlib.Path:
  """root/phantom/{i:05d}.jpg: num_images mixed-organ phantom images of size x size (quality 90),
  in ImageFolder's layout (one class folder) and ultrajax's (one client folder)."""
  folder = root / "phantom"
  folder.mkdir(parents=True, exist_ok=True)
  source = sources.PhantomSource("phantom", sources.MIXED, "", num_images, size, seed)
  for i in range(num_images):
    image = source[i]["image"]
    Image.fromarray(image).convert("RGB").save(folder / f"{i:05d}.jpg", quality=90)
  return root


def _tree_cpu_s() -> float:
  """CPU seconds (user + system) used so far by this process and its live descendants."""
  total = 0.0
  for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
    try:
      t = p.cpu_times()
    except psutil.NoSuchProcess:
      continue
    total += t.user + t.system
  return total


def _time_batches(iterator, batch: int, num_batches: int, warmup: int = 1) -> tuple[float, float]:
  """(img/s, images per CPU-second) over num_batches batches after `warmup` start-up ones."""
  for _ in range(warmup):
    next(iterator)
  t0, cpu0 = time.perf_counter(), _tree_cpu_s()
  for _ in range(num_batches):
    next(iterator)
  images = batch * num_batches
  return images / (time.perf_counter() - t0), images / max(_tree_cpu_s() - cpu0, 1e-9)


def ultrajax_img_per_s(
  source, workers: int, batch: int, num_batches: int, threads: int
) -> tuple[float, float]:
  """(img/s, img per CPU-second) of data/pipeline.py's ClientBatches on `source`."""
  data = pipeline.ClientBatches(
    [source], batch, IMAGE_SIZE, seed=0, num_threads=threads, worker_count=workers
  )
  try:
    return _time_batches(data, batch, num_batches, max(workers, 1))
  finally:
    data.close()


def torch_img_per_s(
  root: pathlib.Path, workers: int, batch: int, num_batches: int
) -> tuple[float, float]:
  """(img/s, img per CPU-second) of MAE's pretraining input pipeline (main_pretrain.py's
  transform_train and DataLoader)."""
  import torch
  from torchvision import datasets, transforms

  transform = transforms.Compose(
    [
      transforms.RandomResizedCrop(IMAGE_SIZE, scale=(0.2, 1.0), interpolation=3),
      transforms.RandomHorizontalFlip(),
      transforms.ToTensor(),
      transforms.Normalize(mean=MAE_MEAN, std=MAE_STD),
    ]
  )
  dataset = datasets.ImageFolder(str(root), transform=transform)
  # Persistent workers: the folder is a few batches long, and MAE's epochs (ImageNet) are long
  # enough that its workers' start at each epoch is negligible; here it would be timed.
  loader = torch.utils.data.DataLoader(
    dataset,
    batch_size=batch,
    shuffle=True,
    num_workers=workers,
    drop_last=True,
    persistent_workers=workers > 0,
  )

  def forever():
    while True:
      yield from loader

  return _time_batches(forever(), batch, num_batches, max(workers, 1))


def bench_pipeline(
  workers: list[int],
  *,
  num_images: int = 256,
  stored_size: int = 320,
  batch: int = 32,
  num_batches: int = 8,
  threads: int = 0,
  torch_peer: bool = True,
) -> list[dict]:
  """Rows of dict(pipeline, workers, img_per_s, per_core, per_cpu_s); prints them as they
  come."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  threads = threads or cores
  rows = []
  print(
    f"# pipeline benchmark: {IMAGE_SIZE} px output, batch {batch}, {num_batches} timed "
    f"batches after one per worker (at least one), {num_images} JPEGs of {stored_size} px "
    f"(phantom), {cores} cores, {threads} threads per ultrajax loader"
  )
  print(f"{'pipeline':<30}{'workers':>8}{'img/s':>10}{'img/s/core':>12}{'img/CPU-s':>11}")
  with tempfile.TemporaryDirectory() as tmp:
    root = write_jpeg_folder(pathlib.Path(tmp), num_images, stored_size)
    folder = sources.folder_clients(str(root))[0]
    drawn = sources.PhantomSource("phantom", sources.MIXED, "", num_images, stored_size, 0)
    have_torch = torch_peer
    for w in workers:  # the runs are called within the iteration: w is this worker count
      ours = lambda source: ultrajax_img_per_s(source, w, batch, num_batches, threads)
      runs = [("ultrajax, JPEG folder", lambda: ours(folder))]
      if have_torch:
        peer = lambda: torch_img_per_s(root, w, batch, num_batches)
        runs.append(("official MAE, JPEG folder", peer))
      runs.append(("ultrajax, phantom", lambda: ours(drawn)))
      for name, run in runs:
        try:
          img_per_s, per_cpu_s = run()
        except ImportError as e:
          print(f"official MAE peer skipped: {e} (install the torch extra)")
          have_torch = False
          continue
        per_core = img_per_s / min(max(w, 1), cores)
        rows.append(
          dict(
            pipeline=name, workers=w, img_per_s=img_per_s, per_core=per_core, per_cpu_s=per_cpu_s
          )
        )
        print(f"{name:<30}{w:>8}{img_per_s:>10.1f}{per_core:>12.1f}{per_cpu_s:>11.1f}", flush=True)
  return rows


def default_workers() -> list[int]:
  """0 (threads only), then 1, 2, 4, ... up to the cores."""
  return [0] + [2**i for i in range((os.cpu_count() or 1).bit_length())]
