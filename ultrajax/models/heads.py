"""Downstream heads on the ViT encoder: a multi-scale segmentation decoder.

`Segmenter` = ViT encoder (no pooling) + `PyramidDecoder`. The decoder follows the ViT
segmentation recipe of MAE/BEiT (UPerNet neck) in a light form: the tokens of four blocks
(default: at depths 1/3, 1/2, 2/3 and 1 of the encoder, i.e. blocks 4/6/8/12 of a ViT-B, as
UltraFedFM) are laid out on the patch grid and brought to UPerNet's four strides of the input,
4, 8, 16 and 32 pixels (for patch 16: x4 by two transposed convolutions, x2 by one, x1, x1/2 by
max-pooling; for patch 8: x2, x1, x1/2, x1/4), projected to `channels`, resized to the finest
(stride 4), concatenated, fused by a 3 x 3 convolution + GroupNorm + ReLU, classified per pixel
and bilinearly upsampled to the input size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from ultrajax.models import layers, vit

STRIDES = (4, 8, 16, 32)  # input pixels per feature-map cell of the four levels (UPerNet)


def level_scales(patch_size: int, num_levels: int) -> tuple[int, ...]:
  """log2 of each level's resize of the patch grid: (2, 1, 0, -1) for patch 16, (1, 0, -1, -2)
  for patch 8. Levels beyond four stay at the patch grid (0)."""
  if patch_size < 1 or patch_size & (patch_size - 1):
    raise ValueError(
      f"patch_size {patch_size} is not a power of two: the decoder's levels need the patch "
      f"grid resized by powers of two to strides {STRIDES}"
    )
  return tuple(
    round(math.log2(patch_size / STRIDES[i])) if i < len(STRIDES) else 0 for i in range(num_levels)
  )


def default_feature_blocks(depth: int) -> tuple[int, ...]:
  """Blocks at depths 4/12, 6/12, 8/12 and 12/12 of the encoder: (4, 6, 8, 12) for depth 12."""
  return tuple(sorted({max(1, round(depth * k / 12)) for k in (4, 6, 8, 12)}))


class PyramidDecoder(nnx.Module):
  """Per-pixel logits from several blocks' patch tokens (see the module docstring)."""

  def __init__(
    self,
    width: int,
    num_levels: int,
    num_outputs: int,
    *,
    patch_size: int = 16,
    channels: int = 128,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    def conv(cin, cout, k):
      return nnx.Conv(
        cin, cout, (k, k), padding="SAME", dtype=dtype, param_dtype=jnp.float32, rngs=rngs
      )

    def up(cin):
      return layers.Upsample2x(cin, cin, dtype=dtype, rngs=rngs)

    self.num_levels = num_levels
    self.scales = level_scales(patch_size, num_levels)
    # Level i: max(scale, 0) transposed convolutions (GELU between), or a 2^-scale max-pool.
    self.up = nnx.List([nnx.List([up(width) for _ in range(max(k, 0))]) for k in self.scales])
    self.lateral = nnx.List([conv(width, channels, 1) for _ in range(num_levels)])
    self.fuse = conv(channels * num_levels, channels, 3)
    self.fuse_norm = nnx.GroupNorm(
      channels,
      num_groups=min(32, channels),
      epsilon=1e-5,
      dtype=dtype,
      param_dtype=jnp.float32,
      rngs=rngs,
    )
    self.classify = conv(channels, num_outputs, 1)

  def __call__(self, features: Sequence[jax.Array], grid: int, image_size: int):
    """features: num_levels x [B, 1 + N, D] block outputs (cls token first); grid: sqrt(N).

    Returns logits [B, image_size, image_size, num_outputs] float32.
    """
    finest = max(1, round(grid * 2.0 ** max(self.scales)))
    maps = []
    for i, tokens in enumerate(features):
      x = einops.rearrange(tokens[:, 1:], "b (h w) d -> b h w d", h=grid)
      for j, up in enumerate(self.up[i]):
        x = up(vit.gelu(x) if j else x)
      if self.scales[i] < 0:
        window = 2 ** -self.scales[i]
        x = nnx.max_pool(x, (window, window), strides=(window, window), padding="SAME")
      x = self.lateral[i](x)
      maps.append(jax.image.resize(x, (x.shape[0], finest, finest, x.shape[-1]), "bilinear"))
    x = jax.nn.relu(self.fuse_norm(self.fuse(jnp.concatenate(maps, axis=-1))))
    x = self.classify(x)
    x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[-1]), "bilinear")
    return x.astype(jnp.float32)


class Segmenter(nnx.Module):
  """ViT encoder + PyramidDecoder. num_outputs: 1 for a binary task (sigmoid), else K classes.
  remat, scan_layers, attention_impl: the encoder's (vit.ViT)."""

  def __init__(
    self,
    *,
    width: int,
    depth: int,
    num_heads: int,
    patch_size: int,
    image_size: int,
    num_outputs: int,
    feature_blocks: Sequence[int] = (),
    channels: int = 128,
    drop_path_rate: float = 0.0,
    dtype=jnp.float32,
    remat=False,
    scan_layers: bool = False,
    attention_impl: str = "dot_product",
    rngs: nnx.Rngs,
  ):
    self.feature_blocks = tuple(feature_blocks) or default_feature_blocks(depth)
    bad = [b for b in self.feature_blocks if not 1 <= b <= depth]
    if bad:
      raise ValueError(f"feature_blocks {bad} are outside 1..{depth}")
    self.encoder = vit.ViT(
      width=width,
      depth=depth,
      num_heads=num_heads,
      patch_size=patch_size,
      image_size=image_size,
      pool="none",
      drop_path_rate=drop_path_rate,
      dtype=dtype,
      remat=remat,
      scan_layers=scan_layers,
      attention_impl=attention_impl,
      rngs=rngs,
    )
    self.decoder = PyramidDecoder(
      width,
      len(self.feature_blocks),
      num_outputs,
      patch_size=patch_size,
      channels=channels,
      dtype=dtype,
      rngs=rngs,
    )

  def __call__(self, images, *, key=None):
    """images: [B, S, S, 3] normalized -> logits [B, S, S, num_outputs] float32."""
    _, features = self.encoder.encode(images, key=key, return_blocks=self.feature_blocks)
    return self.decoder(features, self.encoder.grid, self.encoder.image_size)
