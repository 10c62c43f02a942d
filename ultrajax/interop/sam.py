"""ultrajax SAM <-> segment_anything state dicts (`sam_vit_b_01ec64.pth`, `sam_vit_l`, `sam_vit_h`).

One `Rule` per tensor, written out by name, in segment_anything's `state_dict()` order:
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
  from_torch_layout,
  is_abstract,
  key_problems,
  linear_rules,
  norm_rules,
  raise_key_problems,
  torch_shapes,
)
from ultrajax.models import sam as sam_lib

EXTRA_PATHS = (("mask_decoder", "cls_tokens"),)  # ours only, no segment_anything key


# ----------------------------------------------------------------------------- key map
def _conv(path, key, params, layout="conv") -> list[Rule]:
  rules = [Rule(path + ("kernel",), f"{key}.weight", layout)]
  if "bias" in params:
    rules.append(Rule(path + ("bias",), f"{key}.bias"))
  return rules


def _encoder_rules(p) -> list[Rule]:
  path, key = ("image_encoder",), "image_encoder"
  rules = [Rule(path + ("pos_embed",), f"{key}.pos_embed")]
  rules += _conv(path + ("patch_embed",), f"{key}.patch_embed.proj", p["patch_embed"])
  for i in sorted(p["blocks"]):
    bp, bk, b = path + ("blocks", i), f"{key}.blocks.{i}", p["blocks"][i]
    rules += norm_rules(bp + ("norm1",), f"{bk}.norm1")
    rules += [
      Rule(bp + ("attn", "rel_pos_h"), f"{bk}.attn.rel_pos_h"),
      Rule(bp + ("attn", "rel_pos_w"), f"{bk}.attn.rel_pos_w"),
    ]
    rules += linear_rules(bp + ("attn", "qkv"), f"{bk}.attn.qkv", b["attn"]["qkv"])
    rules += linear_rules(bp + ("attn", "proj"), f"{bk}.attn.proj", b["attn"]["proj"])
    rules += norm_rules(bp + ("norm2",), f"{bk}.norm2")
    rules += linear_rules(bp + ("mlp", "lin1"), f"{bk}.mlp.lin1", b["mlp"]["lin1"])
    rules += linear_rules(bp + ("mlp", "lin2"), f"{bk}.mlp.lin2", b["mlp"]["lin2"])
  rules += _conv(path + ("neck_conv1",), f"{key}.neck.0", p["neck_conv1"])
  rules += norm_rules(path + ("neck_norm1",), f"{key}.neck.1")
  rules += _conv(path + ("neck_conv2",), f"{key}.neck.2", p["neck_conv2"])
  rules += norm_rules(path + ("neck_norm2",), f"{key}.neck.3")
  return rules


def _prompt_rules(p) -> list[Rule]:
  path, key = ("prompt_encoder",), "prompt_encoder"
  rules = [Rule(path + ("pe_gaussian",), f"{key}.pe_layer.positional_encoding_gaussian_matrix")]
  for i, name in enumerate(("neg_point", "pos_point", "box_corner_a", "box_corner_b")):
    rules.append(Rule(path + (name,), f"{key}.point_embeddings.{i}.weight"))
  rules.append(Rule(path + ("not_a_point",), f"{key}.not_a_point_embed.weight"))
  rules += _conv(path + ("mask_conv1",), f"{key}.mask_downscaling.0", p["mask_conv1"])
  rules += norm_rules(path + ("mask_norm1",), f"{key}.mask_downscaling.1")
  rules += _conv(path + ("mask_conv2",), f"{key}.mask_downscaling.3", p["mask_conv2"])
  rules += norm_rules(path + ("mask_norm2",), f"{key}.mask_downscaling.4")
  rules += _conv(path + ("mask_conv3",), f"{key}.mask_downscaling.6", p["mask_conv3"])
  rules.append(Rule(path + ("no_mask",), f"{key}.no_mask_embed.weight"))
  return rules


def _attention_rules(path, key, p) -> list[Rule]:
  rules = []
  for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
    rules += linear_rules(path + (name,), f"{key}.{name}", p[name])
  return rules


def _mlp_rules(path, key, p) -> list[Rule]:
  rules = []
  for j in sorted(p["layers"]):
    rules += linear_rules(path + ("layers", j), f"{key}.layers.{j}", p["layers"][j])
  return rules


def _decoder_rules(p) -> list[Rule]:
  path, key = ("mask_decoder",), "mask_decoder"
  tp, tk, t = path + ("transformer",), f"{key}.transformer", p["transformer"]
  rules = []
  for i in sorted(t["layers"]):
    lp, lk, layer = tp + ("layers", i), f"{tk}.layers.{i}", t["layers"][i]
    rules += _attention_rules(lp + ("self_attn",), f"{lk}.self_attn", layer["self_attn"])
    rules += norm_rules(lp + ("norm1",), f"{lk}.norm1")
    rules += _attention_rules(
      lp + ("cross_attn_token_to_image",),
      f"{lk}.cross_attn_token_to_image",
      layer["cross_attn_token_to_image"],
    )
    rules += norm_rules(lp + ("norm2",), f"{lk}.norm2")
    rules += linear_rules(lp + ("mlp", "lin1"), f"{lk}.mlp.lin1", layer["mlp"]["lin1"])
    rules += linear_rules(lp + ("mlp", "lin2"), f"{lk}.mlp.lin2", layer["mlp"]["lin2"])
    rules += norm_rules(lp + ("norm3",), f"{lk}.norm3")
    rules += norm_rules(lp + ("norm4",), f"{lk}.norm4")
    rules += _attention_rules(
      lp + ("cross_attn_image_to_token",),
      f"{lk}.cross_attn_image_to_token",
      layer["cross_attn_image_to_token"],
    )
  rules += _attention_rules(
    tp + ("final_attn_token_to_image",),
    f"{tk}.final_attn_token_to_image",
    t["final_attn_token_to_image"],
  )
  rules += norm_rules(tp + ("norm_final_attn",), f"{tk}.norm_final_attn")
  rules += [
    Rule(path + ("iou_token",), f"{key}.iou_token.weight"),
    Rule(path + ("mask_tokens",), f"{key}.mask_tokens.weight"),
  ]
  rules += _conv(
    path + ("upscale_conv1",), f"{key}.output_upscaling.0", p["upscale_conv1"], "conv_transpose"
  )
  rules += norm_rules(path + ("upscale_norm",), f"{key}.output_upscaling.1")
  rules += _conv(
    path + ("upscale_conv2",), f"{key}.output_upscaling.3", p["upscale_conv2"], "conv_transpose"
  )
  for i in sorted(p["output_hypernetworks_mlps"]):
    rules += _mlp_rules(
      path + ("output_hypernetworks_mlps", i),
      f"{key}.output_hypernetworks_mlps.{i}",
      p["output_hypernetworks_mlps"][i],
    )
  rules += _mlp_rules(
    path + ("iou_prediction_head",), f"{key}.iou_prediction_head", p["iou_prediction_head"]
  )
  return rules


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
def sam_shapes(params: Mapping) -> dict[str, tuple[int, ...]]:
  """{segment_anything key: shape} that `sam_to_torch` writes for these params."""
  return torch_shapes(params, sam_rules(params))


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
    *key_problems({k: v.shape for k, v in given.items()}, sam_shapes(template)),
  )
  flat = traverse_util.flatten_dict(template)
  extra = [p for p in flat if p in EXTRA_PATHS]
  if extra and is_abstract(template):
    raise ValueError(
      f"{['/'.join(p) for p in extra]} have no segment_anything key and keep "
      "the model's values: pass a concrete model, not an nnx.eval_shape one"
    )
  out = {p: np.asarray(flat[p]) for p in extra}
  for r in rules:
    out[r.path] = np.array(
      from_torch_layout(r.layout, given[r.key]), dtype=flat[r.path].dtype, order="C"
    )
  return traverse_util.unflatten_dict(out)


def config_from_state_dict(state_dict: Mapping[str, Any], **overrides) -> sam_lib.SamConfig:
  """The SamConfig a segment_anything state dict was saved from (width, depth, heads,
  global blocks, window, image size, decoder sizes are read off the shapes)."""
  shape = lambda k: tuple(np.shape(state_dict[k]))
  try:
    _, grid, _, width = shape("image_encoder.pos_embed")
    patch = shape("image_encoder.patch_embed.proj.weight")[-1]
    depth = 1 + max(
      int(k.split(".")[2]) for k in state_dict if k.startswith("image_encoder.blocks.")
    )
    head_dim = shape("image_encoder.blocks.0.attn.rel_pos_h")[1]
    sizes = [(shape(f"image_encoder.blocks.{i}.attn.rel_pos_h")[0] + 1) // 2 for i in range(depth)]
    dim = shape("mask_decoder.iou_token.weight")[1]
    layers = 1 + max(
      int(k.split(".")[3]) for k in state_dict if k.startswith("mask_decoder.transformer.layers.")
    )
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
      iou_head_depth=1
      + max(
        int(k.split(".")[3])
        for k in state_dict
        if k.startswith("mask_decoder.iou_prediction_head.layers.")
      ),
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
