"""MAE / UltraMIM pretraining across clients: federated (UltraFedFM) or centralized.

The script, in order:
  1. check the config; build the mesh, the client sources (phantom | folder | manifest, each
     doubled with its SMAT scan-mode partners) and their Grain pipelines;
  2. build the MAE and its per-client AdamW states, sharded by the config's rules;
  3. resume: own workdir checkpoint -> config.init_from -> scratch;
  4. each round: broadcast the server params to the C clients; run every client's local
     epoch as compiled chunks of K steps (vmap over clients of a scan over steps; clients
     with fewer steps are masked); aggregate with weights n_k / n; log, draw, checkpoint.
Centralized training is the same program with every image in one client.

Targets (config.target): 'pixels' (MAE / UltraMIM norm-pix) or 'teacher' (URFM's feature MIM:
the decoder predicts a frozen CLIP-style teacher's tokens of the clean image at the masked
patches). The teacher's parameters are an input of the compiled chunk, never trained: they are
not in the optimizer or client states and its targets pass through stop_gradient. With
config.teacher.cache_dir and a fixed-view schedule the targets are computed once, stored with
the fixed views (data/teacher_cache.py) and read with each batch instead.

A round's K-step chunk is the unit of compilation: a real round (an epoch of every client)
cannot sit on device at once, so C, K and the batch are static and the round loops over
chunks on the host. Every random draw comes from key(seed, round, client, step), and the data
order from the Grain iterators saved in each checkpoint, so a resumed run is bitwise equal
to an uninterrupted one.
"""

from __future__ import annotations

import functools
import math
import os
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import parameter_overview, periodic_actions
from flax import nnx

from ultrajax import configlib, ultramim
from ultrajax.data import dicom, pipeline, sources as sources_lib, teacher_cache
from ultrajax.eval import evaluators
from ultrajax.fed import aggregate, participation, rounds, strategies
from ultrajax.fed.strategies import Server
from ultrajax.interop import load as interop_load, open_clip
from ultrajax.models import mae, teacher as teacher_lib, vit
from ultrajax.train import (
  checkpoint,
  divergence,
  loop,
  optimizer,
  perf,
  resume,
  sharding,
  timing,
  writers,
)
from ultrajax.viz import attention as attention_viz, features as feature_viz, reconstruction

NUM_PREVIEW = 4
TARGETS = ("pixels", "teacher")
# Every registered strategy but SplitAVG (it needs a model split into client and server parts).
STRATEGIES = tuple(n for n in strategies.STRATEGIES if n != "splitavg")
# Fault injection for tests: 'R,J' SIGKILLs this process after chunk J of round R (1-based), e.g.
# mid-round while the last checkpoint is still being written, as a crash or a preempted VM would.
KILL_AT_ENV = "ULTRAJAX_KILL_AT"
TEACHER_SEED_SALT = 0x7EAC  # random teacher key = fold_in(seed key, salt): pixel runs unchanged


# ----------------------------------------------------------------------------- config
def validate(config) -> None:
  """Fails at start-up naming the first field whose value cannot work."""
  c = configlib
  c.check_choice(config, "model.dtype", vit.DTYPES)
  c.check_choice(config, "model.attention_impl", vit.ATTENTION_IMPLS)
  c.check_choice(config, "model.remat", vit.REMATS)
  c.check_choice(config, "model.scan_layers", (False, True))
  # 0 masks nothing: the loss over masked patches is 0/0 (NaN).
  c.check_range(config, "model.mask_ratio", 0.0, 1.0, low_inclusive=False, high_inclusive=False)
  c.check_choice(config, "ultramim.tgm_mode", ultramim.MODES)
  c.check_choice(config, "ultramim.smat_orientation", ultramim.ORIENTATIONS)
  c.check_range(config, "ultramim.smat_ratio", 0.0)
  c.check_range(config, "data.fraction", 0.0, 1.0, low_inclusive=False)
  for name in ("p_clean", "p_each", "salt_pepper_density"):
    c.check_range(config, f"ultramim.{name}", 0.0, 1.0)
  c.check_choice(config, "data.source", ("phantom", "folder", "manifest", "tfds"))
  dicom.check_rule(config.data.dicom_frames)
  c.check_choice(config, "data.on_bad_image", ("skip", "raise"))
  c.check_choice(config, "data.probe", ("", "linear", "convex"))
  c.check_range(config, "data.batch_size", 1)
  c.check_range(config, "data.worker_count", 0)
  c.check_range(config, "data.num_clients", 1, len(sources_lib.DEFAULT_CLIENTS))
  validate_fed(config)
  c.check_range(config, "fed.num_rounds", 1)
  c.check_range(config, "fed.local_epochs", 1)
  c.check_range(config, "fed.chunk_steps", 1)
  c.check_range(config, "fed.lanes", 0)
  c.check_choice(config, "optim.weight_decay_on", ("mae", "all"))
  c.check_range(config, "optim.warmup_rounds", 0)
  c.check_range(config, "optim.base_lr", 0.0, low_inclusive=False)
  c.check_range(config, "optim.min_lr", 0.0)
  resume.validate(config)
  for name in ("log_every_rounds", "image_every_rounds", "ckpt_every_rounds", "keep_checkpoints"):
    c.check_range(config, name, 1)
  c.check_range(config, "attention_every_rounds", 0)
  if config.data.source == "folder":
    c.check(bool(config.data.root), "config.data.root must name a folder when data.source='folder'")
  if config.data.source == "manifest":
    c.check(
      bool(config.data.manifest),
      "config.data.manifest must name a CSV file when data.source='manifest'",
    )
  if config.data.source == "tfds":
    c.check(
      bool(config.data.tfds_name.strip(" ,")),
      "config.data.tfds_name must name prepared TFDS dataset(s) when data.source='tfds'",
    )
  lo, hi = config.data.crop_scale
  c.check(
    0 < lo <= hi <= 1,
    f"config.data.crop_scale={tuple(config.data.crop_scale)} is not 0 < low <= high <= 1",
  )
  c.check_choice(config, "target", TARGETS)
  if config.target == "teacher":
    validate_teacher(config)
  else:
    c.check(
      config.model.get("pred_dim", 0) == 0,
      f"config.model.pred_dim={config.model.pred_dim} is for feature targets; pixel targets need 0",
    )


