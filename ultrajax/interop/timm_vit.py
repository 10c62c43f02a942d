"""ultrajax ViT <-> timm `VisionTransformer` state dicts (e.g. `vit_base_patch16_224`).

Our parameter paths already follow timm's module names, so the conversion is a rename of the
leaves plus layout changes:
  Linear kernel [in, out]           <-> weight [out, in]
  patch-embed conv kernel [p,p,3,D] <-> patch_embed.proj.weight [D, 3, p, p]
  LayerNorm scale                   <-> weight
timm keeps a learned `pos_embed` [1, 1 + N, D]; our ViT uses MAE's fixed sin-cos table, which
is written out on export and compared (not loaded) on import.
Parameters travel as pure dicts: `nnx.to_pure_dict(nnx.state(model, nnx.Param))` (nnx.List
levels have int keys) and back with `nnx.replace_by_pure_dict(state, pure)` + `nnx.update`.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from absl import logging
from flax import nnx
from flax import traverse_util

from ultrajax.models import posemb

# Largest |timm pos_embed - sincos| still treated as the same table (both are float32 casts of
# the same float64 numbers, so real MAE tables agree exactly).
POS_EMBED_ATOL = 1e-6


def _timm_key(path: tuple) -> str:
  """('blocks', 0, 'attn', 'qkv', 'kernel') -> 'blocks.0.attn.qkv.weight'."""
  *modules, leaf = (str(p) for p in path)
  if modules == ["patch_embed"]:
    modules.append("proj")
  return ".".join(modules + [{"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])


def _to_timm_layout(path: tuple, x: np.ndarray) -> np.ndarray:
  if path[-1] != "kernel":
    return x
  return x.transpose(3, 2, 0, 1) if x.ndim == 4 else x.T  # conv [kh,kw,in,out] -> [out,in,kh,kw]


def _from_timm_layout(path: tuple, x: np.ndarray) -> np.ndarray:
  if path[-1] != "kernel":
    return x
  return x.transpose(2, 3, 1, 0) if x.ndim == 4 else x.T


def _timm_shape(path: tuple, shape: tuple) -> tuple:
  if path[-1] == "kernel":
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
  return tuple(shape)


def _grid_and_width(params: Mapping, image_size: int) -> tuple[int, int]:
  patch = params["patch_embed"]["kernel"].shape[0]
  return image_size // patch, params["cls_token"].shape[-1]


def timm_shapes(params: Mapping, *, image_size: int) -> dict[str, tuple[int, ...]]:
  """The timm state-dict key -> shape that `vit_to_timm` produces for these params.

  params: pure dict of a ViT's parameters; leaves may be arrays or jax.ShapeDtypeStructs
  (e.g. from `nnx.eval_shape`), so big models can be described without allocating them.
  """
  grid, width = _grid_and_width(params, image_size)
  shapes = {_timm_key(path): _timm_shape(path, tuple(leaf.shape))
            for path, leaf in traverse_util.flatten_dict(params).items()}
  shapes["pos_embed"] = (1, 1 + grid * grid, width)
  return shapes


def vit_to_timm(params: Mapping, *, image_size: int) -> dict[str, np.ndarray]:
  """Pure dict of ViT params -> timm VisionTransformer state dict (numpy, float32).

  image_size: the model's input size (the params do not record it); sets pos_embed's length.
  A pool='gap' model gives `fc_norm.*` and no `norm.*`, matching timm's global_pool='avg'.
  """
  grid, width = _grid_and_width(params, image_size)
  out = {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    x = _to_timm_layout(path, np.asarray(leaf, np.float32))
    out[_timm_key(path)] = np.array(x, order="C")  # own, writable memory (torch.from_numpy)
  out["pos_embed"] = posemb.sincos_2d(grid, grid, width, cls_token=True)[None]
  return out


def _as_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor; .float() also covers bfloat16, unknown to numpy
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, np.float32)


def vit_from_timm(state_dict: Mapping[str, Any], model) -> dict:
  """timm VisionTransformer state dict -> pure dict of `model`'s parameters (numpy float32).

  state_dict: torch tensors or numpy arrays. model: the target `ViT` (a real or `nnx.eval_shape`
  one; only its parameter structure and image size are read). Missing or unexpected keys and
  shape mismatches raise ValueError listing all of them. A pos_embed that is not our fixed
  sin-cos table (e.g. one learned during timm fine-tuning) is not loaded: a warning is logged.
  """
  template = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  expected = timm_shapes(template, image_size=model.image_size)
  given = {k: _as_numpy(v) for k, v in state_dict.items()}
  missing = sorted(set(expected) - set(given))
  unexpected = sorted(set(given) - set(expected))
  mismatched = [f"{k}: got {given[k].shape}, expected {expected[k]}"
                for k in sorted(set(expected) & set(given)) if given[k].shape != expected[k]]
  if missing or unexpected or mismatched:
    raise ValueError("timm state dict does not fit the ViT:"
                     f"\n  missing keys: {missing}\n  unexpected keys: {unexpected}"
                     f"\n  shape mismatches: {mismatched}")
  grid, width = _grid_and_width(template, model.image_size)
  table = posemb.sincos_2d(grid, grid, width, cls_token=True)[None]
  diff = float(np.max(np.abs(given["pos_embed"] - table)))
  if diff > POS_EMBED_ATOL:
    logging.warning("timm pos_embed differs from the fixed sin-cos table (max |diff| %.3g); "
                    "it is ignored: ultrajax ViTs use fixed sin-cos positions.", diff)
  flat = {}
  for path, leaf in traverse_util.flatten_dict(template).items():
    x = _from_timm_layout(path, given[_timm_key(path)])
    flat[path] = np.array(x, dtype=leaf.dtype, order="C")
  return traverse_util.unflatten_dict(flat)
