"""Segment Anything (SAM) in Flax NNX: image encoder, prompt encoder, two-way mask decoder.

Layer for layer the model of facebookresearch/segment_anything (`modeling/*.py`), so its
checkpoints load with `ultrajax/interop/sam.py` and give the same numbers. Arrays are
channel-last (NHWC); coordinates are (x, y) pixels of the model's square input frame
(`image_size`, 1024 for the released models).

Interface (pure functions of the parameters; under jit split the model with
`nnx.split(model, nnx.Param)` and `nnx.merge` inside, as everywhere):

  model = Sam(sam_config('tiny', image_size=64), rngs=nnx.Rngs(0))  # 'vit_b' | 'vit_l' | 'vit_h'
  emb = model.encode_image(preprocess(images_uint8, image_size))  # [B, g, g, C], g = S/16
  sparse, dense = model.encode_prompts(points=..., labels=..., boxes=..., masks=...)
  logits, iou = model.decode_masks(emb, model.dense_pe(), sparse, dense, multimask_output=True)
  out = model.decode(emb, sparse, dense)  # `Decoded`: all 4 masks, IoU, token outputs
  full = postprocess_masks(logits, input_hw, original_hw, image_size)

Prompts (as segment_anything's PromptEncoder):
  points/labels: label 1 foreground, 0 background, -1 not-a-point (padding: its positional
    encoding is zeroed and `not_a_point` added). Without boxes one padding point is appended,
    as SAM does. Labels 2 and 3 mean box top-left / bottom-right corner: a box is exactly two
    such points, so `embed_points` can encode a mixed batch of point and box prompts with
    one static shape (a point prompt = [point (1), padding (-1)], a box = [corner (2),
    corner (3)], UltraSam's token layout).
  boxes: [N, 4] x0, y0, x1, y1, appended after the points as two corner tokens.
  masks: [N, 4g, 4g] low-res mask logits (256 x 256 at 1024) -> downscaled to [N, g, g, C];
    without masks (or where mask_valid is False) the learned `no_mask` embedding is used.
Image embeddings may be [N, ...] (one per prompt) or [1, ...] (one image, N prompts).

Prompted classification hook: `num_cls_tokens=K` > 0 adds K learned decoder tokens (after
the 4 mask tokens, before the prompt tokens; outputs `Decoded.cls_tokens`); with K = 0
(default) the decoder is SAM's exactly. With `Decoded.image_tokens` and
`encode_image(..., return_vit=True)` they feed UltraSam's classification head.

Fixed buffer: `prompt_encoder.pe_gaussian` (SAM's random Fourier matrix, a buffer in
PyTorch) is an nnx.Param so that the model holds only Params, but every use goes through
stop_gradient; `trainable_mask(params)` marks it False for the optimizer (weight decay).

Training it (UltraSam): simulated prompts, the focal/dice/IoU losses and refinement are the
objective in train/sam_objectives.py (`instance_decoder` decodes each instance against its
own image); evaluation in eval/sam_eval.py; the loop in jobs/sam.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ultrajax.models import layers, vit
from ultrajax.train import sharding

PIXEL_MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255 scale, as segment_anything
PIXEL_STD = (58.395, 57.12, 57.375)
ENCODER_LN_EPS = 1e-6  # image encoder LayerNorms and every LayerNorm2d
DECODER_LN_EPS = 1e-5  # two-way transformer nn.LayerNorm default
MASK_THRESHOLD = 0.0
FROZEN_PATHS = (("prompt_encoder", "pe_gaussian"),)


@dataclasses.dataclass(frozen=True)
class SamConfig:
  """Architecture. Defaults are SAM ViT-B at 1024 (segment_anything's build_sam_vit_b)."""

  image_size: int = 1024
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)  # 0-based blocks without windows
  window_size: int = 14
  mlp_ratio: float = 4.0
  prompt_dim: int = 256  # neck output channels = prompt / decoder width
  mask_in_chans: int = 16
  decoder_depth: int = 2
  decoder_heads: int = 8
  decoder_mlp_dim: int = 2048
  attention_downsample: int = 2
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden: int = 256
  num_cls_tokens: int = 0
  drop_path_rate: float = 0.0

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def low_res_size(self) -> int:
    """Side of the decoder's mask logits: 4 x grid (256 at 1024)."""
    return 4 * self.grid


