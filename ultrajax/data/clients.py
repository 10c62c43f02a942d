"""The pretraining clients: their sources with SMAT scan-mode partners, previews, teacher caches.

`client_sources(config)` builds phantom, folder, manifest or TFDS clients from config.data, each
doubled with its SMAT partners (linear <-> convex, each convex image with its own fan) and
pooled into one client for centralized training.
"""

from __future__ import annotations

import functools
import pathlib
import time

import jax
import numpy as np
from absl import logging

from ultrajax import configlib, ultramim
from ultrajax.data import pipeline, sources as sources_lib, teacher_cache
from ultrajax.models import vit

NUM_PREVIEW = 4
_ESTIMATED_FANS: dict = {}  # image path -> its estimated Fan, or why it has none (str)


def _record_fan(record: dict):
  """(fan, valid) of a convex record: its own `fan` (phantom, manifest), else one estimated from
  the image (once per file) with the echo region as the valid pixels; None with a logged reason
  when the image is not a sector."""
  if record.get("fan"):
    return ultramim.check_fan(record["fan"], f"fan of {record.get('path', 'a record')}"), None
  path = record.get("path")
  fan = _ESTIMATED_FANS.get(path) if path else None
  if fan is None:
    try:
      fan = ultramim.estimate_fan(record["image"])
    except ultramim.NotASector as e:
      fan = str(e)
    if path:
      _ESTIMATED_FANS[path] = fan
  if isinstance(fan, str):
    what = path or "a convex image"
    logging.log_first_n(
      logging.WARNING, f"SMAT: {what} gets no linear partner (it stays real): {fan}", 20
    )
    return None
  return fan, ultramim.geometry.support(record["image"])


def _smat_partner(record: dict, *, fan_angle_deg, inner_radius, orientation, default_probe):
  """The other scan mode of a record (linear <-> convex), or None when its probe is unknown or
  a convex image has no fan. linear -> convex draws the configured fan (the official values);
  convex -> linear unwarps the image's own fan (never pixels from outside it)."""
  probe = record.get("probe") or default_probe
  if probe not in ("linear", "convex"):
    return None
  image = record["image"]
  if probe == "linear":
    x = (image if image.ndim == 3 else image[..., None]).astype(np.float32)[None] / 255.0
    out = ultramim.linear_to_convex(x, fan_angle_deg, inner_radius, orientation)[0] * 255.0
    out = out if image.ndim == 3 else out[..., 0]
  else:
    fan = _record_fan(record)
    if fan is None:
      return None
    out = ultramim.sector_to_linear(image, fan[0], orientation=orientation, valid=fan[1])
  partner = dict(record, image=np.clip(np.rint(out), 0, 255).astype(np.uint8))
  partner.pop("fan", None)
  partner["probe"] = "convex" if probe == "linear" else "linear"
  return partner


def client_sources(config) -> list:
  """The training clients: phantom, folder, manifest or tfds sources, with SMAT partners, pooled
  into one client when config.data.pool_clients (centralized training)."""
  d = config.data
  if d.source == "phantom" and d.get("phantom_organs"):
    # One client per organ (e.g. the transfer study's single-organ pretraining).
    n, size = d.phantom_min_images, d.phantom_image_size
    clients = [
      sources_lib.PhantomSource(organ, organ, sources_lib.ORGAN_PROBE[organ], n, size, config.seed)
      for organ in (o.strip() for o in d.phantom_organs.split(","))
      if organ
    ]
  elif d.source == "phantom":
    clients = sources_lib.default_client_sources(
      scale=d.phantom_scale,
      image_size=d.phantom_image_size,
      seed=config.seed,
      num_clients=d.num_clients,
      min_images=d.phantom_min_images,
    )
  elif d.source == "folder":
    clients = sources_lib.folder_clients(
      d.root, probe=d.probe, on_bad_image=d.on_bad_image, dicom_frames=d.dicom_frames
    )
  elif d.source == "tfds":
    from ultrajax.data.tfds import source as tfds_source  # needs the [tfds] extra

    clients = tfds_source.tfds_clients(d.tfds_name, d.tfds_data_dir, d.tfds_split)
  else:
    clients = sources_lib.manifest_clients(
      d.manifest,
      image_column=d.image_column,
      client_column=d.client_column,
      default_probe=d.probe,
      on_bad_image=d.on_bad_image,
      dicom_frames=d.dicom_frames,
    )
  if d.get("clients"):  # a subset by name (e.g. one hospital alone: jobs/benefit.py)
    keep = [n.strip() for n in d.clients.split(",") if n.strip()]
    names = [s.name for s in clients]
    configlib.check(
      all(n in names for n in keep),
      f"config.data.clients={d.clients!r} names "
      f"{[n for n in keep if n not in names]}, not among the clients {names}",
    )
    clients = [s for s in clients if s.name in keep]
  if d.fraction < 1:
    clients = [sources_lib.fraction_of(s, d.fraction, config.seed) for s in clients]
  u = config.ultramim
  if u.smat and u.smat_ratio > 0:
    clients = [
      pipeline.ScanModePartners(
        s,
        functools.partial(
          _smat_partner,
          fan_angle_deg=u.fan_angle_deg,
          inner_radius=u.inner_radius,
          orientation=u.smat_orientation,
          default_probe=s.probe or d.probe,
        ),
        ratio=u.smat_ratio,
        seed=config.seed,
      )
      for s in clients
    ]
  if d.pool_clients:
    clients = [sources_lib.PooledSource(clients)]
  return clients


