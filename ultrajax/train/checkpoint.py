"""Orbax checkpoints of a training run: params, training state, data iterators, metadata.

Items of one checkpoint (a directory `workdir/checkpoints/<step>`, committed atomically; the
step is whatever the job counts: rounds, epochs or steps):
  params  the server (global) parameters: what fine-tuning, export and `init_from` read;
  train   everything else for a bitwise-identical continuation (client optimizer states,
          RNG key, round);
  data    the Grain iterator states, one JSON file per process;
  meta    JSON: the job's fields (step, config) and the process count (added by `save`), so a
          mismatched resume fails loudly.
Saves are asynchronous; `wait()` (called by `close()`) makes sure the last one finished.

Safety (docs/reliability.md): a state holding NaN or inf is never saved, so `keep_checkpoints`
rotation cannot replace good checkpoints with diverged ones; shapes are checked before anything
is restored (`check_shapes`); a damaged checkpoint can be set aside (`set_aside`).
"""

from __future__ import annotations

import functools
import pathlib

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ultrajax import configlib
from ultrajax.train import tree as tree_lib

MAX_LISTED = 8  # mismatches or non-finite leaves named in one message


class ShapeMismatchError(configlib.DataError):
  """A checkpoint's arrays do not fit the model the config builds; names paths and shapes."""


class NonFiniteStateError(FloatingPointError):
  """The state to save holds NaN or inf; names the leaves."""


@functools.cache
def _whole_replicas_in_one_process() -> None:
  """Orbax's replica-parallel saving (its default off GPU) has each replica of a replicated
  array write one slice, so that processes share the writing. A single process writes every
  replica anyway, and the slicing cost one compiled slice per array shape and device: on 8
  CPU devices, 19 of a smoke pretraining run's 44 CPU s (measured 2026-12-01). There, one
  replica writes each array whole; the files read back the same."""
  if jax.process_count() > 1:
    return
  default = ocp.type_handlers.get_type_handler(jax.Array)
  ocp.type_handlers.register_type_handler(
    jax.Array,
    ocp.type_handlers.ArrayHandler(
      use_replica_parallel=False,
      # The default handler's metadata store (Orbax reads it from this private field too).
      array_metadata_store=getattr(default, "_array_metadata_store", None),
    ),
    override=True,
  )


def _manager(directory: pathlib.Path, keep: int | None, read_only: bool = False):
  _whole_replicas_in_one_process()
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep, create=not read_only, read_only=read_only
  )
  return ocp.CheckpointManager(directory, options=options)


def _is_array(x) -> bool:
  """An array leaf of a metadata tree (Orbax metadata or ShapeDtypeStruct)."""
  return hasattr(x, "shape") and not isinstance(x, dict)


def _shapes(tree) -> dict[str, tuple]:
  """{'a/b/kernel': shape} of the array leaves (Orbax metadata or ShapeDtypeStructs)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_array)[0]
  return {tree_lib.path_str(kp): tuple(x.shape) for kp, x in leaves if hasattr(x, "shape")}


def _stored_tree(item_dir: pathlib.Path):
  """The metadata tree (shapes, dtypes) of one saved item, without reading its arrays."""
  if not item_dir.is_dir():
    raise FileNotFoundError(f"{item_dir} is missing")
  with ocp.StandardCheckpointer() as ckptr:
    metadata = ckptr.metadata(item_dir).item_metadata
  if metadata is None:
    raise ValueError(f"cannot read the array metadata of {item_dir} (damaged?)")
  return metadata.tree


def check_shapes(stored, wanted, where: str) -> None:
  """Raises ShapeMismatchError listing every path whose shape differs, or that only one side
  has.  stored: the checkpoint's metadata tree; wanted: the abstract tree to restore into."""
  have, want = _shapes(stored), _shapes(wanted)
  problems = [
    f"{p}: checkpoint {have[p]}, this config {want[p]}"
    for p in sorted(have.keys() & want.keys())
    if have[p] != want[p]
  ]
  problems += [f"{p}: only in the checkpoint {have[p]}" for p in sorted(have.keys() - want.keys())]
  problems += [
    f"{p}: missing from the checkpoint (this config {want[p]})"
    for p in sorted(want.keys() - have.keys())
  ]
  if problems:
    more = f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise ShapeMismatchError(
      f"{where} does not fit the model of this config (was it written with another "
      f"model size?): {'; '.join(problems[:MAX_LISTED])}{more}"
    )


def _finite(x) -> bool:
  """On the host, shard by shard (no compile): this process's copy of each distinct shard."""
  if isinstance(x, jax.Array):
    return all(
      np.isfinite(np.asarray(s.data)).all() for s in x.addressable_shards if s.replica_id == 0
    )
  return bool(np.isfinite(np.asarray(x)).all())


