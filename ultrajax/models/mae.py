"""Masked autoencoder (MAE, He et al. 2022) on top of `vit.ViT`, and its norm-pix loss.

Mirrors facebookresearch/mae `models_mae.py`: the encoder sees only the visible patches (with
their fixed sin-cos positions and the cls token), a lighter decoder re-inserts a shared mask
token at the masked positions, adds its own fixed positions and predicts every patch's pixels.
Unlike MAE the mask is an input (UltraMIM's texture-guided masks come from ultrajax.ultramim).
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ultrajax import configlib
from ultrajax.models import posemb, vit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Feature targets (URFM-style MIM): per-token normalisation and loss, see `feature_loss`.
FEATURE_NORMS = ("none", "layernorm", "l2")
FEATURE_LOSSES = ("mse", "smooth_l1", "cosine")
FEATURE_LN_EPS = 1e-6  # LayerNorm without affine, eps as the ViT's
L2_EPS = 1e-12  # torch F.normalize's floor on the norm


def normalize(images01, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """images01: [..., 3] RGB in [0, 1] -> (x - mean) / std (ImageNet statistics), float32."""
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  return (jnp.asarray(images01, jnp.float32) - mean) / std


def patchify(images, p: int):
  """images: [B, H, W, C] -> [B, N, p*p*C]: patches in raster order, each flattened over
  (row in patch, column in patch, channel), MAE's 'nchpwq->nhwpqc' order."""
  return einops.rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p)


def unpatchify(x, p: int, h: int, w: int):
  """x: [B, N, p*p*C] -> images [B, h, w, C] (h, w in pixels); inverse of `patchify`."""
  return einops.rearrange(x, "b (h w) (p q c) -> b (h p) (w q) c", h=h // p, w=w // p, p=p, q=p)


def _check_mask(mask, num_patches: int, len_keep: int) -> None:
  if mask.ndim != 2 or mask.shape[1] != num_patches:
    raise ValueError(f"mask must be [B, {num_patches}] (True = masked), got {mask.shape}")
  if isinstance(mask, jax.core.Tracer):
    return  # values unknown while tracing; checked on every eager call
  kept = np.sum(~np.asarray(mask, bool), axis=1)
  if np.any(kept != len_keep):
    raise ValueError(
      f"every mask row must keep exactly len_keep={len_keep} of {num_patches} "
      f"patches (int(N * (1 - mask_ratio))); rows keep {sorted(set(kept.tolist()))}"
    )


class MAE(nnx.Module):
  """MAE: ViT encoder on visible patches + transformer decoder predicting all patches' pixels.

  The mask is given per call; each row must keep exactly len_keep = int(N * (1 - mask_ratio))
  patches (mask_ratio is static, so shapes are too). Eager calls check this; under jit it
  cannot be checked, and a row keeping more patches would silently drop the extras.
  pred_dim: per-patch output width; 0 = pixels (p*p*3), else e.g. the teacher's token width.
  """

  def __init__(
    self,
    *,
    width: int,
    depth: int,
    num_heads: int,
    patch_size: int,
    image_size: int,
    decoder_width: int = 512,
    decoder_depth: int = 8,
    decoder_heads: int = 16,
    mask_ratio: float = 0.75,
    mlp_ratio: float = 4.0,
    drop_path_rate: float = 0.0,
    dtype=jnp.float32,
    remat=False,
    pred_dim: int = 0,
    attention_impl: str = "dot_product",
    scan_layers: bool = False,
    rngs: nnx.Rngs,
  ):
    if not 0.0 <= mask_ratio < 1.0:
      raise ValueError(f"mask_ratio={mask_ratio!r} is not in [0, 1)")
    self.mask_ratio, self.remat = float(mask_ratio), vit.remat_mode(remat)
    self.scan_layers = bool(scan_layers)
    self.decoder_width = decoder_width
    self.encoder = vit.ViT(
      width=width,
      depth=depth,
      num_heads=num_heads,
      patch_size=patch_size,
      image_size=image_size,
      mlp_ratio=mlp_ratio,
      pool="none",
      drop_path_rate=drop_path_rate,
      dtype=dtype,
      remat=remat,
      attention_impl=attention_impl,
      scan_layers=scan_layers,
      rngs=rngs,
    )
    self.decoder_embed = vit.linear(width, decoder_width, dtype=dtype, rngs=rngs)
    self.mask_token = nnx.Param(vit.token_init(rngs.params(), (1, 1, decoder_width), jnp.float32))
    self.decoder_blocks = nnx.List(
      [
        vit.Block(
          decoder_width,
          decoder_heads,
          mlp_ratio=mlp_ratio,
          dtype=dtype,
          attention_impl=attention_impl,
          rngs=rngs,
        )
        for _ in range(decoder_depth)
      ]
    )
    self.decoder_norm = vit.layer_norm(decoder_width, dtype=dtype, rngs=rngs)
    self.decoder_pred = vit.linear(
      decoder_width, pred_dim or patch_size * patch_size * 3, dtype=dtype, rngs=rngs
    )

  @property
  def len_keep(self) -> int:
    return int(self.encoder.num_patches * (1.0 - self.mask_ratio))

  def __call__(self, images, mask, *, key=None):
    """images: [B, H, W, 3] normalized; mask: [B, N] bool, True = masked.

    key: the encoder's stochastic depth (None = deterministic).
    Returns pred [B, N, pred_dim or p*p*3] float32 for every patch (the loss uses the
    masked ones).
    """
    n, len_keep = self.encoder.num_patches, self.len_keep
    _check_mask(mask, n, len_keep)
    # Stable sort puts the visible patches first, each group in increasing index order;
    # `restore` is MAE's ids_restore, the inverse permutation.
    ids = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)
    restore = jnp.argsort(ids, axis=1)
    latent = self.encoder.encode(images, key=key, visible_ids=ids[:, :len_keep])

    x = self.decoder_embed(latent)  # [B, 1 + len_keep, Dd]
    mask_tokens = jnp.broadcast_to(
      self.mask_token[...].astype(x.dtype), (x.shape[0], n - len_keep, self.decoder_width)
    )
    patches = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
    patches = jnp.take_along_axis(patches, restore[..., None], axis=1)  # un-shuffle
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    grid = self.encoder.grid
    x = x + jnp.asarray(posemb.sincos_2d(grid, grid, self.decoder_width, cls_token=True), x.dtype)
    x, _ = vit.run_blocks(self.decoder_blocks, x, None, remat=self.remat, scan=self.scan_layers)
    pred = self.decoder_pred(self.decoder_norm(x))
    return pred[:, 1:].astype(jnp.float32)


