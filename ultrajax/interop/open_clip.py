"""Teacher weights from PyTorch files: open_clip (BiomedCLIP's timm trunk, or open_clip's own
VisionTransformer) or a plain timm ViT.

  ours (Teacher pure dict)       open_clip (BiomedCLIP)           timm ViT
  trunk/<ViT path>               visual.trunk.<timm key>          <timm key>
  trunk/pos_embed [1, 1+N, D]    visual.trunk.pos_embed           pos_embed
  proj/kernel [D, E]             visual.head.proj.weight [E, D]   (none: no projection)
The trunk's key map is `timm_vit.vit_rules` plus the learned position table (tower 'timm').

open_clip's VisionTransformer (CLIP ViT-B/16 etc.; a Teacher with tower='open_clip'):
  trunk/patch_embed/kernel       visual.conv1.weight (no bias)
  trunk/cls_token [1, 1, D]      visual.class_embedding [D]
  trunk/pos_embed [1, 1+N, D]    visual.positional_embedding [1+N, D]
  ln_pre                         visual.ln_pre
  trunk/blocks/i/norm1, norm2    visual.transformer.resblocks.i.ln_1, ln_2
  trunk/blocks/i/attn/qkv        visual.transformer.resblocks.i.attn.in_proj_{weight,bias}
  trunk/blocks/i/attn/proj       visual.transformer.resblocks.i.attn.out_proj
  trunk/blocks/i/mlp/fc1, fc2    visual.transformer.resblocks.i.mlp.c_fc, c_proj
  trunk/norm                     visual.ln_post
  proj/kernel [D, E]             visual.proj [D, E] (a matrix applied as x @ proj)
(class_embedding and positional_embedding are reshaped to and from our [1, ...] tables, so
error messages show them with a leading 1.)

A full open_clip checkpoint also holds the text tower (`text.*`, or `transformer.*`,
`token_embedding`, ... for CLIP models) and `logit_scale`; they are ignored, as is a timm
classifier `head.*`. The layouts are told apart by `visual.trunk.*` and `visual.conv1.weight`.
A position table for another grid is resampled as timm does (interop/posemb.py).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

from absl import logging
from flax import nnx

from ultrajax.interop import files, posemb as posemb_resample, timm_vit

OPEN_CLIP_PREFIX = "visual.trunk."
OPEN_CLIP_PROJ = "visual.head.proj.weight"
VIT_PREFIX = "visual."  # open_clip's own VisionTransformer
VIT_PROBE = "visual.conv1.weight"
VIT_PROJ = "visual.proj"
# Our [1, 1, D] / [1, 1 + N, D] tables <-> open_clip's [D] / [1 + N, D].
VIT_TABLES = ("visual.class_embedding", "visual.positional_embedding")
TIMM_PROBE = "blocks.0.attn.qkv.weight"
LAYOUT_TOWERS = {"open_clip": "timm", "timm": "timm", "open_clip_vit": "open_clip"}


def vit_tower_rules(params: Mapping) -> list[timm_vit.Rule]:
  """Key map of a tower='open_clip' Teacher <-> open_clip VisionTransformer (`visual.*`)."""
  rule, trunk, p = timm_vit.Rule, params["trunk"], VIT_PREFIX
  linear, norm = timm_vit.linear_rules, timm_vit.norm_rules
  rules = [
    rule(("trunk", "patch_embed", "kernel"), p + "conv1.weight", "conv"),
    rule(("trunk", "cls_token"), p + "class_embedding"),
    rule(("trunk", "pos_embed"), p + "positional_embedding"),
    *norm(("ln_pre",), p + "ln_pre"),
  ]
  for i in sorted(trunk["blocks"]):
    path, key, block = ("trunk", "blocks", i), f"{p}transformer.resblocks.{i}", trunk["blocks"][i]
    rules += [
      *norm(path + ("norm1",), f"{key}.ln_1"),
      rule(path + ("attn", "qkv", "kernel"), f"{key}.attn.in_proj_weight", "linear"),
      rule(path + ("attn", "qkv", "bias"), f"{key}.attn.in_proj_bias"),
      *linear(path + ("attn", "proj"), f"{key}.attn.out_proj", block["attn"]["proj"]),
      *norm(path + ("norm2",), f"{key}.ln_2"),
      *linear(path + ("mlp", "fc1"), f"{key}.mlp.c_fc", block["mlp"]["fc1"]),
      *linear(path + ("mlp", "fc2"), f"{key}.mlp.c_proj", block["mlp"]["fc2"]),
    ]
  rules += norm(("trunk", "norm"), p + "ln_post")
  if "proj" in params:
    rules.append(rule(("proj", "kernel"), VIT_PROJ))
  timm_vit.check_rules_cover(params, rules)
  return rules


def teacher_rules(params: Mapping, *, prefix: str, proj_key: str | None) -> list[timm_vit.Rule]:
  """Key map of a tower='timm' Teacher's pure dict; trunk keys get `prefix`, `proj` maps to
  `proj_key`."""
  trunk = params["trunk"]
  rules = [
    timm_vit.Rule(r.path, prefix + r.key, r.layout)
    for r in timm_vit.vit_rules(trunk, path=("trunk",))
  ]
  rules.append(timm_vit.Rule(("trunk", "pos_embed"), prefix + "pos_embed"))
  if "proj" in params:
    if proj_key is None:
      raise ValueError(
        "a timm ViT file has no projection; build the teacher with "
        "embed_dim=0 (config.teacher.embed_dim=0)"
      )
    rules += timm_vit.linear_rules(("proj",), proj_key.removesuffix(".weight"), params["proj"])
  timm_vit.check_rules_cover(params, rules)
  return rules


def file_layout(keys) -> str:
  """'open_clip' (BiomedCLIP's timm trunk) | 'open_clip_vit' (open_clip's VisionTransformer) |
  'timm' from a state dict's keys; anything else raises ValueError."""
  keys = list(keys)
  if any(k.startswith(OPEN_CLIP_PREFIX) for k in keys):
    return "open_clip"
  if VIT_PROBE in keys:
    return "open_clip_vit"
  if TIMM_PROBE in keys:
    return "timm"
  raise ValueError(
    f"not an open_clip (BiomedCLIP or CLIP ViT) or timm ViT state dict: no "
    f"{OPEN_CLIP_PREFIX}* keys, no "
    f"{VIT_PROBE!r} and no {TIMM_PROBE!r}; its first keys are {keys[:8]}"
  )