def smat_pairs(clients, k: int = NUM_PREVIEW, tries: int = 8) -> list:
  """Up to k (source image, SMAT partner image, (source caption, partner caption)), the first
  converted record of each client with SMAT partners (pooled clients: of each pooled source)."""
  pairs = []
  for source in (s for c in clients for s in getattr(c, "sources", [c])):
    of = getattr(source, "of", ())  # pipeline.ScanModePartners: partner j converts of[j]
    for j in range(min(len(of), tries)):
      if len(pairs) == k:
        return pairs
      real, partner = source.source[int(of[j])], source[len(source.source) + j]
      if partner["probe"] != real["probe"]:
        pairs.append(
          (real["image"], partner["image"], (f"{source.name} {real['probe']}", partner["probe"]))
        )
        break
  return pairs


def preview_images(clients, image_size: int) -> np.ndarray:
  """A fixed [NUM_PREVIEW, S, S, 3] uint8 batch (first record of the first clients) for PNGs."""
  picks = [(c % len(clients), c // len(clients)) for c in range(NUM_PREVIEW)]
  rng = np.random.default_rng(0)
  return np.stack(
    [pipeline.augment(clients[c][i]["image"], rng, image_size, (1.0, 1.0), False) for c, i in picks]
  )


def cache_meta(config, clients, teacher_params) -> dict:
  """What cached targets depend on; a cache built for anything else is refused."""
  t = config.teacher
  fingerprint = float(sum(np.asarray(x, np.float64).sum() for x in jax.tree.leaves(teacher_params)))
  return dict(
    teacher={
      k: v
      for k, v in t.to_dict().items()
      if k not in ("cache_dir", "norm", "loss", "smooth_l1_beta")
    },
    teacher_param_sum=fingerprint,
    image_size=config.model.image_size,
    student_grid=config.model.image_size // vit.model_dims(config.model)[3],
    clients=[[c.name, len(c)] for c in clients],
    data=config.data.to_dict(),
    smat=config.ultramim.smat,
    seed=config.seed,
  )


def teacher_batches(config, clients, teacher_params, targets):
  """Opens (building on first use, by process 0) the teacher cache; returns CachedBatches.
  targets: (teacher params, images uint8 [B, S, S, 3]) -> teacher tokens [B, N, D]."""
  t = config.teacher
  directory = pathlib.Path(t.cache_dir)
  meta = cache_meta(config, clients, teacher_params)
  if not directory.exists() and jax.process_index() == 0:
    t0 = time.perf_counter()
    teacher_cache.build(
      directory,
      clients,
      config.model.image_size,
      functools.partial(targets, teacher_params),
      meta,
      dtype=t.cache_dtype,
    )
    logging.info("Built the teacher cache %s in %.1f s.", directory, time.perf_counter() - t0)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("teacher cache")
  teacher_cache.check_meta(directory, meta)
  logging.info("Teacher targets from the cache %s (fixed views).", directory)
  return teacher_cache.CachedBatches(
    directory,
    [c.name for c in clients],
    config.data.batch_size,
    seed=config.seed,
    num_threads=config.data.num_threads,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