VARIANTS = {
  "vit_b": dict(width=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
  "vit_l": dict(width=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
  "vit_h": dict(width=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
  # CPU tests and smoke runs: 8 x 8 grid, windows of 4, every part small.
  "tiny": dict(
    image_size=128,
    width=64,
    depth=2,
    num_heads=2,
    global_attn_indexes=(1,),
    window_size=4,
    prompt_dim=32,
    mask_in_chans=8,
    decoder_heads=2,
    decoder_mlp_dim=64,
    iou_head_hidden=32,
  ),
}


def sam_config(variant: str = "vit_b", **overrides) -> SamConfig:
  """A preset (VARIANTS) with fields replaced; bad values raise ValueError naming them."""
  if variant not in VARIANTS:
    raise ValueError(f"SAM variant {variant!r} is not one of {sorted(VARIANTS)}")
  unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(SamConfig)})
  if unknown:
    raise ValueError(f"unknown SAM config fields {unknown}")
  fields = dict(VARIANTS[variant], **overrides)
  fields["global_attn_indexes"] = tuple(int(i) for i in fields.get("global_attn_indexes", ()))
  config = SamConfig(**fields)
  checks = [
    (
      config.image_size % config.patch_size == 0,
      f"image_size {config.image_size} is not divisible by patch_size {config.patch_size}",
    ),
    (
      config.width % config.num_heads == 0,
      f"width {config.width} is not divisible by num_heads {config.num_heads}",
    ),
    (
      all(0 <= i < config.depth for i in config.global_attn_indexes),
      f"global_attn_indexes {config.global_attn_indexes} are outside 0..{config.depth - 1}",
    ),
    (config.window_size > 0, f"window_size {config.window_size} must be > 0"),
    (
      (config.prompt_dim // config.attention_downsample) % config.decoder_heads == 0,
      f"prompt_dim {config.prompt_dim} / attention_downsample {config.attention_downsample} "
      f"is not divisible by decoder_heads {config.decoder_heads}",
    ),
    (config.prompt_dim % 8 == 0, f"prompt_dim {config.prompt_dim} is not divisible by 8"),
    (config.mask_in_chans % 4 == 0, f"mask_in_chans {config.mask_in_chans} is not divisible by 4"),
    (config.num_cls_tokens >= 0, f"num_cls_tokens {config.num_cls_tokens} must be >= 0"),
  ]
  for ok, message in checks:
    if not ok:
      raise ValueError(f"SAM config: {message}")
  return config


def trainable_mask(params):
  """Pure-dict tree of bools: False for the fixed random Fourier matrix (FROZEN_PATHS)."""

  def keep(path, _):
    names = tuple(getattr(p, "key", getattr(p, "idx", p)) for p in path)
    return not any(names[: len(f)] == f for f in FROZEN_PATHS)

  return jax.tree_util.tree_map_with_path(keep, params)


# ----------------------------------------------------------------------------- pre/post
def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
  """(h, w) after resizing the long side to `long_side`, rounded half up as segment_anything's
  ResizeLongestSide.get_preprocess_shape; a side it would round to 0 (a sliver image) is 1, as
  PIL cannot resize to an empty image. Serves the SAM predictor and the instance data."""
  scale = long_side * 1.0 / max(height, width)
  return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def preprocess(images, image_size: int):
  """images: [B, h, w, 3] RGB 0-255 with h, w <= image_size -> [B, S, S, 3] float32:
  (x - PIXEL_MEAN) / PIXEL_STD, zero-padded at the bottom and right, as Sam.preprocess."""
  h, w = images.shape[1:3]
  if h > image_size or w > image_size:
    raise ValueError(
      f"images {tuple(images.shape)} are larger than the model input "
      f"{image_size}; resize the long side first (sam_predictor.resize_image)"
    )
  x = (jnp.asarray(images, jnp.float32) - jnp.asarray(PIXEL_MEAN)) / jnp.asarray(PIXEL_STD)
  return jnp.pad(x, ((0, 0), (0, image_size - h), (0, image_size - w), (0, 0)))


def _bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
  """[n_out, n_in] float32: torch F.interpolate(bilinear, align_corners=False, no antialias)
  along one axis, as a matrix; the source positions in float32, as torch computes them."""
  scale = np.float32(n_in / n_out)
  src = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5) * scale - 0.5, 0.0)
  lo = np.minimum(src.astype(int), n_in - 1)
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.arange(n_out), lo), 1.0 - (src - lo))
  np.add.at(m, (np.arange(n_out), np.minimum(lo + 1, n_in - 1)), src - lo)
  return m.astype(np.float32)


