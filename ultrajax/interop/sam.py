"""ultrajax SAM <-> segment_anything state dicts (`sam_vit_b_01ec64.pth`, `sam_vit_l`, `sam_vit_h`).

One `Rule` per tensor, in segment_anything's `state_dict()` order (same names: same keys):
  ours (pure-dict path)                             segment_anything key               layout
  image_encoder/patch_embed/kernel [16, 16, 3, D]   image_encoder.patch_embed.proj.weight  conv
  image_encoder/pos_embed [1, g, g, D]              image_encoder.pos_embed            same
  image_encoder/blocks/i/attn/{qkv,proj}            ...blocks.i.attn.{qkv,proj}        linear
  image_encoder/blocks/i/attn/rel_pos_{h,w}         ...blocks.i.attn.rel_pos_{h,w}     same
  image_encoder/blocks/i/mlp/{lin1,lin2}            ...blocks.i.mlp.{lin1,lin2}        linear
  image_encoder/neck_{conv1,norm1,conv2,norm2}      image_encoder.neck.{0,1,2,3}       conv/same
  prompt_encoder/pe_gaussian [2, C/2]               prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
  prompt_encoder/{neg_point,pos_point,box_corner_a,box_corner_b}
                                                    prompt_encoder.point_embeddings.{0,1,2,3}.weight
  prompt_encoder/{not_a_point,no_mask}              ...{not_a_point_embed,no_mask_embed}.weight
  prompt_encoder/mask_{conv1,norm1,conv2,norm2,conv3}  ...mask_downscaling.{0,1,3,4,6}
  mask_decoder/transformer/...                      mask_decoder.transformer.... (same names)
  mask_decoder/{iou_token,mask_tokens}              mask_decoder.{iou_token,mask_tokens}.weight
  mask_decoder/upscale_{conv1,norm,conv2}           mask_decoder.output_upscaling.{0,1,3}  conv_transpose
  mask_decoder/output_hypernetworks_mlps/i/layers/j, iou_prediction_head/layers/j   (same names)
conv_transpose: torch ConvTranspose2d weight [in, out, kh, kw] <-> Flax ConvTranspose kernel
[kh, kw, in, out] flipped in both spatial axes (torch's transposed convolution is the
gradient of a convolution, which flips the kernel; Flax's does not).
`pixel_mean`/`pixel_std` are non-persistent buffers, absent from the files (ours are
constants in models/sam.py). The optional `mask_decoder/cls_tokens` has no SAM key: export
drops it (with a warning), import keeps the model's own values.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from flax import nnx, traverse_util

from ultrajax.interop import files
from ultrajax.interop.timm_vit import (
  Rule,
  as_numpy,
  check_rules_cover,
  export_tensors,
  import_tensors,
  is_abstract,
  key_problems,
  norm_rules,
  raise_key_problems,
  torch_shapes,
)
from ultrajax.models import sam as sam_lib

EXTRA_PATHS = (("mask_decoder", "cls_tokens"),)  # ours only, no segment_anything key


# ----------------------------------------------------------------------------- key map
# Children in segment_anything's registration (= state_dict) order where it differs from our
# pure dicts' sorted names; a module's own tensors (rel_pos_*) come before its submodules.
ORDERS = (
  ("rel_pos_h", "rel_pos_w", "qkv", "proj"),
  ("norm1", "attn", "norm2", "mlp"),
  ("q_proj", "k_proj", "v_proj", "out_proj"),
  (
    "self_attn",
    "norm1",
    "cross_attn_token_to_image",
    "norm2",
    "mlp",
    "norm3",
    "norm4",
    "cross_attn_image_to_token",
  ),
  ("layers", "final_attn_token_to_image", "norm_final_attn"),
)


def _same_names(path, key, p, layout="conv") -> list[Rule]:
  """Rules of a subtree named as in segment_anything: a tensor, a LayerNorm (scale), a Linear
  (2-D kernel) or convolution (4-D kernel in `layout`), or submodules in ORDERS' order."""
  if not isinstance(p, Mapping):
    return [Rule(path, key)]
  if "scale" in p:
    return norm_rules(path, key)
  if "kernel" in p:
    kernel_layout = "linear" if len(p["kernel"].shape) == 2 else layout
    rules = [Rule(path + ("kernel",), f"{key}.weight", kernel_layout)]
    return rules + ([Rule(path + ("bias",), f"{key}.bias")] if "bias" in p else [])
  order = next((o for o in ORDERS if set(o) == set(p)), sorted(p))
  return _renamed(path, key, p, dict(zip(order, order)), layout)


