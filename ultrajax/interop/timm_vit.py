"""ultrajax ViT <-> timm `VisionTransformer` state dicts (e.g. `vit_base_patch16_224`), and the
explicit key maps the other PyTorch formats (interop/mae_official.py) build on.

A key map is a list of `Rule`s, one per parameter, written out by name (no matching by shape):
  ours (pure-dict path)                       PyTorch key                    layout
  patch_embed/kernel [p, p, 3, D]             patch_embed.proj.weight        conv [D, 3, p, p]
  patch_embed/bias, cls_token                 patch_embed.proj.bias, ...     same
  blocks/i/{norm1,norm2}/{scale,bias}         blocks.i.norm1.{weight,bias}   same
  blocks/i/attn/{qkv,proj}/{kernel,bias}      blocks.i.attn.qkv.{weight,..}  linear [out, in]
  blocks/i/mlp/{fc1,fc2}/{kernel,bias}        blocks.i.mlp.fc1.{weight,..}   linear
  norm | fc_norm, head                        norm.weight, head.weight, ...
timm keeps a learned `pos_embed` [1, 1 + N, D]; our ViT uses MAE's fixed sin-cos table, which
is written out on export and compared (not loaded) on import.
Parameters travel as pure dicts: `nnx.to_pure_dict(nnx.state(model, nnx.Param))` (nnx.List
levels have int keys) and back with `nnx.replace_by_pure_dict(state, pure)` + `nnx.update`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx, traverse_util

from ultrajax.interop import posemb as posemb_resample
from ultrajax.models import mae, posemb

# Largest |imported pos_embed - sincos| still treated as the same table (both are float32 casts
# of the same float64 numbers, so real MAE tables agree exactly).
POS_EMBED_ATOL = 1e-6
# Problems listed per kind in an error message; a width mismatch would otherwise list them all.
MAX_LISTED = 12
TIMM_HEAD_KEYS = ("head.weight", "head.bias")  # a classifier's head: dropped by headless imports


@dataclasses.dataclass(frozen=True)
class Rule:
  """One parameter: our pure-dict path <-> a PyTorch state-dict key, and the layout change.

  layout: 'same'; 'linear' (Dense kernel [in, out] <-> nn.Linear weight [out, in]);
  'conv' (Conv kernel [kh, kw, in, out] <-> nn.Conv2d weight [out, in, kh, kw]);
  'conv_transpose' (ConvTranspose kernel [kh, kw, in, out] <-> nn.ConvTranspose2d weight
  [in, out, kh, kw], flipped in both spatial axes: interop/sam.py).
  """

  path: tuple
  key: str
  layout: str = "same"


def to_torch_layout(layout: str, x: np.ndarray) -> np.ndarray:
  if layout == "linear":
    return x.T
  if layout == "conv":
    return x.transpose(3, 2, 0, 1)
  if layout == "conv_transpose":
    return x[::-1, ::-1].transpose(2, 3, 0, 1)
  if layout == "same":
    return x
  raise ValueError(f"unknown layout {layout!r}")


def from_torch_layout(layout: str, x: np.ndarray) -> np.ndarray:
  if layout == "linear":
    return x.T
  if layout == "conv":
    return x.transpose(2, 3, 1, 0)
  if layout == "conv_transpose":
    return x.transpose(2, 3, 0, 1)[::-1, ::-1]
  if layout == "same":
    return x
  raise ValueError(f"unknown layout {layout!r}")


def torch_shape(layout: str, shape: tuple) -> tuple:
  return to_torch_layout(layout, np.empty(shape, np.bool_)).shape


# ----------------------------------------------------------------------------- key maps
def linear_rules(path: tuple, key: str, params: Mapping) -> list[Rule]:
  """nnx.Linear at `path` <-> nn.Linear `key` (bias only where the layer has one)."""
  rules = [Rule(path + ("kernel",), f"{key}.weight", "linear")]
  if "bias" in params:
    rules.append(Rule(path + ("bias",), f"{key}.bias"))
  return rules


def norm_rules(path: tuple, key: str) -> list[Rule]:
  """nnx.LayerNorm at `path` <-> nn.LayerNorm `key`."""
  return [Rule(path + ("scale",), f"{key}.weight"), Rule(path + ("bias",), f"{key}.bias")]


def block_rules(path: tuple, key: str, params: Mapping) -> list[Rule]:
  """vit.Block at `path` <-> timm `Block` at `key` (e.g. 'blocks.3', 'decoder_blocks.0')."""
  return (
    norm_rules(path + ("norm1",), f"{key}.norm1")
    + linear_rules(path + ("attn", "qkv"), f"{key}.attn.qkv", params["attn"]["qkv"])
    + linear_rules(path + ("attn", "proj"), f"{key}.attn.proj", params["attn"]["proj"])
    + norm_rules(path + ("norm2",), f"{key}.norm2")
    + linear_rules(path + ("mlp", "fc1"), f"{key}.mlp.fc1", params["mlp"]["fc1"])
    + linear_rules(path + ("mlp", "fc2"), f"{key}.mlp.fc2", params["mlp"]["fc2"])
  )


def vit_rules(params: Mapping, path: tuple = ()) -> list[Rule]:
  """Key map of a ViT's pure dict (at `path` inside a larger tree), in timm's key order.

  params: the ViT's own pure dict (arrays or ShapeDtypeStructs). pos_embed is not a parameter
  of ours and has no rule. A pool='gap' model maps `fc_norm` (timm's global_pool='avg').
  """
  rules = [
    Rule(path + ("cls_token",), "cls_token"),
    Rule(path + ("patch_embed", "kernel"), "patch_embed.proj.weight", "conv"),
    Rule(path + ("patch_embed", "bias"), "patch_embed.proj.bias"),
  ]
  for i in sorted(params["blocks"]):
    rules += block_rules(path + ("blocks", i), f"blocks.{i}", params["blocks"][i])
  for name in ("norm", "fc_norm"):
    if name in params:
      rules += norm_rules(path + (name,), name)
  if "head" in params:
    rules += linear_rules(path + ("head",), "head", params["head"])
  return rules


def check_rules_cover(params: Mapping, rules: Iterable[Rule]) -> None:
  """Every leaf of `params` has exactly one rule (else the key map is out of date: a bug)."""
  leaves = set(traverse_util.flatten_dict(params))
  paths = [r.path for r in rules]
  unmapped, unknown = leaves - set(paths), set(paths) - leaves
  if unmapped or unknown or len(paths) != len(set(paths)):
    raise AssertionError(
      f"key map out of date: unmapped {sorted(map(str, unmapped))}, "
      f"unknown {sorted(map(str, unknown))}"
    )


# ----------------------------------------------------------------------------- conversion
def as_numpy(value: Any) -> np.ndarray:
  """torch.Tensor or array -> numpy float32 (.float() also covers bfloat16, unknown to numpy)."""
  if hasattr(value, "detach"):
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, np.float32)


def export_tensors(params: Mapping, rules: Iterable[Rule]) -> dict[str, np.ndarray]:
  """Pure dict -> {PyTorch key: numpy float32 in PyTorch layout}, in the rules' order."""
  flat = traverse_util.flatten_dict(params)
  # np.array(order='C'): own, writable, contiguous memory (torch.from_numpy, safetensors).
  return {
    r.key: np.array(to_torch_layout(r.layout, np.asarray(flat[r.path], np.float32)), order="C")
    for r in rules
  }


def torch_shapes(params: Mapping, rules: Iterable[Rule]) -> dict[str, tuple[int, ...]]:
  """{PyTorch key: shape} that `export_tensors` gives (leaves may be ShapeDtypeStructs)."""
  flat = traverse_util.flatten_dict(params)
  return {r.key: torch_shape(r.layout, tuple(flat[r.path].shape)) for r in rules}


def import_tensors(
  given: Mapping[str, np.ndarray],
  template: Mapping,
  rules: Iterable[Rule],
  base: Mapping | None = None,
) -> dict:
  """{PyTorch key: array} -> pure dict shaped like `template` (dtypes from it).

  Leaves whose key is not in `given` come from `base` (a pure dict; values kept as they are);
  the caller has checked keys and shapes.
  """
  flat = traverse_util.flatten_dict(template)
  kept = traverse_util.flatten_dict(base) if base is not None else {}
  out = {}
  for r in rules:
    if r.key in given:
      x = from_torch_layout(r.layout, given[r.key])
      out[r.path] = np.array(x, dtype=flat[r.path].dtype, order="C")
    else:
      out[r.path] = kept[r.path]
  return traverse_util.unflatten_dict(out)


def _listed(items: list[str]) -> str:
  more = f" ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
  return "[" + ", ".join(items[:MAX_LISTED]) + "]" + more


def key_problems(
  given: Mapping[str, tuple], expected: Mapping[str, tuple]
) -> tuple[list[str], list[str], list[str]]:
  """(missing keys, unexpected keys, 'key: got S, expected T' lines), each in key order
  (expected's order for missing and mismatched, given's for unexpected)."""
  missing = [k for k in expected if k not in given]
  unexpected = [k for k in given if k not in expected]
  mismatched = [
    f"{k}: got {tuple(given[k])}, expected {tuple(expected[k])}"
    for k in expected
    if k in given and tuple(given[k]) != tuple(expected[k])
  ]
  return missing, unexpected, mismatched


def raise_key_problems(
  what: str, missing: list[str], unexpected: list[str], mismatched: list[str]
) -> None:
  """ValueError listing every problem of a state dict (no-op when there is none)."""
  if missing or unexpected or mismatched:
    raise ValueError(
      f"{what}:\n  missing keys: {_listed(missing)}"
      f"\n  unexpected keys: {_listed(unexpected)}"
      f"\n  shape mismatches: {_listed(mismatched)}"
    )


# ----------------------------------------------------------------------------- pos_embed
def pos_embed_table(grid: int, width: int) -> np.ndarray:
  """The fixed table a learned-position model gets from us: [1, 1 + grid^2, width], cls row 0."""
  return posemb.sincos_2d(grid, grid, width, cls_token=True)[None]


def pos_embed_shape_ok(shape: tuple, width: int) -> bool:
  """[1, 1 + g*g, width] for some grid g: importable (other grids are resampled)."""
  return (
    len(shape) == 3
    and shape[0] == 1
    and shape[2] == width
    and shape[1] > 1
    and math.isqrt(shape[1] - 1) ** 2 == shape[1] - 1
  )


def check_pos_embed(key: str, table: np.ndarray, grid: int, width: int) -> None:
  """Logs a warning when an imported position table is not our fixed sin-cos one.

  Our models use fixed sin-cos positions, so the table is never loaded; a learned one (e.g.
  after timm fine-tuning) is lost, and the warning says how much. A table for another grid is
  resampled first, as timm does when it loads a checkpoint at another image size; a sin-cos
  table of another grid is the same fixed function and needs no warning.
  """
  given_grid = math.isqrt(table.shape[1] - 1)
  if given_grid != grid:
    same = np.max(np.abs(table - pos_embed_table(given_grid, width))) <= POS_EMBED_ATOL
    if same:
      logging.info(
        "%s: sin-cos table of a %dx%d grid; ours is %dx%d (fixed, not loaded).",
        key,
        given_grid,
        given_grid,
        grid,
        grid,
      )
      return
    table = posemb_resample.resample_abs_pos_embed(table, (grid, grid))
  diff = float(np.max(np.abs(table - pos_embed_table(grid, width))))
  if diff > POS_EMBED_ATOL:
    resampled = f" (resampled from {given_grid}x{given_grid})" if given_grid != grid else ""
    logging.warning(
      "%s differs from the fixed sin-cos table%s (max |diff| %.3g); it is "
      "ignored: ultrajax ViTs use fixed sin-cos positions.",
      key,
      resampled,
      diff,
    )


def is_abstract(tree) -> bool:
  """True when the leaves are shapes only (a model built under nnx.eval_shape)."""
  return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- timm ViT
def _grid_and_width(params: Mapping, image_size: int) -> tuple[int, int]:
  patch = params["patch_embed"]["kernel"].shape[0]
  return image_size // patch, params["cls_token"].shape[-1]


def vit_to_timm(params: Mapping, *, image_size: int) -> dict[str, np.ndarray]:
  """Pure dict of ViT params -> timm VisionTransformer state dict (numpy, float32).

  image_size: the model's input size (the params do not record it); sets pos_embed's length.
  A pool='gap' model gives `fc_norm.*` and no `norm.*`, matching timm's global_pool='avg'.
  """
  rules = vit_rules(params)
  check_rules_cover(params, rules)
  out = export_tensors(params, rules)
  out["pos_embed"] = pos_embed_table(*_grid_and_width(params, image_size))
  return out


def vit_from_timm(state_dict: Mapping[str, Any], model) -> dict:
  """timm VisionTransformer state dict -> pure dict of `model`'s parameters (numpy float32).

  state_dict: torch tensors or numpy arrays. model: the target `ViT` (a real or `nnx.eval_shape`
  one; only its parameter structure and image size are read). Missing or unexpected keys and
  shape mismatches raise ValueError listing all of them. pos_embed may be for another grid;
  it is checked, not loaded (`check_pos_embed`).
  """
  template = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  rules = vit_rules(template)
  check_rules_cover(template, rules)
  grid, width = _grid_and_width(template, model.image_size)
  given = {k: as_numpy(v) for k, v in state_dict.items()}
  expected = dict(torch_shapes(template, rules), pos_embed=(1, 1 + grid * grid, width))
  shapes = {k: v.shape for k, v in given.items()}
  if "pos_embed" in shapes and pos_embed_shape_ok(shapes["pos_embed"], width):
    expected["pos_embed"] = shapes["pos_embed"]
  raise_key_problems("timm state dict does not fit the ViT", *key_problems(shapes, expected))
  check_pos_embed("timm pos_embed", given["pos_embed"], grid, width)
  return import_tensors(given, template, rules)


# ------------------------------------------------------------------------------------------------
# Preprocessing that travels with an export (timm `pretrained_cfg`, HF-Hub `config.json`)

# timm names of the standard shapes (width, depth, heads, patch); others keep vit_base's name
# with their own model_args, which timm applies over the named architecture's defaults.
TIMM_ARCHITECTURES = {
  (192, 12, 3, 16): "vit_tiny_patch16_224",
  (384, 12, 6, 16): "vit_small_patch16_224",
  (768, 12, 12, 16): "vit_base_patch16_224",
  (1024, 24, 16, 16): "vit_large_patch16_224",
  (1280, 32, 16, 14): "vit_huge_patch14_224",
}


def timm_pretrained_cfg(image_size: int) -> dict:
  """timm's `pretrained_cfg` for an ultrajax encoder: what `timm.data.resolve_data_config`
  and `create_transform` build inference transforms from.

  ultrajax feeds [0, 1] RGB normalised with the ImageNet mean/std (models/mae.py `normalize`)
  and evaluates on the whole image resized to the square input (data/tasks.py: bilinear, no
  crop), hence crop_pct 1.0; timm resizes the short side and centre-crops, the same for square
  images.
  """
  return dict(
    input_size=[3, image_size, image_size],
    fixed_input_size=True,
    interpolation="bilinear",
    crop_pct=1.0,
    crop_mode="center",
    mean=list(mae.IMAGENET_MEAN),
    std=list(mae.IMAGENET_STD),
    num_classes=0,
    first_conv="patch_embed.proj",
    classifier="head",
  )


def timm_hub_config(params: Mapping, *, image_size: int, num_heads: int) -> dict:
  """The `config.json` of timm's Hugging Face Hub layout for `vit_to_timm(params)`: the
  architecture and its model_args (a cls-token ViT, no head) and the pretrained_cfg, so that
  `timm.create_model('local-dir:<folder>', pretrained=True)` rebuilds and loads the encoder."""
  grid, width = _grid_and_width(params, image_size)
  patch = image_size // grid
  depth = len(params["blocks"])
  hidden = params["blocks"][0]["mlp"]["fc1"]["kernel"].shape[-1]
  pool = "avg" if "fc_norm" in params else "token"
  model_args = dict(
    img_size=image_size,
    patch_size=patch,
    embed_dim=width,
    depth=depth,
    num_heads=num_heads,
    mlp_ratio=hidden / width,
    global_pool=pool,
    num_classes=0,
  )
  return dict(
    architecture=TIMM_ARCHITECTURES.get((width, depth, num_heads, patch), "vit_base_patch16_224"),
    num_classes=0,
    num_features=width,
    global_pool=pool,
    model_args=model_args,
    pretrained_cfg=timm_pretrained_cfg(image_size),
  )
