r"""Exports an ultrajax pretraining checkpoint as a PyTorch state dict.

  python -m ultrajax.export --workdir=DIR --format=timm|mae|sam --out=FILE [--round=N]
      [--config=configs/pretrain_fed.py:preset]

timm: the encoder as a timm `VisionTransformer` (cls-token pooling, no head), so
  `timm.create_model('vit_base_patch16_224', num_classes=0)` loads it with strict=True.
mae:  the whole MAE as facebookresearch/mae's `MaskedAutoencoderViT` (wrapped in 'model' in
  .pth files, as the released checkpoints).
sam:  a SAM training run (configs/sam_ultrasound.py) as segment_anything's `Sam` state dict,
  which `sam_model_registry[...]()` loads with strict=True (same keys as sam_vit_b_01ec64.pth).
FILE ends in .safetensors (no torch needed) or .pth/.pt/.bin; for timm, a FILE without a suffix
is a folder in timm's Hub layout (config.json + model.safetensors, `timm.create_model(
'local-dir:FILE', pretrained=True)`). Every export carries the input preprocessing (timm's
pretrained_cfg with ImageNet mean/std; SAM's pixel mean/std): in the .safetensors header, or
in FILE's stem + .json next to a PyTorch file. The checkpoint is the latest
one (or round N); the model's shape comes from the config saved with it, or from --config
for checkpoints without one. docs/formats.md lists the keys and how to load the files.
A checkpoint holding NaN or infinite weights (a diverged run) is refused, naming the tensors.
"""

from __future__ import annotations

import json
import pathlib

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from ultrajax import configlib
from ultrajax.interop import files, mae_official, timm_vit
from ultrajax.models import mae
from ultrajax.train import checkpoint, writers

FORMATS = ("timm", "mae", "sam")

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (or its checkpoint folder).")
_FORMAT = flags.DEFINE_enum(
  "format",
  None,
  list(FORMATS),
  "timm: encoder as a timm ViT; mae: official MAE with decoder; "
  "sam: a SAM run as segment_anything's Sam.",
)
_OUT = flags.DEFINE_string(
  "out",
  None,
  "Output file: .safetensors or .pth/.pt/.bin; for "
  "timm also a folder (timm's Hub layout: config.json + "
  "model.safetensors).",
)
_ROUND = flags.DEFINE_integer("round", None, "Checkpoint round to export (default: latest).")
_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config of the run, for checkpoints that have none saved."
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of user errors too.")


def saved_config(directory: pathlib.Path) -> ml_collections.ConfigDict:
  """The run's config from the checkpoint's `meta` item (JSON written by the training job)."""
  meta_dir = directory / "meta"
  if not meta_dir.is_dir():
    raise FileNotFoundError(f"{meta_dir} is missing: pass the run's --config")
  try:
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
      meta = ckptr.restore(meta_dir)
    if "config" not in meta:
      raise configlib.DataError(
        f"{meta_dir} holds no 'config' (keys {sorted(meta)}): pass the run's --config"
      )
    return ml_collections.ConfigDict(json.loads(meta["config"]))
  except json.JSONDecodeError as e:
    raise configlib.DataError(f"{meta_dir}: damaged JSON ({e}); pass the run's --config") from None


def check_finite(tensors: dict, directory) -> None:
  """Refuses weights with NaN or infinities (a diverged run), naming the first tensors."""
  bad = files.nonfinite_keys(tensors)
  if bad:
    raise configlib.DataError(
      f"{directory} holds non-finite weights (NaN or inf) in {len(bad)} of {len(tensors)} "
      f"tensors, e.g. {bad[:3]}: the run diverged? export an earlier --round"
    )