def _renamed(path, key, p, names: Mapping, layout="conv") -> list[Rule]:
  """Rules of the children of `p` (at `path`) in the order of `names`: {ours: torch name}."""
  return [
    rule
    for ours, theirs in names.items()
    for rule in _same_names(path + (ours,), f"{key}.{theirs}", p[ours], layout)
  ]


def _encoder_rules(p) -> list[Rule]:
  path, key = ("image_encoder",), "image_encoder"
  neck = dict(neck_conv1=0, neck_norm1=1, neck_conv2=2, neck_norm2=3)
  return (
    [Rule(path + ("pos_embed",), f"{key}.pos_embed")]
    + _same_names(path + ("patch_embed",), f"{key}.patch_embed.proj", p["patch_embed"])
    + _same_names(path + ("blocks",), f"{key}.blocks", p["blocks"])
    + _renamed(path, f"{key}.neck", p, neck)
  )


def _prompt_rules(p) -> list[Rule]:
  path, key = ("prompt_encoder",), "prompt_encoder"
  points = ("neg_point", "pos_point", "box_corner_a", "box_corner_b")
  masks = dict(mask_conv1=0, mask_norm1=1, mask_conv2=3, mask_norm2=4, mask_conv3=6)
  return (
    [Rule(path + ("pe_gaussian",), f"{key}.pe_layer.positional_encoding_gaussian_matrix")]
    + [Rule(path + (name,), f"{key}.point_embeddings.{i}.weight") for i, name in enumerate(points)]
    + [Rule(path + ("not_a_point",), f"{key}.not_a_point_embed.weight")]
    + _renamed(path, f"{key}.mask_downscaling", p, masks)
    + [Rule(path + ("no_mask",), f"{key}.no_mask_embed.weight")]
  )


def _decoder_rules(p) -> list[Rule]:
  path, key = ("mask_decoder",), "mask_decoder"
  upscaling = dict(upscale_conv1=0, upscale_norm=1, upscale_conv2=3)
  heads = ("output_hypernetworks_mlps", "iou_prediction_head")
  return (
    _same_names(path + ("transformer",), f"{key}.transformer", p["transformer"])
    + [Rule(path + (name,), f"{key}.{name}.weight") for name in ("iou_token", "mask_tokens")]
    + _renamed(path, f"{key}.output_upscaling", p, upscaling, "conv_transpose")
    + _renamed(path, key, p, dict(zip(heads, heads)))
  )


def sam_rules(params: Mapping) -> list[Rule]:
  """Key map of a Sam's pure dict (arrays or ShapeDtypeStructs), segment_anything's order.
  Our extra parameters (EXTRA_PATHS) have no rule."""
  rules = (
    _encoder_rules(params["image_encoder"])
    + _prompt_rules(params["prompt_encoder"])
    + _decoder_rules(params["mask_decoder"])
  )
  flat = traverse_util.flatten_dict(params)
  check_rules_cover(
    traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in EXTRA_PATHS}), rules
  )
  return rules


# ----------------------------------------------------------------------------- conversion
def sam_to_torch(params: Mapping) -> dict[str, np.ndarray]:
  """Pure dict of Sam params -> segment_anything state dict (numpy float32, its key order)."""
  flat = traverse_util.flatten_dict(params)
  dropped = [p for p in flat if p in EXTRA_PATHS]
  if dropped:
    logging.warning(
      "SAM export: %s have no segment_anything key and are not written.",
      ["/".join(map(str, p)) for p in dropped],
    )
  return export_tensors(params, sam_rules(params))


def sam_from_torch(state_dict: Mapping[str, Any], model) -> dict:
  """segment_anything state dict -> pure dict of `model`'s params (numpy float32).

  model: the target `Sam` (real, or from nnx.eval_shape when it has no extra parameters).
  Missing or unexpected keys and shape mismatches raise ValueError naming every one (a
  checkpoint for another variant or image size shows up as shape mismatches). Extra
  parameters of ours (cls tokens) keep the model's values.
  """
  template = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  rules = sam_rules(template)
  given = {k: as_numpy(v) for k, v in state_dict.items()}
  raise_key_problems(
    "segment_anything state dict does not fit the SAM model",
    *key_problems({k: v.shape for k, v in given.items()}, torch_shapes(template, rules)),
  )
  flat = traverse_util.flatten_dict(template)
  extra = [p for p in flat if p in EXTRA_PATHS]
  if extra and is_abstract(template):
    raise ValueError(
      f"{['/'.join(p) for p in extra]} have no segment_anything key and keep "
      "the model's values: pass a concrete model, not an nnx.eval_shape one"
    )
  out = traverse_util.flatten_dict(import_tensors(given, template, rules))
  out.update((p, np.asarray(flat[p])) for p in extra)
  return traverse_util.unflatten_dict(out)


