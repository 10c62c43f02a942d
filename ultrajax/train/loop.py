"""The four small pieces every job loop needs, once each (docs/design: a job is a loop).

  itstime(step, every, last)      log / save / evaluate after every `every` steps and at the last
  put_global(x, sharding)         host values -> global jax.Arrays (multi-host safe)
  atomic_write(path, obj)         a file is either the old one or the complete new one
  resume_or_init(ckpt, ..., init) the newest checkpoint, or a fresh start; the process count,
                                  config and shapes are always checked (train/resume.py)

"Step" is whatever the loop counts: rounds (pretraining), epochs (fine-tuning), steps (SAM).
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import tempfile

import jax
import numpy as np
from absl import logging

from ultrajax.train import checkpoint, resume


def itstime(step: int, every: int | None, last: int | None = None) -> bool:
  """True after `step` steps done (1-based) when `every` divides it, or when it is `last`.

  every 0 or None: never (the action is switched off, even at the last step)."""
  if not every:
    return False
  return step % every == 0 or (last is not None and step == last)


def put_global(x, sharding):
  """Host values (an array, a scalar, or a pytree of them) -> global jax.Arrays laid out by
  `sharding` (one Sharding for every leaf, or a matching tree of them).

  Every process must pass the same value: each one fills only its own devices' shards from it,
  so no host-to-host transfer happens (jax.device_put cannot place onto other hosts' devices).
  """

  def one(value, s):
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, s, lambda index: value[index])

  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda v: one(v, sharding), x)
  return jax.tree.map(one, x, sharding)


def _encode(path: pathlib.Path, obj) -> bytes:
  if isinstance(obj, (bytes, bytearray, memoryview)):
    return bytes(obj)
  if isinstance(obj, str):
    return obj.encode("utf-8")
  if path.suffix == ".npz":
    buffer = io.BytesIO()
    np.savez(buffer, **obj)
    return buffer.getvalue()
  return (json.dumps(obj, indent=1) + "\n").encode("utf-8")


def atomic_write(path, obj) -> pathlib.Path:
  """Writes `obj` to `path` so that a reader (or a run killed mid-write) sees either the previous
  file or the complete new one, never a torn one. Returns the path.

  obj: bytes (as is), str (UTF-8 text), a dict of arrays for a `.npz` path (np.savez), or else
  anything JSON can encode (indent 1). A uniquely named temporary file in the same folder is
  written, fsynced and os.replace'd over `path` (atomic on POSIX within one file system), then
  the folder is fsynced so the rename itself survives a power cut. Parent folders are created.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  data = _encode(path, obj)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  folder = os.open(path.parent, os.O_RDONLY)
  try:
    os.fsync(folder)
  finally:
    os.close(folder)
  return path


def _abstract(tree):
  """ShapeDtypeStructs (with shardings) of arrays or of ShapeDtypeStructs: a restore target."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
  )


def resume_or_init(
  ckpt: checkpoint.Checkpointer,
  like_params,
  like_train,
  init_fn,
  *,
  config,
  data_iterator=None,
  snapshot: dict | None = None,
):
  """(step, params, train) from the newest restorable checkpoint in `ckpt`, else (0, *init_fn()).

  like_params, like_train: the restore targets, arrays or ShapeDtypeStructs carrying their
  shardings (checkpoint.abstract_like). init_fn() -> (params, train) runs only when there is no
  checkpoint (so an expensive init, e.g. loading `init_from`, is skipped on resume); checks and
  fallback past damaged checkpoints as resume.restore_latest. config: the run's ConfigDict
  (`allow_config_change` is read from it); snapshot: the config dict compared with the saved one
  (default resume.snapshot(config)). data_iterator: a Grain iterator restored in place, or None.
  """
  restored = resume.restore_latest(
    ckpt,
    _abstract(like_params),
    _abstract(like_train),
    data_iterator,
    config=resume.snapshot(config) if snapshot is None else snapshot,
    allow=resume.allowed_changes(config),
  )
  if restored is None:
    params, train = init_fn()
    return 0, params, train
  step, params, train, _ = restored
  logging.info("Resumed from %s/%d.", ckpt.directory, step)
  return step, params, train