def load_mae_params(directory: pathlib.Path, model_config) -> tuple[dict, object]:
  """(numpy pure dict of the checkpoint's MAE params, abstract MAE) for this model config."""
  model = nnx.eval_shape(lambda: mae.mae_from_config(model_config, nnx.Rngs(0)))
  target = checkpoint.on_one_device(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return jax.device_get(checkpoint.load_params(directory, target)), model


def save_with_preprocessing(out, tensors, preprocessing: dict, *, wrap_key=None) -> pathlib.Path:
  """Writes the state dict and what its model expects of an input ({name: JSON-able}): in a
  .safetensors header as JSON strings, next to a PyTorch file as `<out stem>.json`."""
  path = files.save_state_dict(
    out, tensors, wrap_key=wrap_key, metadata={k: json.dumps(v) for k, v in preprocessing.items()}
  )
  if files.file_kind(path) == "torch":
    path.with_suffix(".json").write_text(json.dumps(preprocessing, indent=1) + "\n")
  return path


def export(workdir, fmt: str, out, *, round_index: int | None = None, config=None) -> dict:
  """Writes the checkpoint's weights in format `fmt` to `out`; returns what was written:
  dict(path, format, checkpoint folder, keys, params, bytes). The preprocessing metadata
  (`save_with_preprocessing`): timm's Hub config ('timm_config': architecture, model_args,
  pretrained_cfg) for timm, that pretrained_cfg for mae, SAM's pixel mean/std for sam.
  """
  if fmt not in FORMATS:
    raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
  folder = pathlib.Path(out).suffix == ""
  if folder and fmt != "timm":
    raise configlib.DataError(
      f"--out={out}: a folder (no file suffix) is timm's Hub layout, for "
      "--format=timm; give a .safetensors or .pth file"
    )
  if not folder:
    files.file_kind(out)  # an unusable file name fails before the checkpoint is read
  directory = checkpoint.find_checkpoint_dir(workdir, round_index)
  if fmt == "sam":  # the architecture is read off the parameter shapes
    from ultrajax.eval import sam_predictor
    from ultrajax.interop import sam as sam_interop

    model, sam_config = sam_predictor.load_model(directory)
    tensors = sam_interop.sam_to_torch(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    preprocessing = {"preprocessing": sam_interop.preprocessing(sam_config.image_size)}
  else:
    config = saved_config(directory) if config is None else config
    params, model = load_mae_params(directory, config.model)
    image_size = model.encoder.image_size
    if fmt == "timm":
      tensors = timm_vit.vit_to_timm(params["encoder"], image_size=image_size)
      # architecture + model_args + pretrained_cfg, as timm's Hub config.json
      hub = timm_vit.timm_hub_config(
        params["encoder"], image_size=image_size, num_heads=model.encoder.blocks[0].attn.num_heads
      )
      preprocessing = {"timm_config": hub}
    else:
      tensors = mae_official.mae_to_official(
        params, image_size=image_size, patch_size=model.encoder.patch_size
      )
      preprocessing = {"pretrained_cfg": timm_vit.timm_pretrained_cfg(image_size)}
  check_finite(tensors, directory)
  if folder:
    pathlib.Path(out).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(out) / "config.json").write_text(json.dumps(hub, indent=1) + "\n")
    out = pathlib.Path(out) / "model.safetensors"
  wrap = "model" if fmt == "mae" and files.file_kind(out) == "torch" else None
  path = save_with_preprocessing(out, tensors, preprocessing, wrap_key=wrap)
  return dict(
    path=str(path),
    format=fmt,
    checkpoint=str(directory),
    keys=len(tensors),
    params=int(sum(np.size(v) for v in tensors.values())),
    bytes=path.stat().st_size,
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  writers.quiet_orbax(not _VERBOSE.value)  # Orbax's INFO lines were 32 of the 33 printed
  for name, flag in (("workdir", _WORKDIR), ("format", _FORMAT), ("out", _OUT)):
    if not flag.value:  # --format's value is checked by DEFINE_enum
      raise app.UsageError(f"--{name} is required")
  try:
    done = export(
      _WORKDIR.value, _FORMAT.value, _OUT.value, round_index=_ROUND.value, config=_CONFIG.value
    )
  except configlib.DataError as e:
    if str(e).startswith("cannot write"):
      raise configlib.DataError(f"--out: {e}") from e
    raise
  print(
    f"wrote {done['path']}: {done['format']} state dict, {done['keys']} keys, "
    f"{done['params']:,} values (fixed position tables included), "
    f"{done['bytes'] / 2**20:.1f} MiB, from {done['checkpoint']}"
  )


if __name__ == "__main__":
  app.run(configlib.report_user_errors(main, lambda: _VERBOSE.value))