def config_from_state_dict(state_dict: Mapping[str, Any], **overrides) -> sam_lib.SamConfig:
  """The SamConfig a segment_anything state dict was saved from (width, depth, heads,
  global blocks, window, image size, decoder sizes are read off the shapes)."""
  shape = lambda k: tuple(np.shape(state_dict[k]))

  def count(prefix: str) -> int:
    """1 + the largest index i of the keys `prefix` + 'i.*' (blocks, layers)."""
    return 1 + max(int(k[len(prefix) :].split(".")[0]) for k in state_dict if k.startswith(prefix))

  try:
    _, grid, _, width = shape("image_encoder.pos_embed")
    patch = shape("image_encoder.patch_embed.proj.weight")[-1]
    depth = count("image_encoder.blocks.")
    head_dim = shape("image_encoder.blocks.0.attn.rel_pos_h")[1]
    sizes = [(shape(f"image_encoder.blocks.{i}.attn.rel_pos_h")[0] + 1) // 2 for i in range(depth)]
    dim = shape("mask_decoder.iou_token.weight")[1]
    layers = count("mask_decoder.transformer.layers.")
    inner = shape("mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight")[0]
    fields = dict(
      image_size=grid * patch,
      patch_size=patch,
      width=width,
      depth=depth,
      num_heads=width // head_dim,
      global_attn_indexes=tuple(i for i, s in enumerate(sizes) if s == grid),
      window_size=min(sizes),
      prompt_dim=dim,
      mask_in_chans=shape("prompt_encoder.mask_downscaling.3.weight")[0],
      decoder_depth=layers,
      decoder_mlp_dim=shape("mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
      attention_downsample=dim // inner,
      num_multimask_outputs=shape("mask_decoder.mask_tokens.weight")[0] - 1,
      iou_head_hidden=shape("mask_decoder.iou_prediction_head.layers.0.weight")[0],
      iou_head_depth=count("mask_decoder.iou_prediction_head.layers."),
    )
  except KeyError as e:
    raise ValueError(f"not a segment_anything SAM state dict: key {e} is missing") from None
  # Head count of the decoder is not visible in shapes; SAM uses 8 at every size.
  fields.setdefault("decoder_heads", 8)
  if all(s == grid for s in sizes):  # no windowed block: any window works, keep SAM's
    fields["window_size"] = sam_lib.SamConfig.window_size
  fields.update(overrides)
  return sam_lib.sam_config("vit_b", **fields)


def load_sam(path, *, dtype=None, **overrides):
  """(Sam model with the weights of a segment_anything file, its SamConfig).

  path: .pth/.pt/.bin or .safetensors state dict. The architecture comes from the tensor
  shapes (`config_from_state_dict`); overrides replace fields (e.g. decoder_heads for a
  non-standard decoder).
  """
  import jax
  import jax.numpy as jnp

  path = pathlib.Path(path)
  state_dict = files.load_state_dict(path)
  try:
    config = config_from_state_dict(state_dict, **overrides)
    # Abstract: no time goes into a random init that the file overwrites.
    abstract = nnx.eval_shape(
      lambda: sam_lib.Sam(config, dtype=dtype or jnp.float32, rngs=nnx.Rngs(0))
    )
    params = sam_from_torch(state_dict, abstract)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  graphdef, state = nnx.split(abstract, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state), config


def preprocessing(image_size: int) -> dict:
  """What an exported SAM expects of its input, for the file's metadata: segment_anything's
  `Sam.preprocess` (RGB on the 0-255 scale, long side resized to `image_size`, normalised with
  these pixel_mean/pixel_std, zero-padded at the bottom and right)."""
  return dict(
    pixel_mean=list(sam_lib.PIXEL_MEAN),
    pixel_std=list(sam_lib.PIXEL_STD),
    image_size=int(image_size),
    channels="RGB",
    scale="0-255",
    resize="longest side to image_size, then pad bottom/right with zeros",
  )