def mae_loss(pred, target_images, mask, patch_size: int, norm_pix: bool = True):
  """MAE's loss: mean squared error per patch, averaged over the masked patches.

  pred: [B, N, P]; target_images: [B, H, W, 3] (normalized, clean); mask: [B, N], True = masked.
  norm_pix: per-patch (t - mean) / sqrt(var + 1e-6) with the unbiased variance (torch .var).
  Returns (loss scalar over all masked patches of the batch, per-image loss [B]); float32.
  """
  target = patchify(jnp.asarray(target_images, jnp.float32), patch_size)
  if norm_pix:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  per_patch = jnp.mean((jnp.asarray(pred, jnp.float32) - target) ** 2, axis=-1)  # [B, N]
  m = mask.astype(jnp.float32)
  per_image = (per_patch * m).sum(axis=1) / m.sum(axis=1)
  return (per_patch * m).sum() / m.sum(), per_image


def normalize_features(x, norm: str):
  """x: [..., D] -> per-token normalised: 'none'; 'layernorm' (x - mean) / sqrt(biased var +
  1e-6), no affine; 'l2' x / max(||x||, 1e-12). float32."""
  x = jnp.asarray(x, jnp.float32)
  if norm == "none":
    return x
  if norm == "layernorm":
    mean = x.mean(axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + FEATURE_LN_EPS)
  if norm == "l2":
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), L2_EPS)
  raise ValueError(f"feature norm {norm!r} is not one of {FEATURE_NORMS}")


