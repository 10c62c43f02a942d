"""ultrajax `MAE` <-> facebookresearch/mae `MaskedAutoencoderViT` state dicts.

The official model is a timm ViT encoder plus a decoder built from the same timm blocks, so the
key map is timm_vit's with the decoder's entries added (ViT-B: 254 keys; the released
encoder-only files, e.g. mae_pretrain_vit_base.pth, hold the first 150):
  ours                                   official key                     layout
  encoder/...                            cls_token, patch_embed.proj.*,   as timm_vit
                                         blocks.i.*, norm.*
  decoder_embed/{kernel,bias}            decoder_embed.{weight,bias}      linear
  mask_token [1, 1, Dd]                  mask_token                       same
  decoder_blocks/i/...                   decoder_blocks.i.*               as timm blocks
  decoder_norm/{scale,bias}              decoder_norm.{weight,bias}       same
  decoder_pred/{kernel,bias}             decoder_pred.{weight,bias}       linear
  (fixed, not a parameter)               pos_embed, decoder_pos_embed     sin-cos, cls row 0
decoder_pred's p*p*3 outputs are in MAE's patchify order (row, column, channel) on both sides,
so no permutation is needed. Checkpoint files wrap the dict under 'model' (interop/files.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from flax import nnx

from ultrajax.interop import timm_vit

# Official keys that only the encoder-only files lack: everything after the encoder.
DECODER_PREFIXES = ("decoder_", "mask_token")


def is_decoder_key(key: str) -> bool:
  return key.startswith(DECODER_PREFIXES)


def mae_rules(params: Mapping) -> list[timm_vit.Rule]:
  """Key map of an MAE pure dict, in the official state dict's order (without positions)."""
  rules = timm_vit.vit_rules(params["encoder"], ("encoder",))
  rules.append(timm_vit.Rule(("mask_token",), "mask_token"))
  rules += timm_vit.linear_rules(("decoder_embed",), "decoder_embed", params["decoder_embed"])
  for i in sorted(params["decoder_blocks"]):
    rules += timm_vit.block_rules(
      ("decoder_blocks", i), f"decoder_blocks.{i}", params["decoder_blocks"][i]
    )
  rules += timm_vit.norm_rules(("decoder_norm",), "decoder_norm")
  rules += timm_vit.linear_rules(("decoder_pred",), "decoder_pred", params["decoder_pred"])
  timm_vit.check_rules_cover(params, rules)
  return rules


def _grid_and_widths(params: Mapping, image_size: int) -> tuple[int, int, int]:
  """(patch grid side, encoder width, decoder width)."""
  patch = params["encoder"]["patch_embed"]["kernel"].shape[0]
  return (
    image_size // patch,
    params["encoder"]["cls_token"].shape[-1],
    params["mask_token"].shape[-1],
  )


def official_shapes(params: Mapping, *, image_size: int) -> dict[str, tuple[int, ...]]:
  """{official key: shape} of the full state dict `mae_to_official` writes (254 keys for
  MAE-B). Leaves may be ShapeDtypeStructs (an `nnx.eval_shape` model)."""
  grid, width, decoder_width = _grid_and_widths(params, image_size)
  shapes = timm_vit.torch_shapes(params, mae_rules(params))
  shapes["pos_embed"] = (1, 1 + grid * grid, width)
  shapes["decoder_pos_embed"] = (1, 1 + grid * grid, decoder_width)
  return shapes


def mae_to_official(params: Mapping, *, image_size: int, patch_size: int) -> dict[str, np.ndarray]:
  """MAE pure dict -> official `MaskedAutoencoderViT` state dict (numpy float32, 254 keys for
  MAE-B), with both sin-cos position tables for `image_size`."""
  kernel_patch = params["encoder"]["patch_embed"]["kernel"].shape[0]
  if kernel_patch != patch_size or image_size % patch_size:
    raise ValueError(
      f"patch_size={patch_size}, image_size={image_size} do not fit the params "
      f"(patch-embed kernel {kernel_patch}x{kernel_patch})"
    )
  grid, width, decoder_width = _grid_and_widths(params, image_size)
  out = timm_vit.export_tensors(params, mae_rules(params))
  out["pos_embed"] = timm_vit.pos_embed_table(grid, width)
  out["decoder_pos_embed"] = timm_vit.pos_embed_table(grid, decoder_width)
  return out


def mae_from_official(
  state_dict: Mapping[str, Any], model, *, strict: bool = True, base_params: Mapping | None = None
) -> dict:
  """Official MAE state dict (full or encoder-only) -> pure dict of `model`'s parameters.

  state_dict: torch tensors or numpy arrays, already unwrapped from 'model'. model: the target
  `MAE` (real, or from `nnx.eval_shape`: structure and image size are all that is read, unless
  values must be kept). An encoder-only file (no decoder_* / mask_token key) loads the encoder
  and keeps the decoder; the kept keys are logged. Values that are kept come from
  `base_params` (a pure dict), default the model's own parameters.
  strict=True: missing, unexpected and mis-shaped keys raise ValueError naming every one.
  strict=False: missing keys are kept and unexpected ones ignored, both logged; mis-shaped
  keys still raise (as torch's load_state_dict). Position tables are checked, not loaded.
  """
  template = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  rules = mae_rules(template)
  image_size = model.encoder.image_size
  grid, width, decoder_width = _grid_and_widths(template, image_size)
  given = {k: timm_vit.as_numpy(v) for k, v in state_dict.items()}
  shapes = {k: v.shape for k, v in given.items()}
  widths = dict(pos_embed=width, decoder_pos_embed=decoder_width)
  expected = official_shapes(template, image_size=image_size)
  for key, key_width in widths.items():
    if key in shapes and timm_vit.pos_embed_shape_ok(shapes[key], key_width):
      expected[key] = tuple(shapes[key])
  encoder_only = not any(is_decoder_key(k) for k in given)
  expected_here = {k: s for k, s in expected.items() if not (encoder_only and is_decoder_key(k))}
  missing, unexpected, mismatched = timm_vit.key_problems(shapes, expected_here)
  what = f"official MAE state dict does not fit the MAE ({len(given)} keys given)"
  if strict:
    timm_vit.raise_key_problems(what, missing, unexpected, mismatched)
  else:
    timm_vit.raise_key_problems(what, [], [], mismatched)
    if missing or unexpected:
      logging.warning(
        "strict=False: %d missing keys (the model's values kept): %s; %d "
        "unexpected keys (ignored): %s",
        len(missing),
        missing,
        len(unexpected),
        unexpected,
      )
  kept = [k for k in expected if k not in given and k not in widths]
  if encoder_only:
    logging.info(
      "Encoder-only MAE file: loaded the encoder; kept %d decoder parameters: %s", len(kept), kept
    )
  base = template if base_params is None else base_params
  if kept and timm_vit.is_abstract(base):
    raise ValueError(
      f"the file lacks {kept[:3]}... ({len(kept)} keys) and the model has no "
      "values to keep (built under nnx.eval_shape): pass base_params"
    )
  for key in widths:
    if key in given:
      timm_vit.check_pos_embed(key, given[key], grid, widths[key])
  return timm_vit.import_tensors(given, template, rules, base)
