"""Starting parameters for training from whatever `config.init_from` names.

`load_init_params` fills a whole MAE (pretraining); `load_encoder` fills only the ViT encoder of
a fine-tuning model (classifier or segmenter), whose heads start fresh.

Accepted: an ultrajax workdir or checkpoint folder, or a state-dict file (.safetensors,
.pth/.pt/.bin) in one of the layouts below, told apart by key names:
  official MAE, full          decoder_* / mask_token keys      everything loaded
  official MAE encoder-only   blocks.0.attn.qkv.weight, no     encoder loaded, decoder kept
    or timm ViT               decoder key                      (a timm classifier head is
                                                               dropped)
Loaded weights must be finite: a NaN or infinity (e.g. from a diverged run) is refused, naming
the first such tensor. Unreadable files and architectures that do not fit raise DataError.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging
from flax import nnx, traverse_util

from ultrajax import configlib
from ultrajax.interop import files, mae_official, timm_vit
from ultrajax.train import checkpoint, loop, tree

KINDS = ("mae",)
ENCODER_PROBE_KEY = "blocks.0.attn.qkv.weight"


def file_layout(keys) -> str:
  """'mae_full' | 'encoder' from a state dict's keys; anything else raises ValueError."""
  keys = list(keys)
  if any(mae_official.is_decoder_key(k) for k in keys):
    return "mae_full"
  if ENCODER_PROBE_KEY in keys:
    return "encoder"
  raise configlib.DataError(
    f"not an official MAE or timm ViT state dict: no decoder_* / "
    f"mask_token keys and no {ENCODER_PROBE_KEY!r}; its first keys are "
    f"{keys[:8]}"
  )