def feature_loss(
  pred, target, mask, *, norm: str = "layernorm", loss: str = "mse", smooth_l1_beta: float = 1.0
):
  """Feature-target MIM loss on the masked tokens (URFM: MSE to teacher tokens).

  pred: [B, N, D] decoder output; target: [B, N, D] teacher tokens aligned to the student's
  patches; mask: [B, N], True = masked.
  norm: applied to the target; 'l2' also to pred (MILAN-style: both on the unit sphere).
  loss per token: 'mse' mean_d (p - t)^2; 'smooth_l1' mean_d of torch's smooth_l1 with
  beta (0.5 x^2 / beta where |x| < beta, else |x| - beta / 2); 'cosine' 1 - cos(p, t)
  (negative cosine shifted to be >= 0; same gradient).
  Returns (loss over all masked tokens of the batch, per-image loss [B]); float32.
  """
  if loss not in FEATURE_LOSSES:
    raise ValueError(f"feature loss {loss!r} is not one of {FEATURE_LOSSES}")
  if pred.shape != target.shape:
    raise ValueError(
      f"prediction {pred.shape} and target {target.shape} differ; the decoder's "
      "output width (model pred_dim) must be the teacher token width"
    )
  target = normalize_features(target, norm)
  pred = normalize_features(pred, "l2" if norm == "l2" else "none")
  if loss == "mse":
    per_token = jnp.mean(jnp.square(pred - target), axis=-1)
  elif loss == "smooth_l1":
    err = jnp.abs(pred - target)
    per_token = jnp.mean(
      jnp.where(err < smooth_l1_beta, 0.5 * err * err / smooth_l1_beta, err - 0.5 * smooth_l1_beta),
      axis=-1,
    )
  else:
    unit = lambda x: normalize_features(x, "l2")
    per_token = 1.0 - jnp.sum(unit(pred) * unit(target), axis=-1)
  m = mask.astype(jnp.float32)
  per_image = (per_token * m).sum(axis=1) / m.sum(axis=1)
  return (per_token * m).sum() / m.sum(), per_image


def mae_from_config(model_config, rngs: nnx.Rngs, *, path: str = "config.model") -> MAE:
  """Builds an MAE from a model ConfigDict; invalid values raise ConfigError naming the field.

  Fields: variant ('B/16' style, or '' to use width/depth/num_heads/patch_size), image_size,
  decoder_width/depth/heads, mask_ratio, drop_path_rate, dtype ('float32' | 'bfloat16'),
  optional remat ('none' | 'dots' | 'full', or a bool; default 'none'), scan_layers (default
  False), attention_impl (default 'dot_product'), pred_dim (default 0 = pixels). `path` is where
  the caller keeps this config (for messages).
  """

  missing = object()

  def field(name, ok=None, what="", default=missing):
    """model_config[name] (`default` when absent); ConfigError naming it unless ok(value)."""
    value = model_config.get(name, default)
    if value is missing:
      raise configlib.ConfigError(f"{path}.{name} is missing")
    if ok is not None and not ok(value):
      raise configlib.ConfigError(f"{path}.{name}={value!r} must be {what}")
    return value

  def positive_int(value) -> bool:
    return isinstance(value, int) and value > 0

  def non_negative_int(value) -> bool:
    return isinstance(value, int) and value >= 0

  def fraction(value) -> bool:
    return 0.0 <= value < 1.0

  width, depth, heads, patch = vit.model_dims(model_config, path)
  if not field("variant"):
    field("width", lambda w: w % heads == 0 and w % 4 == 0, "divisible by num_heads and by 4")
  image_size = field(
    "image_size",
    lambda v: positive_int(v) and v % patch == 0,
    f"a positive multiple of the patch size {patch}",
  )
  dd = field("decoder_depth", non_negative_int, "a non-negative integer")
  dh = field("decoder_heads", positive_int, "a positive integer")
  dw = field(
    "decoder_width",
    lambda v: positive_int(v) and v % dh == 0 and v % 4 == 0,
    "a positive integer divisible by decoder_heads and by 4",
  )
  dtype = field("dtype", lambda v: v in vit.DTYPES, f"one of {tuple(vit.DTYPES)}")
  return MAE(
    width=width,
    depth=depth,
    num_heads=heads,
    patch_size=patch,
    image_size=image_size,
    decoder_width=dw,
    decoder_depth=dd,
    decoder_heads=dh,
    mask_ratio=field("mask_ratio", fraction, "in [0, 1)"),
    drop_path_rate=field("drop_path_rate", fraction, "in [0, 1)"),
    dtype=vit.DTYPES[dtype],
    pred_dim=field("pred_dim", non_negative_int, "a non-negative integer", 0),
    **vit.compute_options(model_config, path),
    rngs=rngs,
  )