def _rules_of(layout: str, template: Mapping) -> tuple[list[timm_vit.Rule], str]:
  """(key map, position-table key) of a Teacher pure dict for a file layout."""
  if layout == "open_clip_vit":
    return vit_tower_rules(template), "visual.positional_embedding"
  prefix, proj_key = (OPEN_CLIP_PREFIX, OPEN_CLIP_PROJ) if layout == "open_clip" else ("", None)
  return teacher_rules(template, prefix=prefix, proj_key=proj_key), prefix + "pos_embed"


def teacher_from_state_dict(state_dict: Mapping[str, Any], model) -> dict:
  """State dict (open_clip or timm layout; torch tensors or numpy) -> pure dict of `model`'s
  parameters (numpy float32). model: a `teacher.Teacher`, real or from nnx.eval_shape.

  Missing or unexpected keys and shape mismatches raise ValueError naming every key with
  both shapes (e.g. a ViT-B file for a ViT-S teacher).
  """
  layout = file_layout(state_dict)
  if LAYOUT_TOWERS[layout] != model.tower:
    raise ValueError(
      f"the file is in {layout} layout, which needs a teacher with tower="
      f"{LAYOUT_TOWERS[layout]!r} (config.teacher.tower), not {model.tower!r}"
    )
  template = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if layout == "open_clip":
    proj_key = OPEN_CLIP_PROJ
    ignored = [k for k in state_dict if not (k.startswith(OPEN_CLIP_PREFIX) or k == proj_key)]
  elif layout == "open_clip_vit":
    proj_key = VIT_PROJ
    ignored = [k for k in state_dict if not k.startswith(VIT_PREFIX)]
  else:
    proj_key = None
    ignored = [k for k in timm_vit.TIMM_HEAD_KEYS if k in state_dict]
  if proj_key in state_dict and "proj" not in template:
    ignored.append(proj_key)  # a teacher without projection uses trunk tokens only
  if ignored:
    logging.info(
      "Teacher import (%s layout) ignores %d keys, e.g. %s.", layout, len(ignored), ignored[:4]
    )
  given = {k: timm_vit.as_numpy(v) for k, v in state_dict.items() if k not in ignored}
  if layout == "open_clip_vit":  # open_clip's [D] / [1 + N, D] tables -> our [1, ...] ones
    for k in VIT_TABLES:
      if k in given and given[k].ndim < 3:
        given[k] = given[k].reshape((1,) * (3 - given[k].ndim) + given[k].shape)
  rules, pos_key = _rules_of(layout, template)
  expected = timm_vit.torch_shapes(template, rules)
  shapes = {k: v.shape for k, v in given.items()}
  width = expected[pos_key][2]
  if (
    pos_key in shapes
    and shapes[pos_key] != expected[pos_key]
    and (timm_vit.pos_embed_shape_ok(shapes[pos_key], width))
  ):
    grid = model.grid
    logging.info(
      "%s: resampling a %s table to the teacher's %dx%d grid.", pos_key, shapes[pos_key], grid, grid
    )
    given[pos_key] = posemb_resample.resample_abs_pos_embed(given[pos_key], (grid, grid))
    shapes[pos_key] = given[pos_key].shape
  timm_vit.raise_key_problems(
    f"{layout} state dict does not fit the teacher", *timm_vit.key_problems(shapes, expected)
  )
  return timm_vit.import_tensors(given, template, rules)


def teacher_to_state_dict(params: Mapping, *, layout: str = "open_clip") -> dict:
  """Pure dict of a Teacher -> {key: numpy} in open_clip (visual.trunk.*, tower 'timm'),
  timm, or open_clip_vit (visual.*, tower 'open_clip') layout."""
  if layout not in LAYOUT_TOWERS:
    raise ValueError(f"layout={layout!r} is not one of {tuple(LAYOUT_TOWERS)}")
  if (layout == "open_clip_vit") != ("ln_pre" in params):
    raise ValueError(f"layout={layout!r} needs a teacher with tower={LAYOUT_TOWERS[layout]!r}")
  out = timm_vit.export_tensors(params, _rules_of(layout, params)[0])
  if layout == "open_clip_vit":
    out["visual.class_embedding"] = out["visual.class_embedding"].reshape(-1)
    out["visual.positional_embedding"] = out["visual.positional_embedding"][0]
  return out


def load_teacher(path, model) -> dict:
  """Pure dict of teacher parameters from a .safetensors/.pth/.pt/.bin file; errors name it."""
  path = pathlib.Path(path)
  state_dict = files.load_state_dict(path)
  try:
    params = teacher_from_state_dict(state_dict, model)
  except ValueError as e:
    raise ValueError(f"teacher file {path} ({len(state_dict)} keys): {e}") from None
  logging.info(
    "Loaded teacher %s (%s layout, %d keys).", path, file_layout(state_dict), len(state_dict)
  )
  return params
