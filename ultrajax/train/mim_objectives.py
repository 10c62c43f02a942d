"""The MIM pretraining objective: UltraMIM's views of a batch, the loss and the preview figures.

Targets (config.target): 'pixels' (MAE / UltraMIM norm-pix) or 'teacher' (URFM's feature MIM:
the decoder predicts a frozen CLIP-style teacher's tokens of the clean image at the masked
patches). The teacher is built here (a file, else randomly initialised from the seed); its
targets pass through stop_gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from ultrajax import ultramim
from ultrajax.interop import open_clip
from ultrajax.models import mae, teacher as teacher_lib, vit

TEACHER_SEED_SALT = 0x7EAC  # random teacher key = fold_in(seed key, salt): pixel runs unchanged


def patch_size_of(model_config) -> int:
  return vit.model_dims(model_config)[3]


def teacher_dims(teacher_config) -> tuple[int, int, int, int]:
  """(width, depth, heads, patch) of config.teacher (variant 'B/16' or explicit sizes)."""
  return vit.model_dims(teacher_config, "config.teacher")


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
  mean, std = np.float32(mae.IMAGENET_MEAN), np.float32(mae.IMAGENET_STD)

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