def nonfinite_paths(tree) -> list[str]:
  """Paths of the floating-point leaves holding NaN or inf, agreed by all processes."""
  leaves = [
    (tree_lib.path_str(kp), x)
    for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  bad = np.array([not _finite(x) for _, x in leaves], bool)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    bad = np.asarray(multihost_utils.process_allgather(bad)).any(axis=0)
  return [path for (path, _), b in zip(leaves, bad) if b]


class Checkpointer:
  """Saves and restores the run state under `workdir/checkpoints`."""

  def __init__(self, workdir, keep: int | None = 3):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    self._mngr = _manager(self.directory, keep)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, params, train_state, data_iterator, meta: dict) -> None:
    """Saves asynchronously; raises NonFiniteStateError (saving nothing) if `params` hold NaN
    or inf. (Optimizer states only turn non-finite through a non-finite gradient, which the
    jobs stop at or skip, train/divergence.py; checking params alone keeps the check cheap.)"""
    bad = nonfinite_paths(params)
    if bad:
      raise NonFiniteStateError(
        f"refusing to write checkpoint {self.directory}/{step}: {len(bad)} arrays hold "
        f"NaN or inf, e.g. {bad[:MAX_LISTED]}; the last good checkpoint is "
        f"{self.latest_step()} (kept)"
      )
    # The process count always goes with the state: resume.restore_latest refuses a checkpoint
    # written by another count (its data-iterator states and shard layout would not fit).
    meta = {"process_count": jax.process_count(), **meta}
    args = dict(
      params=ocp.args.StandardSave(params),
      train=ocp.args.StandardSave(train_state),
      meta=ocp.args.JsonSave(meta),
    )
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._mngr.save(step, args=ocp.args.Composite(**args), force=True)

  def read_meta(self, step: int) -> dict:
    """The `meta` item alone (cheap: no arrays are read)."""
    out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return out["meta"]

  def restore(self, step: int, abstract_params, abstract_train, data_iterator):
    """Restores into the given abstract trees (shape/dtype/sharding) and the iterator, after
    comparing the stored shapes with them (ShapeMismatchError)."""
    for name, wanted in (("params", abstract_params), ("train", abstract_train)):
      stored = _stored_tree(self.directory / str(step) / name)
      check_shapes(stored, wanted, f"checkpoint {self.directory}/{step} ({name})")
    args = dict(
      params=ocp.args.StandardRestore(abstract_params),
      train=ocp.args.StandardRestore(abstract_train),
      meta=ocp.args.JsonRestore(),
    )
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    out = self._mngr.restore(step, args=ocp.args.Composite(**args))
    return out["params"], out["train"], out["meta"]

  def set_aside(self, step: int) -> pathlib.Path:
    """Renames a damaged checkpoint to `<step>.damaged[.k]` (kept for inspection, invisible
    to Orbax and to rotation); returns the new path. Process 0 renames, the others wait."""
    source = self.directory / str(step)
    target = source.with_name(f"{step}.damaged")
    k = 1
    while target.exists():
      target, k = source.with_name(f"{step}.damaged.{k}"), k + 1
    if jax.process_index() == 0:
      source.rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self._mngr.reload()
    return target

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def find_checkpoint_dir(path, step: int | None = None) -> pathlib.Path:
  """The folder of checkpoint `step` (default: the latest, or `path` itself when it is one
  step's folder) under `path`, a workdir or its `checkpoints` folder. The commands that pick
  one (export, evaluate) call the choice --round, hence the error's wording."""
  path = pathlib.Path(path).absolute()
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if step is not None:
    if not (path / str(step) / "params").is_dir():
      rounds = sorted(int(p.name) for p in path.glob("[0-9]*") if (p / "params").is_dir())
      raise FileNotFoundError(
        f"--round={step}: no checkpoint of round {step} under {path}; rounds there: {rounds}"
      )
    return path / str(step)
  if (path / "params").is_dir():
    return path
  mngr = _manager(path, None, read_only=True)
  latest = mngr.latest_step()
  if latest is None:
    raise FileNotFoundError(f"no ultrajax checkpoint under {path}")
  return path / str(latest)


def load_params(path, abstract_params=None):
  """Server parameters of the latest (or the given) checkpoint, e.g. for fine-tuning.

  abstract_params: optional target tree (shapes, dtypes, shardings); without it the arrays
  come back whole on this process's first device, however they were sharded when saved (a
  multi-host run's checkpoint reads on one machine). A target whose shapes differ from the
  stored ones raises ShapeMismatchError naming each parameter and both shapes.
  """
  directory = find_checkpoint_dir(path) / "params"
  stored = _stored_tree(directory)
  if abstract_params is None:
    abstract_params = on_one_device(stored)
  else:
    check_shapes(stored, abstract_params, f"checkpoint {directory.parent}")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(directory, abstract_params)


def on_one_device(tree):
  """ShapeDtypeStructs of `tree`'s arrays (or array metadata) on this process's first device:
  an Orbax restore target that reads a checkpoint whole, however it was sharded when saved."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree, is_leaf=_is_array
  )


def abstract_like(tree, shardings):
  """ShapeDtypeStructs with shardings for an Orbax restore target."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )
