"""Frozen CLIP-style ViT teacher (BiomedCLIP's vision tower) and its targets for feature MIM.

BiomedCLIP's image encoder is open_clip's `TimmModel('vit_base_patch16_224', pool='',
proj='linear', proj_bias=False)`: a timm ViT-B/16 trunk (learned position table, exact GELU,
LayerNorm eps 1e-6) plus a bias-free projection of the pooled cls token to 512-d. Its images
are normalised with the OpenAI CLIP mean/std, not ImageNet's. The parameters are laid out as
`trunk` (a `vit.ViT` in timm layout, pos_embed='learned') and optional `proj`, so importing
is a rename (ultrajax/interop/open_clip.py).

CLIP-style towers differ in small ways, chosen by `tower` (TOWERS):
  'timm'       BiomedCLIP's trunk: no pre-norm, LayerNorm eps 1e-6, patch conv with a bias.
  'open_clip'  open_clip's own VisionTransformer (its CLIP ViT-B/16, L/14, ... models): a
               LayerNorm `ln_pre` after the position embedding (before the blocks), LayerNorm
               eps 1e-5 (torch's default), a bias-free patch conv. Exact GELU as open_clip's
               default; towers trained with QuickGELU (OpenAI's weights, `-quickgelu` models)
               are not matched.

URFM's targets are the teacher's patch tokens on the full clean image at the masked student
positions. Which block, which token normalisation and whether to project are unpublished, so
`targets` takes them as arguments (config.teacher.*). When the teacher's patch grid differs
from the student's the tokens are aligned here (`align_tokens`).
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from ultrajax.models import mae, vit

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# 'pool': geometrically exact only: equal grids, mean over k x k teacher tokens (teacher grid
# k times finer), or each teacher token repeated k x k (student grid k times finer).
# 'interpolate': antialiased bilinear resize of the token grid, for any two grid sizes.
ALIGN_MODES = ("pool", "interpolate")
TOWERS = {
  "timm": dict(pre_norm=False, norm_eps=vit.LN_EPS, patch_bias=True),
  "open_clip": dict(pre_norm=True, norm_eps=1e-5, patch_bias=False),
}


def clip_normalize(images01):
  """images01: [..., 3] RGB in [0, 1] -> (x - mean) / std with CLIP statistics, float32."""
  return mae.normalize(images01, CLIP_MEAN, CLIP_STD)


class Teacher(nnx.Module):
  """CLIP-style vision tower: ViT trunk with learned positions + optional projection.

  embed_dim: width of the bias-free `proj` (open_clip's `visual.head.proj` or `visual.proj`);
  0 = none. tower: 'timm' | 'open_clip' (TOWERS, see the module docstring).
  Only ever evaluated (no dropout, no stochastic depth); the job keeps its parameters out of
  the optimizer and stops gradients at its output.
  """

  def __init__(
    self,
    *,
    width: int,
    depth: int,
    num_heads: int,
    patch_size: int,
    image_size: int,
    embed_dim: int = 0,
    mlp_ratio: float = 4.0,
    dtype=jnp.float32,
    tower: str = "timm",
    rngs: nnx.Rngs,
  ):
    if tower not in TOWERS:
      raise ValueError(f"teacher tower {tower!r} is not one of {tuple(TOWERS)}")
    style = TOWERS[tower]
    self.tower = tower
    self.trunk = vit.ViT(
      width=width,
      depth=depth,
      num_heads=num_heads,
      patch_size=patch_size,
      image_size=image_size,
      mlp_ratio=mlp_ratio,
      pool="none",
      pos_embed="learned",
      dtype=dtype,
      rngs=rngs,
    )
    if not style["patch_bias"]:
      self.trunk.patch_embed = vit.patch_embedding(
        width, patch_size, use_bias=False, dtype=dtype, rngs=rngs
      )
    if style["pre_norm"]:
      self.ln_pre = vit.layer_norm(width, dtype=dtype, rngs=rngs)
    for _, module in nnx.iter_modules(self):
      if isinstance(module, nnx.LayerNorm):
        module.epsilon = style["norm_eps"]
    self.embed_dim = embed_dim
    if embed_dim:
      # timm/open_clip init is irrelevant: a teacher is loaded, or random on purpose.
      self.proj = vit.linear(width, embed_dim, use_bias=False, dtype=dtype, rngs=rngs)

  @property
  def image_size(self) -> int:
    return self.trunk.image_size

  @property
  def grid(self) -> int:
    return self.trunk.grid

  def tokens(self, images01, *, block: int = 0, final_norm: bool = True):
    """images01: [B, S, S, 3] in [0, 1] (S = image_size) -> tokens [B, 1 + N, D] float32.

    block: output of this 1-based block (0 = the last); later blocks are not run.
    final_norm: apply the trunk's final LayerNorm (block = last and final_norm is timm's
    `forward_features`).
    """
    depth = self.trunk.depth
    block = block or depth
    if not 1 <= block <= depth:
      raise ValueError(f"teacher block {block} is outside 1..{depth}")
    x = self.trunk.tokens(clip_normalize(images01))
    if TOWERS[self.tower]["pre_norm"]:
      x = self.ln_pre(x)
    x, _ = vit.run_blocks(self.trunk.blocks[:block], x, None, remat=False)
    if final_norm:
      x = self.trunk.norm(x)
    return x.astype(jnp.float32)

  def __call__(self, images01, *, block: int = 0, final_norm: bool = True, project: bool = False):
    """Patch tokens [B, N, D'] (cls dropped); project maps every token through `proj`."""
    x = self.tokens(images01, block=block, final_norm=final_norm)[:, 1:]
    if project:
      if not self.embed_dim:
        raise ValueError("project=True needs a teacher with a projection (embed_dim > 0)")
      x = self.proj(x)
    return x.astype(jnp.float32)


def check_alignable(teacher_grid: int, student_grid: int, mode: str) -> None:
  """Raises ValueError, naming both grids, when `align_tokens` cannot map one onto the other."""
  if mode not in ALIGN_MODES:
    raise ValueError(f"align mode {mode!r} is not one of {ALIGN_MODES}")
  if mode == "pool" and teacher_grid % student_grid and student_grid % teacher_grid:
    raise ValueError(
      f"teacher patch grid {teacher_grid}x{teacher_grid} cannot be aligned with the student "
      f"grid {student_grid}x{student_grid} by pooling: neither divides the other. Choose "
      "image/patch sizes whose grids are equal or multiples (e.g. teacher image size = "
      "student grid x teacher patch), or align='interpolate'"
    )


def align_tokens(tokens, student_grid: int, mode: str = "pool"):
  """tokens: [B, Gt*Gt, D] (raster order) -> [B, Gs*Gs, D], token i over student patch i."""
  teacher_grid = round(tokens.shape[1] ** 0.5)
  if teacher_grid * teacher_grid != tokens.shape[1]:
    raise ValueError(f"teacher tokens {tokens.shape} are not a square patch grid")
  check_alignable(teacher_grid, student_grid, mode)
  if teacher_grid == student_grid:
    return tokens
  grid = einops.rearrange(tokens, "b (h w) d -> b h w d", h=teacher_grid)
  if mode == "interpolate":
    shape = (grid.shape[0], student_grid, student_grid, grid.shape[-1])
    out = jax.image.resize(grid, shape, method="linear", antialias=True)
  elif teacher_grid > student_grid:
    k = teacher_grid // student_grid
    out = einops.reduce(grid, "b (h p) (w q) d -> b h w d", "mean", p=k, q=k)
  else:
    k = student_grid // teacher_grid
    out = einops.repeat(grid, "b h w d -> b (h p) (w q) d", p=k, q=k)
  return einops.rearrange(out, "b h w d -> b (h w) d")


def targets(
  teacher: Teacher,
  images01,
  *,
  student_grid: int,
  block: int = 0,
  final_norm: bool = True,
  project: bool = False,
  align: str = "pool",
):
  """Feature-MIM targets: images01 [B, S, S, 3] in [0, 1] (any S; resized with antialiased
  bicubic to the teacher's input size when different) -> [B, Gs*Gs, D'] float32 aligned to
  the student's patches, gradient-free. Not normalised (mae.feature_loss does that)."""
  size = teacher.image_size
  images01 = jnp.asarray(images01, jnp.float32)
  if images01.shape[1:3] != (size, size):
    images01 = jax.image.resize(
      images01, (images01.shape[0], size, size, 3), "bicubic", antialias=True
    )
  x = teacher(images01, block=block, final_norm=final_norm, project=project)
  return jax.lax.stop_gradient(align_tokens(x, student_grid, align))
