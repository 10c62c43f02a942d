"""Start-up checks of a pretraining config (configs/pretrain_*.py) and the strategy it names.

`validate` fails at start-up naming the first field whose value cannot work; the job, the
benchmarks (bench/) and the Flower site (fl/site.py) all check a pretraining config with it.
"""

from __future__ import annotations

import pathlib

from ultrajax import configlib, ultramim
from ultrajax.data import dicom, sources as sources_lib, teacher_cache
from ultrajax.fed import participation, protected, strategies
from ultrajax.models import mae, teacher as teacher_lib, vit
from ultrajax.train import mim_objectives, resume

TARGETS = ("pixels", "teacher")
# Every registered strategy but SplitAVG (it needs a model split into client and server parts).
STRATEGIES = tuple(n for n in strategies.STRATEGIES if n != "splitavg")


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
  c.check_range(config, "profile_round", 0)
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


def check_layout(config, mesh, num_clients: int, clients: str) -> None:
  """The clients and the batch divide over the mesh; clients: how the message names them."""
  configlib.check(
    num_clients % mesh.shape["clients"] == 0,
    f"{clients} do not divide over config.mesh.clients={mesh.shape['clients']}",
  )
  batch = config.data.batch_size
  configlib.check(
    batch % mesh.shape["data"] == 0,
    f"config.data.batch_size={batch} is not divisible by the mesh's data axis "
    f"({mesh.shape['data']} devices)",
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
    strategy = strategies.make_strategy(f.strategy, **strategies.parse_options(f.strategy_options))
  except ValueError as e:
    raise configlib.ConfigError(
      f"config.fed.strategy_options={f.strategy_options!r} (strategy {f.strategy!r}): {e}"
    ) from None
  return protected.wrap(strategy, config)  # config.dp_sgd, config.fed.attack (simulation)


def validate_teacher(config) -> None:
  c, t = configlib, config.teacher
  width, depth, heads, patch = mim_objectives.teacher_dims(t)  # names a bad variant or size
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
  tokens = t.embed_dim if t.project else width
  c.check(
    config.model.get("pred_dim", 0) == tokens,
    f"config.model.pred_dim={config.model.get('pred_dim', 0)} must equal the teacher's "
    f"token width {tokens} (teacher width, or teacher.embed_dim with teacher.project)",
  )
  student_grid = config.model.image_size // mim_objectives.patch_size_of(config.model)
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