def check_finite(params, source) -> None:
  """Raises DataError naming `source` and the first tensor of `params` (a pytree of numpy or
  jax arrays) that holds a NaN or an infinity."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  bad = []
  for key_path, x in flat:
    if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact) and not bool(jax.numpy.isfinite(x).all()):
      bad.append(tree.path_str(key_path))
  if bad:
    raise configlib.DataError(
      f"{source}: tensor {bad[0]} holds NaN or infinite values ({len(bad)} of {len(flat)} "
      "tensors do): the run it comes from diverged? start from an earlier checkpoint"
    )


def _existing(path) -> pathlib.Path:
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(
      f"nothing at {path}: expected an ultrajax workdir or checkpoint "
      "folder, or a .safetensors/.pth/.pt/.bin file"
    )
  return path


def _checkpoint_params(path, target=None):
  """checkpoint.load_params, its ValueErrors (another architecture, a damaged file) as
  DataError naming `path`."""
  try:
    return checkpoint.load_params(path, target)
  except configlib.DataError:
    raise
  except ValueError as e:
    raise configlib.DataError(f"{path}: {e}") from None


def _place(params, target):
  """numpy leaves -> global arrays with the target's shardings (`loop.put_global`: the same
  host value on every process, as the file is read by each); jax Arrays stay put."""

  def put(x, t):
    return x if isinstance(x, jax.Array) else loop.put_global(x, t.sharding)

  return jax.tree.map(put, params, target)


def load_init_params(
  path, model, *, kind: str = "mae", base_params: Mapping | None = None, target=None
) -> dict:
  """Pure dict of `model`'s parameters loaded from `path` (see the module docstring).

  model: the `MAE` to initialise, real or from `nnx.eval_shape` (structure and image size).
  base_params: pure dict of values for what a file lacks (the decoder of an encoder-only file);
    default the model's own parameters, which an abstract model does not have.
  target: optional abstract tree (ShapeDtypeStructs with shardings, e.g.
    `checkpoint.abstract_like(abstract_params, shardings)`); the result is placed accordingly.
    Without it an ultrajax checkpoint is restored onto the default device and a file's
    values come back as numpy arrays.
  A file whose architecture does not fit raises ValueError naming the keys and both shapes.
  """
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r} is not one of {KINDS}")
  path = _existing(path)
  if path.is_dir():
    if target is None:
      target = checkpoint.on_one_device(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    params = _checkpoint_params(path, target)
    check_finite(params, path)
    return params
  state_dict = files.load_state_dict(path)
  try:
    layout = file_layout(state_dict)
  except configlib.DataError as e:
    raise configlib.DataError(f"{path}: {e}") from None
  if layout == "encoder":
    head = [k for k in timm_vit.TIMM_HEAD_KEYS if k in state_dict]
    if head:
      logging.info("%s: dropped the classifier head %s (an MAE has none).", path, head)
      state_dict = {k: v for k, v in state_dict.items() if k not in head}
  check_finite(state_dict, path)
  try:
    params = mae_official.mae_from_official(state_dict, model, base_params=base_params)
  except ValueError as e:
    raise configlib.DataError(f"{path} ({layout} layout, {len(state_dict)} keys): {e}") from None
  logging.info("Loaded %s (%s layout, %d keys).", path, layout, len(state_dict))
  return params if target is None else _place(params, target)


def _raise_key_problems(what: str, problems) -> None:
  """timm_vit.raise_key_problems as a DataError (a user error: the file does not fit)."""
  try:
    timm_vit.raise_key_problems(what, *problems)
  except ValueError as e:
    raise configlib.DataError(str(e)) from None


ENCODER_PARTS = ("patch_embed", "cls_token", "blocks", "norm")
DROPPED_PREFIXES = ("head.", "fc_norm.", "pos_embed")


def _encoder_from_file(path: pathlib.Path, template: Mapping) -> dict:
  """A timm ViT / official MAE state dict -> our encoder's pure dict (numpy), shaped like
  `template` (the parts of ENCODER_PARTS the target has, plus a final norm when the file has one)."""
  state_dict = files.load_state_dict(path)
  given = {
    k: timm_vit.as_numpy(v)
    for k, v in state_dict.items()
    if not mae_official.is_decoder_key(k) and not k.startswith(DROPPED_PREFIXES)
  }
  if ENCODER_PROBE_KEY not in given:
    raise configlib.DataError(
      f"{path}: not a timm ViT or official MAE state dict (no "
      f"{ENCODER_PROBE_KEY!r}); its first keys are {list(state_dict)[:8]}"
    )
  template = dict(template)
  width = template["cls_token"].shape[-1]
  if "norm.weight" in given and "norm" not in template:
    template["norm"] = {"scale": np.zeros(width, np.float32), "bias": np.zeros(width, np.float32)}
  elif "norm.weight" not in given:
    template.pop("norm", None)
  rules = timm_vit.vit_rules(template)
  expected = timm_vit.torch_shapes(template, rules)
  _raise_key_problems(
    f"{path} does not fit the fine-tuning encoder",
    timm_vit.key_problems({k: v.shape for k, v in given.items()}, expected),
  )
  return timm_vit.import_tensors(given, template, rules)


def load_encoder(path, params: Mapping, *, prefix: tuple[str, ...] = ()) -> dict:
  """`params` (a fine-tuning model's pure dict) with its ViT encoder loaded from `path`.

  path: an ultrajax workdir or checkpoint (an MAE's `encoder`, or another fine-tuned model's
    encoder), or a timm ViT / official MAE file. Decoders, heads, fc_norm and learned position
    tables in the source are ignored; heads and fc_norm of the target keep their fresh values.
  prefix: where the encoder sits in `params` (('encoder',) for a Segmenter, () for a ViT).
  A source whose architecture differs raises ValueError naming each key and both shapes.
  """
  path = _existing(path)
  target = params
  for p in prefix:
    target = target[p]
  template = {k: target[k] for k in ENCODER_PARTS if k in target}
  if path.is_dir():
    source = _checkpoint_params(path)
    source = source.get("encoder", source)
  else:
    source = _encoder_from_file(path, template)
  # A final norm the target lacks (pool='gap' has fc_norm instead) is not used.
  source = {k: source[k] for k in ENCODER_PARTS if k in source and k in template}
  check_finite(source, path)

  def by_path(tree):
    return {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(tree).items()}

  src, tpl = by_path(source), by_path(template)
  problems = timm_vit.key_problems(
    {k: v.shape for k, v in src.items()},
    {k: v.shape for k, v in tpl.items() if not k.startswith("norm/") or k in src},
  )
  _raise_key_problems(
    f"{path}: its encoder does not match the fine-tuning model (keys as parameter paths)", problems
  )
  merged = traverse_util.flatten_dict(params)
  loaded = set()
  for key in merged:
    name = "/".join(map(str, key[len(prefix) :]))
    if key[: len(prefix)] == prefix and name in src:
      merged[key] = np.asarray(src[name], np.float32)
      loaded.add(key)
  fresh = sorted({"/".join(map(str, k[: len(prefix) + 1])) for k in merged if k not in loaded})
  logging.info(
    "Loaded the encoder from %s (%d tensors); fresh: %s",
    path,
    len(loaded),
    ", ".join(fresh) or "nothing",
  )
  return traverse_util.unflatten_dict(merged)