def postprocess_masks(logits, input_hw: Sequence[int], original_hw: Sequence[int], image_size: int):
  """logits: [..., 4g, 4g] -> [..., H, W]: upsample to the input frame, crop the padding,
  resize to the original image (Sam.postprocess_masks), as one matrix per axis. A numpy
  array stays in numpy (no compilation per image shape: the evaluation's scoring)."""
  (h, w), (height, width) = (int(v) for v in input_hw), (int(v) for v in original_hw)
  up = _bilinear_matrix(image_size, logits.shape[-1])
  rows = _bilinear_matrix(height, h) @ up[:h]
  cols = _bilinear_matrix(width, w) @ up[:w]
  if isinstance(logits, np.ndarray):
    return rows @ logits @ cols.T
  return jnp.einsum("hi,...ij,wj->...hw", rows, logits, cols, precision="highest")


# ----------------------------------------------------------------------------- layers
zeros = nnx.initializers.zeros_init()
embed_init = nnx.initializers.normal(1.0)  # nn.Embedding's N(0, 1)


def window_partition(x, window: int):
  """x: [B, H, W, C] -> windows [B * nh * nw, window, window, C], zero-padded at the bottom
  and right to a multiple of `window` (padded tokens join the attention unmasked, as SAM)."""
  h, w = x.shape[1:3]
  ph, pw = -h % window, -w % window
  x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  return einops.rearrange(x, "b (nh wh) (nw ww) c -> (b nh nw) wh ww c", wh=window, ww=window)