def validate_fed(config) -> None:
  """The strategy, its options and the participation fields of config.fed."""
  f = config.fed
  configlib.check_choice(config, "fed.strategy", STRATEGIES)
  make_strategy(config)
  try:
    participation.check(f.clients_per_round, f.sampling, f.dropout)
  except ValueError as e:
    raise configlib.ConfigError(f"config.fed.{e}") from None


def make_strategy(config):
  """config.fed.strategy with config.fed.strategy_options ('name=value, ...' Python literals)."""
  f = config.fed
  try:
    return strategies.make_strategy(f.strategy, **strategies.parse_options(f.strategy_options))
  except ValueError as e:
    raise configlib.ConfigError(
      f"config.fed.strategy_options={f.strategy_options!r} (strategy {f.strategy!r}): {e}"
    ) from None


def teacher_dims(teacher_config) -> tuple[int, int, int, int]:
  """(width, depth, heads, patch) of config.teacher (variant 'B/16' or explicit sizes)."""
  return vit.model_dims(teacher_config, "config.teacher")


def teacher_token_width(teacher_config) -> int:
  return teacher_config.embed_dim if teacher_config.project else teacher_dims(teacher_config)[0]


def validate_teacher(config) -> None:
  c, t = configlib, config.teacher
  if t.variant:
    try:
      vit.parse_variant(t.variant)
    except ValueError as e:
      raise configlib.ConfigError(f"config.teacher.variant: {e}") from None
  else:
    for name in ("width", "depth", "num_heads", "patch_size"):
      c.check(
        isinstance(t[name], int) and t[name] > 0,
        f"config.teacher.{name}={t[name]!r} must "
        "be a positive integer when config.teacher.variant is ''",
      )
  width, depth, heads, patch = teacher_dims(t)
  c.check(width % heads == 0, f"config.teacher width {width} is not divisible by {heads} heads")
  c.check(
    t.image_size > 0 and t.image_size % patch == 0,
    f"config.teacher.image_size={t.image_size} is not a positive multiple of the teacher "
    f"patch size {patch}",
  )
  c.check_range(config, "teacher.block", 0, depth)
  c.check_range(config, "teacher.embed_dim", 0)
  c.check(
    not t.project or t.embed_dim > 0,
    "config.teacher.project=True needs config.teacher.embed_dim > 0 (the projection)",
  )
  c.check_choice(config, "teacher.norm", mae.FEATURE_NORMS)
  c.check_choice(config, "teacher.loss", mae.FEATURE_LOSSES)
  c.check_choice(config, "teacher.align", teacher_lib.ALIGN_MODES)
  if "tower" in t:  # set by configs/pretrain_urfm.py; other configs build BiomedCLIP's ('timm')
    c.check_choice(config, "teacher.tower", tuple(teacher_lib.TOWERS))
  c.check_choice(config, "teacher.dtype", vit.DTYPES)
  c.check_choice(config, "teacher.cache_dtype", teacher_cache.DTYPES)
  c.check_range(config, "teacher.smooth_l1_beta", 0.0, low_inclusive=False)
  tokens = teacher_token_width(t)
  c.check(
    config.model.get("pred_dim", 0) == tokens,
    f"config.model.pred_dim={config.model.get('pred_dim', 0)} must equal the teacher's "
    f"token width {tokens} (teacher width, or teacher.embed_dim with teacher.project)",
  )
  student_grid = config.model.image_size // patch_size_of(config.model)
  try:
    teacher_lib.check_alignable(t.image_size // patch, student_grid, t.align)
  except ValueError as e:
    raise configlib.ConfigError(f"config.teacher.align={t.align!r}: {e}") from None
  if t.file:
    c.check(pathlib.Path(t.file).is_file(), f"config.teacher.file={t.file!r}: no such file")
  if t.cache_dir:
    c.check(
      tuple(config.data.crop_scale) == (1.0, 1.0) and not config.data.hflip,
      "config.teacher.cache_dir needs a fixed-view schedule: set "
      "config.data.crop_scale=(1.0, 1.0) and config.data.hflip=False",
    )


# ----------------------------------------------------------------------------- data
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
    logging.log_first_n(
      logging.WARNING,
      "SMAT: %s gets no linear partner (it stays real): %s",
      20,
      path or "a convex image",
      fan,
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
    clients = [
      sources_lib.PhantomSource(
        organ,
        organ,
        sources_lib.ORGAN_PROBE[organ],
        d.phantom_min_images,
        d.phantom_image_size,
        config.seed,
      )
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
      pipeline.with_scan_mode_partners(
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
    clients = [sources_lib.pooled(clients)]
  return clients


def smat_pairs(clients, k: int = NUM_PREVIEW, tries: int = 8) -> list:
  """Up to k (source image, SMAT partner image, (source caption, partner caption)), the first
  converted record of each client with SMAT partners (pooled clients: of each pooled source)."""
  pairs = []
  for source in (s for c in clients for s in getattr(c, "sources", [c])):
    of = getattr(source, "of", ())  # pipeline.with_scan_mode_partners: partner j converts of[j]
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


# ----------------------------------------------------------------------------- model
def patch_size_of(model_config) -> int:
  return vit.model_dims(model_config)[3]


def mim_views(images, mask_key, corrupt_key, config):
  """UltraMIM's inputs.  images: uint8 [B, S, S, 3] -> clean [B, S, S, 3] in [0, 1], the
  encoder input (MIC-corrupted clean image) and the TGM mask [B, N] from the clean texture."""
  m, u = config.model, config.ultramim
  clean = images.astype(jnp.float32) / 255.0
  mask = ultramim.tgm_mask(
    mask_key, ultramim.texture_scores(clean, patch_size_of(m)), m.mask_ratio, u.tgm_mode
  )
  encoder_input = ultramim.corrupt(corrupt_key, clean, u) if u.mic else clean
  return clean, encoder_input, mask


def build_teacher(config, seed_key):
  """(graphdef, pure-dict params) of the frozen teacher: config.teacher.file, else a randomly
  initialised one from the seed (with a warning: its targets carry no pretrained knowledge)."""
  t = config.teacher
  width, depth, heads, patch = teacher_dims(t)
  make = lambda key: teacher_lib.Teacher(
    width=width,
    depth=depth,
    num_heads=heads,
    patch_size=patch,
    image_size=t.image_size,
    embed_dim=t.embed_dim,
    dtype=vit.DTYPES[t.dtype],
    tower=t.get("tower", "timm"),
    rngs=nnx.Rngs(key),
  )
  if t.file:
    abstract = nnx.eval_shape(lambda: make(0))
    graphdef, _ = nnx.split(abstract, nnx.Param)
    return graphdef, open_clip.load_teacher(t.file, abstract)
  logging.warning(
    "config.teacher.file is empty: the teacher is a RANDOMLY INITIALISED %d-block, %d-wide "
    "ViT (patch %d, %d px), not BiomedCLIP. Its targets carry no pretrained knowledge; set "
    "config.teacher.file to a BiomedCLIP (open_clip) or timm ViT file for real URFM.",
    depth,
    width,
    patch,
    t.image_size,
  )
  graphdef, params = nnx.split(make(jax.random.fold_in(seed_key, TEACHER_SEED_SALT)), nnx.Param)
  return graphdef, nnx.to_pure_dict(params)


def teacher_targets(teacher_graphdef, teacher_params, clean, config):
  """clean: [B, S, S, 3] in [0, 1] -> stop-gradient teacher tokens [B, N, D] on the student grid."""
  t = config.teacher
  return teacher_lib.targets(
    nnx.merge(teacher_graphdef, teacher_params),
    clean,
    student_grid=config.model.image_size // patch_size_of(config.model),
    block=t.block,
    final_norm=t.final_norm,
    project=t.project,
    align=t.align,
  )


def make_loss_fn(graphdef, config, teacher_graphdef=None, teacher_params=None):
  """loss_fn(params, batch, key) -> (loss, None). UltraMIM's views of the batch's images (TGM
  mask from the clean image's texture, MIC-corrupted encoder input); then either norm-pix MSE
  on the masked patches of the clean image, or (config.target='teacher') the feature loss to
  the teacher's tokens of the clean image. batch: images uint8 [B, S, S, 3], or with a teacher
  cache {'images': ..., 'teacher': [B, N, D]}."""
  m, t = config.model, config.get("teacher")
  patch = patch_size_of(m)
  feature_target = config.get("target", "pixels") == "teacher"

  def loss_fn(params, batch, key):
    model = nnx.merge(graphdef, params)
    images = batch["images"] if isinstance(batch, dict) else batch
    k_mask, k_mic, k_drop = jax.random.split(key, 3)
    clean, encoder_input, mask = mim_views(images, k_mask, k_mic, config)
    pred = model(mae.normalize(encoder_input), mask, key=k_drop if m.drop_path_rate > 0 else None)
    if not feature_target:
      loss, _ = mae.mae_loss(pred, mae.normalize(clean), mask, patch, m.norm_pix_loss)
      return loss, None
    if isinstance(batch, dict):
      target = jax.lax.stop_gradient(batch["teacher"].astype(jnp.float32))
    else:
      target = teacher_targets(teacher_graphdef, teacher_params, clean, config)
    loss, _ = mae.feature_loss(
      pred, target, mask, norm=t.norm, loss=t.loss, smooth_l1_beta=t.smooth_l1_beta
    )
    return loss, None

  return loss_fn


def make_feature_preview_fn(graphdef, teacher_graphdef, config):
  """(teacher params, params, images uint8, key) -> clean, encoder input, mask, per-patch
  cosine similarity [B, N] of prediction and normalised teacher target."""
  t = config.teacher

  def preview(teacher_params, params, images, key):
    model = nnx.merge(graphdef, params)
    clean, encoder_input, mask = mim_views(images, *jax.random.split(key), config)
    pred = model(mae.normalize(encoder_input), mask)
    target = teacher_targets(teacher_graphdef, teacher_params, clean, config)
    unit = lambda x: mae.normalize_features(x, "l2")
    target = mae.normalize_features(target, t.norm)
    return clean, encoder_input, mask, jnp.sum(unit(pred) * unit(target), axis=-1)

  return preview


def make_preview_fn(graphdef, config):
  """(params, images uint8 [B,S,S,3], key) -> clean, encoder input, mask, reconstruction.

  With norm-pix targets the prediction is in per-patch normalised units; as MAE's demo does,
  it is mapped back with the true patch's mean and variance for display only.
  """
  m = config.model
  patch = patch_size_of(m)
  mean, std = jnp.asarray(mae.IMAGENET_MEAN), jnp.asarray(mae.IMAGENET_STD)

  def preview(params, images, key):
    model = nnx.merge(graphdef, params)
    clean, encoder_input, mask = mim_views(images, *jax.random.split(key), config)
    pred = model(mae.normalize(encoder_input), mask)
    target = mae.patchify(mae.normalize(clean), patch)
    if m.norm_pix_loss:
      mu = target.mean(-1, keepdims=True)
      var = target.var(-1, keepdims=True, ddof=1)
      pred = pred * jnp.sqrt(var + 1e-6) + mu
    pred = jnp.where(mask[..., None], pred, target)
    h, w = clean.shape[1:3]
    recon = mae.unpatchify(pred, patch, h, w) * std + mean
    return clean, encoder_input, mask, recon

  return preview


# ----------------------------------------------------------------------------- run
class Programs:
  """The compiled pieces of a round, with explicit shardings and donated round state.

  C clients train on L lanes (rounds.py): lane trees have a leading [L] axis, the clients'
  optimizer states a leading [C] axis; both are sharded over the mesh's 'clients' axis.
  """

  def __init__(
    self,
    config,
    mesh,
    graphdef,
    abstract_params,
    tx,
    num_clients,
    num_lanes,
    teacher=None,
    cached=False,
    strategy=None,
  ):
    """teacher: (graphdef, pure-dict params) of the frozen teacher for config.target='teacher'
    (its params become a replicated, non-donated input of the chunk); cached: batches are
    {'images', 'teacher'} dicts from a teacher cache; strategy: the federated strategy
    (default: config.fed.strategy). Pretraining has no model state: Server(params, {})."""
    self.strategy = strategy = strategy or make_strategy(config)
    rules = [tuple(r) for r in config.sharding_rules]
    stacked = lambda n: jax.eval_shape(
      functools.partial(aggregate.broadcast, num_clients=n), abstract_params
    )
    self.server_sharding = sharding.tree_shardings(abstract_params, mesh, rules, False)
    self.client_sharding = sharding.tree_shardings(stacked(num_clients), mesh, rules, True)
    self.abstract_opt = jax.eval_shape(jax.vmap(tx.init), stacked(num_clients))
    self.opt_sharding = sharding.tree_shardings(self.abstract_opt, mesh, rules, True)
    self.abstract_strategy = jax.eval_shape(
      lambda p: strategy.init(p, num_clients, {}), abstract_params
    )
    self.strategy_sharding = rounds.state_shardings(self.abstract_strategy, mesh, rules)
    abstract_lanes = jax.eval_shape(
      lambda p, o, s: rounds.start_round(strategy, Server(p, {}), o, s, num_clients, num_lanes),
      abstract_params,
      self.abstract_opt,
      self.abstract_strategy,
    )
    lanes = lambda tree: sharding.tree_shardings(tree, mesh, rules + [(".*", "replicated")], True)
    self.state_sharding = rounds.LaneState(
      params=lanes(abstract_lanes.params),
      model_state={},
      opt_state=lanes(abstract_lanes.opt_state),
      ctx=lanes(abstract_lanes.ctx),
      client_opt_state=self.opt_sharding,
      strategy_state=self.strategy_sharding,
      acc=rounds.state_shardings(abstract_lanes.acc, mesh, rules),
    )
    self.vector = sharding.client_vector_sharding(mesh)  # [L, ...] plan arrays
    self.replicated = rep = sharding.replicated(mesh)
    server = Server(self.server_sharding, {})

    m = config.model
    self.init_params = jax.jit(
      lambda key: nnx.to_pure_dict(nnx.state(mae.mae_from_config(m, nnx.Rngs(key)), nnx.Param)),
      out_shardings=self.server_sharding,
    )
    self.init_opt = jax.jit(
      lambda server: jax.vmap(tx.init)(aggregate.broadcast(server, num_clients)),
      in_shardings=(self.server_sharding,),
      out_shardings=self.opt_sharding,
    )
    self.init_strategy = jax.jit(
      lambda p: strategy.init(p, num_clients, {}),
      in_shardings=(self.server_sharding,),
      out_shardings=self.strategy_sharding,
    )
    self._start_round = jax.jit(
      lambda p, o, s: rounds.start_round(strategy, Server(p, {}), o, s, num_clients, num_lanes),
      in_shardings=(self.server_sharding, self.opt_sharding, self.strategy_sharding),
      out_shardings=self.state_sharding,
      donate_argnums=(1, 2),
    )
    self._finish_round = jax.jit(
      lambda state, p, key: rounds.finish_round(strategy, state, Server(p, {}), key),
      in_shardings=(self.state_sharding, self.server_sharding, rep),
      out_shardings=(server, self.opt_sharding, self.strategy_sharding),
      donate_argnums=(0,),
    )

    o = config.optim
    self.lr_fn = functools.partial(
      optimizer.warmup_cosine,
      peak_lr=optimizer.peak_lr(o, config.data.batch_size),
      min_lr=o.min_lr,
      warmup=o.warmup_rounds,
      total=config.fed.num_rounds,
    )
    self.batch_sharding = sharding.batch_sharding(mesh, 6)
    if cached:
      self.batch_sharding = dict(
        images=self.batch_sharding, teacher=sharding.batch_sharding(mesh, 5)
      )
    plan_sharding = rounds.RoundPlan(*[self.vector] * 4)
    # Frozen inputs: the teacher's params (an empty dict for pixel targets), replicated.
    teacher_graphdef, teacher_params = teacher or (None, {})
    self.frozen = loop.put_global(teacher_params, rep)

    def chunk(frozen, params, *args):
      loss_fn = rounds.without_model_state(make_loss_fn(graphdef, config, teacher_graphdef, frozen))
      state, metrics = rounds.make_chunk(loss_fn, tx, strategy, self.lr_fn, config.on_nonfinite)(
        Server(params, {}), *args
      )
      return state, metrics["loss"], metrics["grad_norm"]

    self.chunk = jax.jit(
      chunk,
      in_shardings=(
        rep,
        self.server_sharding,
        self.state_sharding,
        self.batch_sharding,
        plan_sharding,
        rep,
        rep,
        rep,
        rep,
      ),
      out_shardings=(self.state_sharding, self.vector, self.vector),
      donate_argnums=(2,),
    )
    self.param_norm = jax.jit(optax.global_norm, out_shardings=rep)
    # Replicated output: process 0 writes the PNG even when params are sharded across hosts.
    if teacher is None:
      self.preview = jax.jit(make_preview_fn(graphdef, config), out_shardings=rep)
    else:
      self.preview = functools.partial(
        jax.jit(make_feature_preview_fn(graphdef, teacher_graphdef, config), out_shardings=rep),
        self.frozen,
      )
    self._compiled_chunk = None
    self.chunk_flops = None

  def start_round(self, params, opt_state, strategy_state=None):
    """Lane state for a round from the server params, the clients' optimizer states and the
    strategy state (a fresh one when None, as benchmarks start); donates the last two."""
    if strategy_state is None:
      strategy_state = self.init_strategy(params)
    return self._start_round(params, opt_state, strategy_state)

  def finish_round(self, state, params, round_key=None):
    """(server params, clients' optimizer states, strategy state) after the round's last chunk."""
    key = jax.random.key(0) if round_key is None else round_key
    server, opt_state, strategy_state = self._finish_round(state, params, key)
    return server.params, opt_state, strategy_state

  def run_chunk(self, *args):
    """Compiles on first use (keeping XLA's FLOP count for MFU), then runs asynchronously."""
    if self._compiled_chunk is None:
      t0 = time.perf_counter()
      self._compiled_chunk = self.chunk.lower(self.frozen, *args).compile()
      flops = perf.compiled_flops(self._compiled_chunk)
      # XLA's cost analysis counts a scan's body once; the chunk runs it K times.
      steps = jax.tree.leaves(args[2])[0].shape[1]
      self.chunk_flops = flops * steps if flops else None
      logging.info(
        "Compiled the round chunk in %.1f s (%s GFLOP per call per device).",
        time.perf_counter() - t0,
        f"{self.chunk_flops / 1e9:.1f}" if self.chunk_flops else "?",
      )
    return self._compiled_chunk(self.frozen, *args)


def _global_batch(local, shardings):
  """This process's batch (an array, or a dict of arrays for cached targets) -> global arrays."""
  return jax.tree.map(sharding.global_batch, local, shardings)


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
    student_grid=config.model.image_size // patch_size_of(config.model),
    clients=[[c.name, len(c)] for c in clients],
    data=config.data.to_dict(),
    smat=config.ultramim.smat,
    seed=config.seed,
  )


def _teacher_data(config, clients, teacher):
  """Opens (building on first use, by process 0) the teacher cache; returns CachedBatches."""
  t = config.teacher
  directory = pathlib.Path(t.cache_dir)
  meta = cache_meta(config, clients, teacher[1])
  if not directory.exists() and jax.process_index() == 0:
    targets = jax.jit(
      lambda params, images: teacher_targets(
        teacher[0], params, images.astype(jnp.float32) / 255.0, config
      )
    )
    t0 = time.perf_counter()
    teacher_cache.build(
      directory,
      clients,
      config.model.image_size,
      functools.partial(targets, teacher[1]),
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


def _resume_or_init(config, ckpt, programs, data, seed_key):
  """(first round to run, server params, dict(opt=client optimizer states, strategy=state))."""
  abstract_params = jax.eval_shape(programs.init_params, seed_key)
  like_params = checkpoint.abstract_like(abstract_params, programs.server_sharding)
  like_train = dict(
    opt=checkpoint.abstract_like(programs.abstract_opt, programs.opt_sharding),
    strategy=checkpoint.abstract_like(programs.abstract_strategy, programs.strategy_sharding),
  )

  def init():
    params = programs.init_params(seed_key)
    if config.init_from:
      # An ultrajax workdir/checkpoint, or an official-MAE / timm file (.pth, .safetensors);
      # an encoder-only file keeps the freshly initialised decoder.
      abstract_model = nnx.eval_shape(lambda: mae.mae_from_config(config.model, nnx.Rngs(0)))
      params = interop_load.load_init_params(
        config.init_from, abstract_model, base_params=params, target=like_params
      )
      logging.info("Initialised from %s.", config.init_from)
    return params, dict(opt=programs.init_opt(params), strategy=programs.init_strategy(params))

  return loop.resume_or_init(ckpt, like_params, like_train, init, config=config, data_iterator=data)


def run(config: ml_collections.ConfigDict, workdir: str, *, stop_after_rounds: int | None = None):
  """Trains to config.fed.num_rounds, resuming from workdir. Returns the server params.

  stop_after_rounds: return after that round as if the process were killed there (no extra
  checkpoint) — lets tests check that resuming reproduces an uninterrupted run.
  One process per workdir: a second one stops at the workdir lock (train/resume.py).
  """
  validate(config)
  with resume.WorkdirLock(workdir):
    return _run(config, pathlib.Path(workdir), stop_after_rounds)


def _run(config, workdir: pathlib.Path, stop_after_rounds: int | None):
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh.clients, config.mesh.data)
  logging.info("Mesh: %s", dict(mesh.shape))
  probes = evaluators.for_pretraining(config, mesh)  # None when config.evals are all off

  clients = client_sources(config)
  num_clients, batch = len(clients), config.data.batch_size
  configlib.check(
    num_clients % mesh.shape["clients"] == 0,
    f"{num_clients} clients do not divide over config.mesh.clients={mesh.shape['clients']}",
  )
  configlib.check(
    batch % mesh.shape["data"] == 0,
    f"config.data.batch_size={batch} is not divisible by the mesh's data axis "
    f"({mesh.shape['data']} devices)",
  )
  image_size = config.model.image_size
  seed_key = jax.random.key(config.seed)
  teacher, cached = None, False
  if config.target == "teacher":
    teacher = build_teacher(config, seed_key)
    cached = bool(config.teacher.cache_dir)
    logging.info(
      "Feature targets: teacher block %s%s, %s-normalised, %s loss, %s alignment, %s.",
      config.teacher.block or "last",
      " + final norm" * config.teacher.final_norm,
      config.teacher.norm,
      config.teacher.loss,
      config.teacher.align,
      "cached" if cached else "computed in the step",
    )
  if cached:
    data = _teacher_data(config, clients, teacher)
  else:
    data = pipeline.ClientBatches(
      clients,
      batch,
      image_size,
      seed=config.seed,
      crop_scale=tuple(config.data.crop_scale),
      hflip=config.data.hflip,
      num_threads=config.data.num_threads,
      worker_count=config.data.get("worker_count", 0),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
  steps_per_round = data.steps_per_epoch * config.fed.local_epochs
  f = config.fed
  lanes_axis = mesh.shape["clients"]
  # At most as many lanes as a round can have clients (sampled rounds hold fewer).
  most = (
    num_clients
    if f.sampling == "poisson"
    else participation.count(f.clients_per_round, num_clients)
  )
  num_lanes = f.lanes or min(
    rounds.auto_lanes(steps_per_round, lanes_axis), math.ceil(most / lanes_axis) * lanes_axis
  )
  configlib.check(
    num_lanes % mesh.shape["clients"] == 0,
    f"config.fed.lanes={num_lanes} is not a multiple of config.mesh.clients="
    f"{mesh.shape['clients']}",
  )
  # The fewest chunks of at most fed.chunk_steps steps that cover the round, as equal as
  # possible so the last chunk is not mostly idle padding.
  length = rounds.plan_round(steps_per_round, num_lanes, 1).client_ids.shape[1]
  chunk_steps = math.ceil(length / math.ceil(length / config.fed.chunk_steps))
  plan = rounds.plan_round(steps_per_round, num_lanes, chunk_steps)
  try:
    strategy = make_strategy(config).for_run(num_clients, f.clients_per_round, f.sampling)
  except ValueError as e:
    raise configlib.ConfigError(f"config.fed.strategy={f.strategy!r}: {e}") from None
  weights = strategy.client_weights(data.num_images)
  for c, source in enumerate(clients):
    logging.info(
      "client %2d %-28s %7d images (SMAT pairs included) %4d steps/round weight %.4f",
      c,
      source.name,
      data.num_images[c],
      steps_per_round[c],
      weights[c],
    )
  logging.info(
    "%d clients on %d lanes: %d steps per round, %.0f%% of lane steps busy.",
    num_clients,
    num_lanes,
    plan.client_ids.shape[1],
    100 * (plan.client_ids >= 0).mean(),
  )

  with jax.set_mesh(mesh):
    model_key, train_key, preview_key = jax.random.split(seed_key, 3)
    abstract_model = nnx.eval_shape(lambda: mae.mae_from_config(config.model, nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    abstract_params = nnx.to_pure_dict(abstract_params)
    tx = optimizer.adamw(config.optim, abstract_params)
    programs = Programs(
      config,
      mesh,
      graphdef,
      abstract_params,
      tx,
      num_clients,
      num_lanes,
      teacher=teacher,
      cached=cached,
      strategy=strategy,
    )

    ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
    start, params, train = _resume_or_init(config, ckpt, programs, data, model_key)
    writer = writers.create_writer(workdir)
    if jax.process_index() == 0:
      writers.truncate_jsonl(workdir / "metrics.jsonl", start)
    parameter_overview.log_parameter_overview(params)
    if start == 0:
      writer.write_hparams(config.to_dict())  # nested: TensorBoard gets 'model.width', ...
      if probes:  # random init: the baseline the later rounds' figures are read against
        writer.write_scalars(0, dict(round=0, **probes.at_round(params, 0)))
    progress = periodic_actions.ReportProgress(num_train_steps=config.fed.num_rounds, every_steps=1)
    lr_fn = programs.lr_fn
    preview = preview_images(clients, image_size)
    # The encoder's last-block cls attention per head on the clean preview images (UltraFedFM
    # Figs. 7-8), every attention_every_rounds rounds (0 = never).
    attention_maps = jax.jit(
      lambda p, x: nnx.merge(graphdef, p).encoder.attention_maps(
        mae.normalize(x.astype(jnp.float32) / 255.0)
      ),
      out_shardings=programs.replicated,
    )
    pairs = smat_pairs(clients) if start == 0 and jax.process_index() == 0 else []
    if pairs:
      reconstruction.save_pairs(
        workdir / "images" / "smat_pairs.png", pairs, title="SMAT scan-mode partners"
      )
    weights_dev = loop.put_global(weights, programs.replicated)
    steps_dev = loop.put_global(steps_per_round.astype(np.float32), programs.replicated)
    meta = dict(process_count=jax.process_count(), config=config.to_json_best_effort())
    partial = f.sampling == "poisson" or f.clients_per_round != 0 or f.dropout > 0
    last = (
      config.fed.num_rounds
      if stop_after_rounds is None
      else min(config.fed.num_rounds, stop_after_rounds)
    )

    clock = timing.CompileClock()
    kill_at = tuple(int(x) for x in os.environ.get(KILL_AT_ENV, "0,0").split(","))
    for r in range(start, last):
      why = strategy.stop_reason(r)
      if why:  # e.g. the privacy budget: keep round r's state and end the run cleanly
        logging.warning("Stopping before round %d: %s", r + 1, why)
        if r > 0 and ckpt.latest_step() != r:
          ckpt.save(r, params, train, data, dict(meta, round=r))
        break
      t0 = timing.now()
      round_key = rounds.round_key(train_key, r)
      # Every round, the first after a resume included: the clients' optimizer states that
      # round r starts from do not depend on where the run stopped.
      if f.reset_client_optimizer:
        train["opt"] = programs.init_opt(params)
      drawn = participation.draw(
        data.num_images, r, config.seed, f.clients_per_round, f.sampling, f.dropout
      )
      plan = rounds.plan_round(steps_per_round * drawn.participants, num_lanes, chunk_steps)
      state = programs.start_round(params, train["opt"], train["strategy"])
      round_index = loop.put_global(np.int32(r), programs.replicated)
      losses, grad_norms = [np.zeros((num_lanes, 0))], [np.zeros((num_lanes, 0))]
      for j in range(plan.client_ids.shape[1] // chunk_steps):
        p = plan.chunk(j, chunk_steps)
        # Loading the next chunk overlaps with the device still running the previous one.
        images = _global_batch(data.next_batches(p.client_ids), programs.batch_sharding)
        state, chunk_losses, chunk_norms = programs.run_chunk(
          params,
          state,
          images,
          loop.put_global(p, programs.vector),
          steps_dev,
          weights_dev,
          round_index,
          round_key,
        )
        losses.append(chunk_losses)
        grad_norms.append(chunk_norms)
        if (r + 1, j + 1) == kill_at:
          os.kill(os.getpid(), signal.SIGKILL)
      params, train["opt"], train["strategy"] = programs.finish_round(state, params, round_key)
      losses = np.concatenate([np.asarray(x) for x in jax.device_get(losses)], axis=1)
      grad_norms = np.concatenate([np.asarray(x) for x in jax.device_get(grad_norms)], axis=1)
      seconds = timing.now() - t0
      # Throughput leaves compilation out (the first round of a run compiles its programs).
      compiling = clock.seconds_between(t0, t0 + seconds)
      running = max(seconds - compiling, 1e-9)
      done = r + 1
      try:  # a non-finite step stops the run here (or, 'skip', is left out of the means)
        valid = divergence.screen(
          losses,
          plan.client_ids >= 0,
          where=f"round {done}",
          mode=config.on_nonfinite,
          describe=lambda i: f"client {plan.client_ids[i]} local step {plan.step_ids[i]}",
        )
      except divergence.DivergenceError:
        ckpt.close()  # the last good checkpoint may still be being written
        writer.close()
        raise
      losses = np.where(valid, losses, 0.0)
      busy = max(int(valid.sum()), 1)  # a sampled round may have no client at all
      loss = float(losses.sum() / busy)
      evaluated = probes.at_round(params, done) if probes else {}

      if loop.itstime(done, config.log_every_rounds, last):
        per_client = rounds.client_losses(losses, np.where(valid, plan.client_ids, -1), num_clients)
        # Mean global gradient norm of the round's client steps, and the new server params' norm.
        grad_norm = float(np.where(valid, grad_norms, 0.0).sum() / busy)
        scalars = dict(
          round=done,
          loss=loss,
          lr=float(lr_fn(done)),
          img_per_s=int((plan.client_ids >= 0).sum()) * batch / running,
          s_per_round=seconds,
          grad_norm=grad_norm,
          param_norm=float(programs.param_norm(params)),
        )
        if compiling > 0:
          scalars["compile_s"] = compiling
        if config.on_nonfinite == "skip":
          scalars["skipped_steps"] = int((plan.client_ids >= 0).sum() - valid.sum())
        scalars.update(
          {f"loss/client_{c:02d}": float(per_client[c]) for c in np.flatnonzero(drawn.participants)}
        )
        if partial:  # who took part is also in the log line below
          scalars.update(clients=int(drawn.participants.sum()), dropped=int(drawn.dropped.sum()))
        if programs.chunk_flops:
          # Idle lane steps are computed too: this is what the hardware did.
          tflops = programs.chunk_flops * plan.client_ids.shape[1] / chunk_steps / running / 1e12
          scalars["tflops_per_device"] = tflops
          if perf.mfu(tflops * 1e12) is not None:
            scalars["mfu"] = perf.mfu(tflops * 1e12)
        scalars.update(strategy.report(train["strategy"], done))
        scalars.update(evaluated)
        writer.write_scalars(done, scalars)
        logging.info(
          "round %d/%d  loss %.4f  %.1f img/s  %.2f s/round%s%s",
          done,
          config.fed.num_rounds,
          loss,
          scalars["img_per_s"],
          seconds,
          f" ({compiling:.1f} s compiling)" if compiling > 0 else "",
          f"  clients {np.flatnonzero(drawn.participants).tolist()} dropped "
          f"{np.flatnonzero(drawn.dropped).tolist()}"
          if partial
          else "",
        )
      elif evaluated:
        writer.write_scalars(done, dict(round=done, **evaluated))
      progress(done)

      if loop.itstime(done, config.image_every_rounds, config.fed.num_rounds):
        shown = programs.preview(params, preview, preview_key)
        if jax.process_index() == 0:
          save = reconstruction.save_grid if teacher is None else feature_viz.save_similarity_grid
          png = workdir / "images" / f"round_{done:05d}.png"
          save(
            png,
            *[np.asarray(x) for x in jax.device_get(shown)],
            patch_size=patch_size_of(config.model),
            title=f"round {done}, loss {loss:.4f}",
          )
          writer.write_images(done, {"reconstructions": writers.png_image(png)})
      if loop.itstime(done, config.attention_every_rounds, config.fed.num_rounds):
        maps = np.asarray(jax.device_get(attention_maps(params, preview)))
        if jax.process_index() == 0:
          attention_viz.save_attention(
            workdir / "attention" / f"round_{done:05d}.png",
            preview,
            maps,
            title=f"round {done}: last block, cls attention",
          )
      if loop.itstime(done, config.ckpt_every_rounds, config.fed.num_rounds):
        ckpt.save(done, params, train, data, dict(meta, round=done))
    if probes and jax.process_index() == 0:
      logging.info(
        "Evaluators, first and last round logged:\n%s",
        evaluators.summary(writers.read_jsonl(workdir / "metrics.jsonl")),
      )
    writer.flush()
    clock.close()
    ckpt.close()
    data.close()
  return params
