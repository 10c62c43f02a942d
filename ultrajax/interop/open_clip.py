"""Teacher weights from PyTorch files: open_clip BiomedCLIP layout or a plain timm ViT.

  ours (Teacher pure dict)       open_clip (BiomedCLIP)              timm ViT
  trunk/<ViT path>               visual.trunk.<timm key>             <timm key>
  trunk/pos_embed [1, 1+N, D]    visual.trunk.pos_embed              pos_embed
  proj/kernel [D, E]             visual.head.proj.weight [E, D]      (none: no projection)
The trunk's key map is `timm_vit.vit_rules` plus the learned position table. A full open_clip
checkpoint also holds the text tower (`text.*`) and `logit_scale`; they are ignored, as is a
timm classifier `head.*`. The layout is told apart by the `visual.trunk.` prefix.
A position table for another grid is resampled as timm does (interop/posemb.py).
"""
from __future__ import annotations

import pathlib
from typing import Any, Mapping

from absl import logging
from flax import nnx

from ultrajax.interop import files, posemb as posemb_resample, timm_vit

OPEN_CLIP_PREFIX = "visual.trunk."
OPEN_CLIP_PROJ = "visual.head.proj.weight"
TIMM_PROBE = "blocks.0.attn.qkv.weight"
TIMM_HEAD_KEYS = ("head.weight", "head.bias")


def teacher_rules(params: Mapping, *, prefix: str, proj_key: str | None) -> list[timm_vit.Rule]:
  """Key map of a Teacher's pure dict; trunk keys get `prefix`, `proj` maps to `proj_key`."""
  trunk = params["trunk"]
  rules = [timm_vit.Rule(r.path, prefix + r.key, r.layout)
           for r in timm_vit.vit_rules(trunk, path=("trunk",))]
  rules.append(timm_vit.Rule(("trunk", "pos_embed"), prefix + "pos_embed"))
  if "proj" in params:
    if proj_key is None:
      raise ValueError("a timm ViT file has no projection; build the teacher with "
                       "embed_dim=0 (config.teacher.embed_dim=0)")
    rules += timm_vit.linear_rules(("proj",), proj_key.removesuffix(".weight"), params["proj"])
  timm_vit.check_rules_cover(params, rules)
  return rules


def file_layout(keys) -> str:
  """'open_clip' | 'timm' from a state dict's keys; anything else raises ValueError."""
  keys = list(keys)
  if any(k.startswith(OPEN_CLIP_PREFIX) for k in keys):
    return "open_clip"
  if TIMM_PROBE in keys:
    return "timm"
  raise ValueError(f"not an open_clip (BiomedCLIP) or timm ViT state dict: no "
                   f"{OPEN_CLIP_PREFIX}* keys and no {TIMM_PROBE!r}; its first keys are {keys[:8]}")


def teacher_from_state_dict(state_dict: Mapping[str, Any], model) -> dict:
  """State dict (open_clip or timm layout; torch tensors or numpy) -> pure dict of `model`'s
  parameters (numpy float32). model: a `teacher.Teacher`, real or from nnx.eval_shape.

  Missing or unexpected keys and shape mismatches raise ValueError naming every key with
  both shapes (e.g. a ViT-B file for a ViT-S teacher).
  """
  layout = file_layout(state_dict)
  template = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if layout == "open_clip":
    prefix, proj_key = OPEN_CLIP_PREFIX, OPEN_CLIP_PROJ
    ignored = [k for k in state_dict if not (k.startswith(OPEN_CLIP_PREFIX) or k == proj_key)]
    if proj_key in state_dict and "proj" not in template:
      ignored.append(proj_key)  # a teacher without projection uses trunk tokens only
  else:
    prefix, proj_key = "", None
    ignored = [k for k in TIMM_HEAD_KEYS if k in state_dict]
  if ignored:
    logging.info("Teacher import (%s layout) ignores %d keys, e.g. %s.", layout, len(ignored),
                 ignored[:4])
  given = {k: timm_vit.as_numpy(v) for k, v in state_dict.items() if k not in ignored}
  rules = teacher_rules(template, prefix=prefix, proj_key=proj_key)
  expected = timm_vit.torch_shapes(template, rules)
  pos_key = prefix + "pos_embed"
  shapes = {k: v.shape for k, v in given.items()}
  width = expected[pos_key][2]
  if pos_key in shapes and shapes[pos_key] != expected[pos_key] and (
      timm_vit.pos_embed_shape_ok(shapes[pos_key], width)):
    grid = model.grid
    logging.info("%s: resampling a %s table to the teacher's %dx%d grid.", pos_key,
                 shapes[pos_key], grid, grid)
    given[pos_key] = posemb_resample.resample_abs_pos_embed(given[pos_key], (grid, grid))
    shapes[pos_key] = given[pos_key].shape
  timm_vit.raise_key_problems(f"{layout} state dict does not fit the teacher",
                              *timm_vit.key_problems(shapes, expected))
  return timm_vit.import_tensors(given, template, rules)


def teacher_to_state_dict(params: Mapping, *, layout: str = "open_clip") -> dict:
  """Pure dict of a Teacher -> {key: numpy} in open_clip (visual.*) or timm layout."""
  if layout not in ("open_clip", "timm"):
    raise ValueError(f"layout={layout!r} is not 'open_clip' or 'timm'")
  prefix, proj_key = (OPEN_CLIP_PREFIX, OPEN_CLIP_PROJ) if layout == "open_clip" else ("", None)
  return timm_vit.export_tensors(params, teacher_rules(params, prefix=prefix, proj_key=proj_key))


def load_teacher(path, model) -> dict:
  """Pure dict of teacher parameters from a .safetensors/.pth/.pt/.bin file; errors name it."""
  path = pathlib.Path(path)
  state_dict = files.load_state_dict(path)
  try:
    params = teacher_from_state_dict(state_dict, model)
  except ValueError as e:
    raise ValueError(f"teacher file {path} ({len(state_dict)} keys): {e}") from None
  logging.info("Loaded teacher %s (%s layout, %d keys).", path, file_layout(state_dict),
               len(state_dict))
  return params