def window_unpartition(windows, window: int, hw: tuple[int, int]):
  """Inverse of window_partition: [B * nh * nw, window, window, C] -> [B, H, W, C]."""
  h, w = hw
  nh, nw = -(-h // window), -(-w // window)
  x = einops.rearrange(windows, "(b nh nw) wh ww c -> b (nh wh) (nw ww) c", nh=nh, nw=nw)
  return x[:, :h, :w]


def rel_pos_lookup(size: int, table):
  """table: [2 * size - 1, d] -> [size (query), size (key), d]; entry (i, j) = table[i - j +
  size - 1] (segment_anything's get_rel_pos for equal query and key sizes)."""
  if table.shape[0] != 2 * size - 1:
    raise ValueError(
      f"relative position table has {table.shape[0]} rows; a {size}-token side needs {2 * size - 1}"
    )
  idx = np.arange(size)[:, None] - np.arange(size)[None, :] + size - 1
  return table[idx]


class EncoderAttention(nnx.Module):
  """Multi-head attention over a [B, H, W, D] grid with decomposed relative positions."""

  def __init__(
    self, dim: int, num_heads: int, size: int, *, dtype, impl="dot_product", rngs: nnx.Rngs
  ):
    if impl not in vit.ATTENTION_IMPLS:
      raise ValueError(f"attention impl={impl!r} is not one of {vit.ATTENTION_IMPLS}")
    self.num_heads, self.impl = num_heads, impl
    head_dim = dim // num_heads
    self.qkv = vit.linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.proj = vit.linear(dim, dim, dtype=dtype, rngs=rngs)
    # SAM's rel_pos_zero_init: zero tables, learned (or loaded).
    self.rel_pos_h = nnx.Param(jnp.zeros((2 * size - 1, head_dim), jnp.float32))
    self.rel_pos_w = nnx.Param(jnp.zeros((2 * size - 1, head_dim), jnp.float32))

  def __call__(self, x):
    """x: [B, H, W, D] -> [B, H, W, D]. 'dot_product' off the CPU: vit.fused_attention (cuDNN
    on a GPU) with the relative terms as its bias; else explicit q k^T softmax v."""
    h = x.shape[1]
    fused = self.impl == "dot_product" and sharding.compute_platform() != "cpu"
    layout = "b (y x) n d" if fused else "b n (y x) d"
    q, k, v = einops.rearrange(
      self.qkv(x), f"b y x (three n d) -> three {layout}", three=3, n=self.num_heads
    )
    bias = self._relative_bias(einops.rearrange(q, f"{layout} -> b n y x d", y=h))
    if fused:
      out = vit.fused_attention(q, k, v, bias)
    else:
      attn = jnp.einsum("bnqd,bnkd->bnqk", q * q.shape[-1] ** -0.5, k) + bias
      attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(v.dtype)
      out = jnp.einsum("bnqk,bnkd->bnqd", attn, v)
    return self.proj(einops.rearrange(out, f"{layout} -> b y x (n d)", y=h))

  def _relative_bias(self, q_grid):
    """q_grid: the unscaled query [B, heads, h, w, d] -> the decomposed relative-position terms
    [B, heads, hw (queries), hw (keys)] (segment_anything's add_decomposed_rel_pos)."""
    h, w = q_grid.shape[2:4]
    rh = rel_pos_lookup(h, self.rel_pos_h[...].astype(q_grid.dtype))  # [h, h, d]
    rw = rel_pos_lookup(w, self.rel_pos_w[...].astype(q_grid.dtype))  # [w, w, d]
    rel_h = jnp.einsum("bnyxd,ykd->bnyxk", q_grid, rh)
    rel_w = jnp.einsum("bnyxd,xkd->bnyxk", q_grid, rw)
    return einops.rearrange(
      rel_h[..., :, None] + rel_w[..., None, :], "b n y x ky kx -> b n (y x) (ky kx)"
    )


class EncoderMlp(nnx.Module):
  """lin1 -> exact GELU -> lin2 (segment_anything's MLPBlock)."""

  def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs, act=vit.gelu):
    self.act = act
    self.lin1 = vit.linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.lin2 = vit.linear(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.lin2(self.act(self.lin1(x)))


class EncoderBlock(nnx.Module):
  """ViTDet block: windowed (window_size > 0) or global attention, pre-norm residuals."""

  def __init__(
    self,
    c: SamConfig,
    window_size: int,
    drop_path_rate: float,
    *,
    dtype,
    attention_impl: str = "dot_product",
    rngs: nnx.Rngs,
  ):
    dim, self.window_size, self.drop_path_rate = c.width, window_size, float(drop_path_rate)
    self.norm1 = vit.layer_norm(dim, eps=ENCODER_LN_EPS, dtype=dtype, rngs=rngs)
    self.attn = EncoderAttention(
      dim, c.num_heads, window_size or c.grid, dtype=dtype, impl=attention_impl, rngs=rngs
    )
    self.norm2 = vit.layer_norm(dim, eps=ENCODER_LN_EPS, dtype=dtype, rngs=rngs)
    self.mlp = EncoderMlp(dim, int(dim * c.mlp_ratio), dtype=dtype, rngs=rngs)

  def __call__(self, x, key=None, rate=None):
    """x: [B, H, W, D] -> [B, H, W, D]; key: stochastic depth (None = deterministic); rate
    overrides the block's drop-path rate (vit.run_blocks passes it under remat)."""
    rate = self.drop_path_rate if rate is None else rate
    k1, k2 = (None, None) if key is None else jax.random.split(key)
    y = self.norm1(x)
    if self.window_size:
      y = window_unpartition(
        self.attn(window_partition(y, self.window_size)), self.window_size, x.shape[1:3]
      )
    else:
      y = self.attn(y)
    x = x + vit.drop_path(y, rate, k1)
    return x + vit.drop_path(self.mlp(self.norm2(x)), rate, k2)


class ImageEncoder(nnx.Module):
  """ImageEncoderViT: patch embed + absolute positions, ViTDet blocks, conv neck to C.

  remat: one of vit.REMATS (or a bool: 'full' / 'none'); scan_layers: one lax.scan over the
  blocks, a step per repeat of the windowed / global pattern (3 blocks for vit_b, 6 for vit_l,
  8 for vit_h); attention_impl: 'dot_product' (vit.fused_attention with the relative terms
  as its bias: cuDNN on a GPU; the einsum path on the CPU) or 'einsum'. None of them changes
  the parameters or the math."""

  def __init__(
    self,
    config: SamConfig,
    *,
    dtype,
    remat=False,
    scan_layers: bool = False,
    attention_impl: str = "dot_product",
    rngs: nnx.Rngs,
  ):
    c, d = config, config.width
    self.image_size, self.remat, self.scan_layers = c.image_size, vit.remat_mode(remat), scan_layers
    self.patch_embed = vit.patch_embedding(d, c.patch_size, dtype=dtype, rngs=rngs)
    self.pos_embed = nnx.Param(jnp.zeros((1, c.grid, c.grid, d), jnp.float32))
    rates = np.linspace(0.0, c.drop_path_rate, c.depth)
    windows = [0 if i in c.global_attn_indexes else c.window_size for i in range(c.depth)]
    # The shortest repeat of the windowed / global pattern: what one scan step applies.
    self.period = next(
      p
      for p in range(1, c.depth + 1)
      if c.depth % p == 0 and windows == windows[:p] * (c.depth // p)
    )
    self.blocks = nnx.List(
      [
        EncoderBlock(c, window, rate, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
        for window, rate in zip(windows, rates)
      ]
    )
    self.neck_conv1 = vit.conv(d, c.prompt_dim, 1, use_bias=False, dtype=dtype, rngs=rngs)
    self.neck_norm1 = vit.layer_norm(c.prompt_dim, eps=ENCODER_LN_EPS, dtype=dtype, rngs=rngs)
    self.neck_conv2 = vit.conv(
      c.prompt_dim, c.prompt_dim, 3, padding=1, use_bias=False, dtype=dtype, rngs=rngs
    )
    self.neck_norm2 = vit.layer_norm(c.prompt_dim, eps=ENCODER_LN_EPS, dtype=dtype, rngs=rngs)

  def __call__(self, images, *, key=None, return_vit: bool = False):
    """images: [B, S, S, 3] preprocessed -> embeddings [B, g, g, C] float32.

    return_vit: also return the last block's output [B, g, g, D] float32 (before the neck).
    """
    vit.check_images(images, self.image_size, "SAM image encoder")
    x = self.patch_embed(images)
    x = x + self.pos_embed[...].astype(x.dtype)
    x, _ = vit.run_blocks(
      self.blocks, x, key, remat=self.remat, scan=self.scan_layers, period=self.period
    )
    y = self.neck_norm2(self.neck_conv2(self.neck_norm1(self.neck_conv1(x))))
    y = y.astype(jnp.float32)
    return (y, x.astype(jnp.float32)) if return_vit else y


class PromptEncoder(nnx.Module):
  """Points, boxes and masks -> sparse tokens [N, T, C] and a dense map [N, g, g, C]."""

  def __init__(self, config: SamConfig, *, dtype, rngs: nnx.Rngs):
    c, dim = config, config.prompt_dim
    self.image_size, self.grid, self.dim = c.image_size, c.grid, dim
    self.pe_gaussian = nnx.Param(embed_init(rngs.params(), (2, dim // 2), jnp.float32))
    self.neg_point = nnx.Param(embed_init(rngs.params(), (1, dim), jnp.float32))
    self.pos_point = nnx.Param(embed_init(rngs.params(), (1, dim), jnp.float32))
    self.box_corner_a = nnx.Param(embed_init(rngs.params(), (1, dim), jnp.float32))
    self.box_corner_b = nnx.Param(embed_init(rngs.params(), (1, dim), jnp.float32))
    self.not_a_point = nnx.Param(embed_init(rngs.params(), (1, dim), jnp.float32))
    self.no_mask = nnx.Param(embed_init(rngs.params(), (1, dim), jnp.float32))
    mid = c.mask_in_chans
    self.mask_conv1 = vit.conv(1, mid // 4, 2, stride=2, dtype=dtype, rngs=rngs)
    self.mask_norm1 = vit.layer_norm(mid // 4, eps=ENCODER_LN_EPS, dtype=dtype, rngs=rngs)
    self.mask_conv2 = vit.conv(mid // 4, mid, 2, stride=2, dtype=dtype, rngs=rngs)
    self.mask_norm2 = vit.layer_norm(mid, eps=ENCODER_LN_EPS, dtype=dtype, rngs=rngs)
    self.mask_conv3 = vit.conv(mid, dim, 1, dtype=dtype, rngs=rngs)

  def fourier(self, coords):
    """coords: [..., 2] (x, y) in [0, 1] -> [..., C]: [sin, cos](2 pi (2c - 1) G)."""
    g = jax.lax.stop_gradient(self.pe_gaussian[...])  # a fixed buffer in segment_anything
    proj = 2 * np.pi * ((2 * coords.astype(jnp.float32) - 1) @ g)
    return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)

  def dense_pe(self):
    """Positional encoding of the embedding grid's cell centres: [g, g, C] float32."""
    centres = (np.arange(self.grid, dtype=np.float32) + 0.5) / self.grid
    xy = np.stack(np.meshgrid(centres, centres, indexing="xy"), axis=-1)  # [y, x, (x, y)]
    return self.fourier(jnp.asarray(xy))

  def embed_points(self, coords, labels):
    """coords: [..., T, 2] input-frame pixels (x, y); labels: [..., T] int in {-1 not a point,
    0 negative, 1 positive, 2 box top-left, 3 box bottom-right} -> [..., T, C] float32."""
    coords = (jnp.asarray(coords, jnp.float32) + 0.5) / self.image_size  # pixel centres
    labels = jnp.asarray(labels, jnp.int32)
    pe = jnp.where((labels == -1)[..., None], 0.0, self.fourier(coords))
    # Row label + 1: not a point (-1), negative (0), positive (1), box corners (2, 3).
    rows = (self.not_a_point, self.neg_point, self.pos_point, self.box_corner_a, self.box_corner_b)
    return pe + jnp.concatenate([row[...] for row in rows])[labels + 1]

  def embed_masks(self, masks, n: int, mask_valid=None):
    """masks: [n, 4g, 4g] logits or None -> [n, g, g, C] float32: the conv stack (exact GELU)
    on the masks; the learned `no_mask` embedding without masks or where mask_valid [n] is False."""
    no_mask = jnp.broadcast_to(self.no_mask[...], (n, self.grid, self.grid, self.dim))
    if masks is None:
      return no_mask
    size = 4 * self.grid
    if tuple(masks.shape[1:]) != (size, size):
      raise ValueError(
        f"mask prompts must be [N, {size}, {size}] low-res logits, got {tuple(masks.shape)}"
      )
    x = jnp.asarray(masks)[..., None]
    x = vit.gelu(self.mask_norm1(self.mask_conv1(x)))
    x = vit.gelu(self.mask_norm2(self.mask_conv2(x)))
    dense = self.mask_conv3(x).astype(jnp.float32)
    if mask_valid is None:
      return dense
    return jnp.where(jnp.asarray(mask_valid)[:, None, None, None], dense, no_mask)

  def __call__(self, points=None, labels=None, boxes=None, masks=None, mask_valid=None):
    """Sparse [N, T, C] and dense [N, g, g, C] embeddings; see the module docstring.

    points: [N, P, 2], labels: [N, P]; boxes: [N, 4]; masks: [N, 4g, 4g];
    mask_valid: [N] bool, False -> the no-mask embedding for that prompt.
    """
    if (points is None) != (labels is None):
      raise ValueError("points and labels come together (both or neither)")
    given = [a for a in (points, boxes, masks) if a is not None]
    n = given[0].shape[0] if given else 1
    sparse = [jnp.zeros((n, 0, self.dim), jnp.float32)]
    if points is not None:
      coords, labels = jnp.asarray(points, jnp.float32), jnp.asarray(labels, jnp.int32)
      if boxes is None:  # SAM's padding point (0, 0) with label -1
        coords = jnp.concatenate([coords, jnp.zeros((n, 1, 2), jnp.float32)], axis=1)
        labels = jnp.concatenate([labels, -jnp.ones((n, 1), jnp.int32)], axis=1)
      sparse.append(self.embed_points(coords, labels))
    if boxes is not None:
      corners = jnp.reshape(jnp.asarray(boxes, jnp.float32), (n, 2, 2))
      sparse.append(self.embed_points(corners, jnp.broadcast_to(jnp.array([2, 3]), (n, 2))))
    return jnp.concatenate(sparse, axis=1), self.embed_masks(masks, n, mask_valid)


class DecoderAttention(nnx.Module):
  """segment_anything's transformer.Attention: q/k/v projected to dim / downsample. impl:
  'dot_product' (vit.fused_attention: cuDNN on a GPU) or 'einsum' (vit.einsum_attention)."""

  def __init__(
    self,
    dim: int,
    num_heads: int,
    downsample: int = 1,
    *,
    dtype,
    impl: str = "dot_product",
    rngs: nnx.Rngs,
  ):
    if impl not in vit.ATTENTION_IMPLS:
      raise ValueError(f"attention impl={impl!r} is not one of {vit.ATTENTION_IMPLS}")
    inner = dim // downsample
    self.num_heads, self.impl = num_heads, impl
    self.q_proj = vit.linear(dim, inner, dtype=dtype, rngs=rngs)
    self.k_proj = vit.linear(dim, inner, dtype=dtype, rngs=rngs)
    self.v_proj = vit.linear(dim, inner, dtype=dtype, rngs=rngs)
    self.out_proj = vit.linear(inner, dim, dtype=dtype, rngs=rngs)

  def __call__(self, q, k, v):
    """q: [N, Tq, C], k, v: [N, Tk, C] -> [N, Tq, C]."""
    heads = lambda x: einops.rearrange(x, "b t (n d) -> b t n d", n=self.num_heads)
    attention = vit.fused_attention if self.impl == "dot_product" else vit.einsum_attention
    out = attention(
      heads(self.q_proj(q)), heads(self.k_proj(k)), heads(self.v_proj(v))
    )  # scale 1/sqrt(head dim)
    return self.out_proj(einops.rearrange(out, "b t n d -> b t (n d)"))


class TwoWayBlock(nnx.Module):
  """Token self-attention, token->image, MLP (ReLU), image->token; post-norm residuals."""

  def __init__(
    self, c: SamConfig, *, skip_first_pe: bool, dtype, attention_impl: str, rngs: nnx.Rngs
  ):
    self.skip_first_pe = skip_first_pe
    dim, heads, down = c.prompt_dim, c.decoder_heads, c.attention_downsample
    norm = lambda: vit.layer_norm(dim, eps=DECODER_LN_EPS, dtype=dtype, rngs=rngs)
    attn = lambda downsample=1: DecoderAttention(  # noqa: E731
      dim, heads, downsample, dtype=dtype, impl=attention_impl, rngs=rngs
    )
    self.self_attn = attn()
    self.norm1 = norm()
    self.cross_attn_token_to_image = attn(down)
    self.norm2 = norm()
    self.mlp = EncoderMlp(dim, c.decoder_mlp_dim, act=jax.nn.relu, dtype=dtype, rngs=rngs)
    self.norm3 = norm()
    self.norm4 = norm()
    self.cross_attn_image_to_token = attn(down)

  def __call__(self, queries, keys, query_pe, key_pe):
    """queries: [N, T, C], keys: [N, HW, C] (+ their PEs) -> (queries, keys)."""
    if self.skip_first_pe:  # first layer: the tokens are their own PE, no residual
      queries = self.self_attn(queries, queries, queries)
    else:
      q = queries + query_pe
      queries = queries + self.self_attn(q, q, queries)
    queries = self.norm1(queries)
    q, k = queries + query_pe, keys + key_pe
    queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
    queries = self.norm3(queries + self.mlp(queries))
    q, k = queries + query_pe, keys + key_pe
    keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
    return queries, keys


class TwoWayTransformer(nnx.Module):
  def __init__(self, config: SamConfig, *, dtype, attention_impl: str, rngs: nnx.Rngs):
    c, impl = config, attention_impl
    self.layers = nnx.List(
      [
        TwoWayBlock(c, skip_first_pe=i == 0, dtype=dtype, attention_impl=impl, rngs=rngs)
        for i in range(c.decoder_depth)
      ]
    )
    self.final_attn_token_to_image = DecoderAttention(
      c.prompt_dim, c.decoder_heads, c.attention_downsample, dtype=dtype, impl=impl, rngs=rngs
    )
    self.norm_final_attn = vit.layer_norm(c.prompt_dim, eps=DECODER_LN_EPS, dtype=dtype, rngs=rngs)

  def __call__(self, image, image_pe, tokens):
    """image: [N, HW, C], image_pe: [N or 1, HW, C], tokens: [N, T, C] -> (tokens, image)."""
    queries, keys = tokens, image
    for layer in self.layers:
      queries, keys = layer(queries, keys, tokens, image_pe)
    out = self.final_attn_token_to_image(queries + tokens, keys + image_pe, keys)
    return self.norm_final_attn(queries + out), keys


class Mlp(nnx.Module):
  """segment_anything's mask_decoder.MLP: Linear layers with ReLU between them."""

  def __init__(self, din: int, hidden: int, dout: int, num_layers: int, *, dtype, rngs: nnx.Rngs):
    dims = [din] + [hidden] * (num_layers - 1) + [dout]
    self.layers = nnx.List(
      [vit.linear(a, b, dtype=dtype, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])]
    )

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jax.nn.relu(layer(x))
    return self.layers[-1](x)


class Decoded(NamedTuple):
  """Everything the mask decoder computes for N prompts (C = prompt_dim, M = 4 masks).

  masks: [N, M, 4g, 4g] low-res logits; index 0 is SAM's single-mask output, 1..3 multimask.
  iou: [N, M] predicted IoU per mask.
  mask_tokens: [N, M, C] transformer outputs of the mask tokens.
  cls_tokens: [N, K, C] outputs of the `num_cls_tokens` classification tokens (K may be 0).
  image_tokens: [N, g, g, C] image embedding after the two-way transformer.
  """

  masks: jax.Array
  iou: jax.Array
  mask_tokens: jax.Array
  cls_tokens: jax.Array
  image_tokens: jax.Array


class MaskDecoder(nnx.Module):
  def __init__(
    self, config: SamConfig, *, dtype, attention_impl: str = "dot_product", rngs: nnx.Rngs
  ):
    """attention_impl: its attention layers' (DecoderAttention's impl)."""
    c, dim = config, config.prompt_dim
    self.num_mask_tokens = c.num_multimask_outputs + 1
    self.iou_token = nnx.Param(embed_init(rngs.params(), (1, dim), jnp.float32))
    self.mask_tokens = nnx.Param(
      embed_init(rngs.params(), (self.num_mask_tokens, dim), jnp.float32)
    )
    self.num_cls_tokens = c.num_cls_tokens
    if c.num_cls_tokens:
      self.cls_tokens = nnx.Param(embed_init(rngs.params(), (c.num_cls_tokens, dim), jnp.float32))
    self.transformer = TwoWayTransformer(c, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
    # nn.ConvTranspose2d(k=2, s=2), in Flax's orientation: interop flips it on import/export.
    self.upscale_conv1 = layers.Upsample2x(dim, dim // 4, dtype=dtype, rngs=rngs)
    self.upscale_norm = vit.layer_norm(dim // 4, eps=ENCODER_LN_EPS, dtype=dtype, rngs=rngs)
    self.upscale_conv2 = layers.Upsample2x(dim // 4, dim // 8, dtype=dtype, rngs=rngs)
    self.output_hypernetworks_mlps = nnx.List(
      [Mlp(dim, dim, dim // 8, 3, dtype=dtype, rngs=rngs) for _ in range(self.num_mask_tokens)]
    )
    self.iou_prediction_head = Mlp(
      dim, c.iou_head_hidden, self.num_mask_tokens, c.iou_head_depth, dtype=dtype, rngs=rngs
    )

  def __call__(self, image_embeddings, image_pe, sparse, dense) -> Decoded:
    """image_embeddings: [N or 1, g, g, C]; image_pe: [g, g, C]; sparse: [N, T, C];
    dense: [N, g, g, C] -> Decoded (float32)."""
    n, g = sparse.shape[0], dense.shape[1]
    output_tokens = [self.iou_token[...], self.mask_tokens[...]]
    if self.num_cls_tokens:
      output_tokens.append(self.cls_tokens[...])
    output_tokens = jnp.concatenate(output_tokens)
    tokens = jnp.concatenate(
      [jnp.broadcast_to(output_tokens, (n,) + output_tokens.shape), sparse], axis=1
    )
    src = jnp.broadcast_to(image_embeddings, dense.shape) + dense
    flat = lambda x: einops.rearrange(x, "... y x c -> ... (y x) c")
    hs, src = self.transformer(flat(src), flat(image_pe)[None], tokens)
    m = self.num_mask_tokens
    mask_out, cls_out = hs[:, 1 : 1 + m], hs[:, 1 + m : 1 + m + self.num_cls_tokens]
    src = einops.rearrange(src, "n (y x) c -> n y x c", y=g)
    up = vit.gelu(self.upscale_norm(self.upscale_conv1(src)))
    up = vit.gelu(self.upscale_conv2(up))  # [N, 4g, 4g, C/8]
    hyper = jnp.stack(
      [mlp(mask_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], axis=1
    )  # [N, M, C/8]
    masks = jnp.einsum("nmc,nyxc->nmyx", hyper, up)
    iou = self.iou_prediction_head(hs[:, 0])
    f32 = lambda x: x.astype(jnp.float32)
    return Decoded(f32(masks), f32(iou), f32(mask_out), f32(cls_out), f32(src))


class Sam(nnx.Module):
  """SAM = image encoder + prompt encoder + mask decoder (see the module docstring)."""

  def __init__(
    self,
    config: SamConfig,
    *,
    dtype=jnp.float32,
    remat=False,
    scan_layers: bool = False,
    attention_impl: str = "dot_product",
    rngs: nnx.Rngs,
  ):
    """remat, scan_layers: the image encoder's (see ImageEncoder); attention_impl: the image
    encoder's and the mask decoder's."""
    self.config = config
    self.image_encoder = ImageEncoder(
      config,
      dtype=dtype,
      remat=remat,
      scan_layers=scan_layers,
      attention_impl=attention_impl,
      rngs=rngs,
    )
    self.prompt_encoder = PromptEncoder(config, dtype=dtype, rngs=rngs)
    self.mask_decoder = MaskDecoder(config, dtype=dtype, attention_impl=attention_impl, rngs=rngs)

  @property
  def image_size(self) -> int:
    return self.config.image_size

  def encode_image(self, images, *, key=None, return_vit: bool = False):
    """images: [B, S, S, 3] (`preprocess`ed) -> [B, g, g, C] float32 (+ ViT features)."""
    return self.image_encoder(images, key=key, return_vit=return_vit)

  def encode_prompts(self, points=None, labels=None, boxes=None, masks=None, mask_valid=None):
    """-> (sparse [N, T, C], dense [N, g, g, C]); see PromptEncoder.__call__."""
    return self.prompt_encoder(points, labels, boxes, masks, mask_valid)

  def dense_pe(self):
    """[g, g, C] positional encoding of the image embedding grid."""
    return self.prompt_encoder.dense_pe()

  def decode(self, image_embeddings, sparse, dense, image_pe=None) -> Decoded:
    """image_embeddings: [N or 1, g, g, C], sparse [N, T, C], dense [N, g, g, C]."""
    image_pe = self.dense_pe() if image_pe is None else image_pe
    return self.mask_decoder(image_embeddings, image_pe, sparse, dense)

  def decode_masks(self, image_embeddings, image_pe, sparse, dense, multimask_output: bool):
    """segment_anything's MaskDecoder.forward: -> (logits [N, M, 4g, 4g], iou [N, M]) with
    M = 3 (multimask) or 1."""
    out = self.mask_decoder(image_embeddings, image_pe, sparse, dense)
    part = slice(1, None) if multimask_output else slice(0, 1)  # masks 1..3 or mask 0
    return out.masks[:, part], out.iou[:, part]
