"""Orbax checkpoints of a training run: params, training state, data iterators, metadata.

Items of one checkpoint (a directory `workdir/checkpoints/<round>`, committed atomically):
  params  the server (global) parameters: what fine-tuning, export and `init_from` read;
  train   everything else for a bitwise-identical continuation (client optimizer states,
          RNG key, round);
  data    the Grain iterator states, one JSON file per process;
  meta    JSON: round, process count, config, so a mismatched resume fails loudly.
Saves are asynchronous; `wait()` (called by `close()`) makes sure the last one finished.
"""
from __future__ import annotations

import pathlib

import grain
import jax
import orbax.checkpoint as ocp


def _manager(directory: pathlib.Path, keep: int | None, read_only: bool = False):
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                         read_only=read_only)
  return ocp.CheckpointManager(directory, options=options)


class Checkpointer:
  """Saves and restores the run state under `workdir/checkpoints`."""

  def __init__(self, workdir, keep: int | None = 3):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    self._mngr = _manager(self.directory, keep)

  def latest_round(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, round_index: int, params, train_state, data_iterator, meta: dict) -> None:
    args = dict(params=ocp.args.StandardSave(params),
                train=ocp.args.StandardSave(train_state),
                meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._mngr.save(round_index, args=ocp.args.Composite(**args), force=True)

  def restore(self, round_index: int, abstract_params, abstract_train, data_iterator):
    """Restores into the given abstract trees (shape/dtype/sharding) and the iterator."""
    args = dict(params=ocp.args.StandardRestore(abstract_params),
                train=ocp.args.StandardRestore(abstract_train),
                meta=ocp.args.JsonRestore())
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    out = self._mngr.restore(round_index, args=ocp.args.Composite(**args))
    return out["params"], out["train"], out["meta"]

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def find_checkpoint_dir(path) -> pathlib.Path:
  """`path` may be a workdir, its `checkpoints` folder, or one round's folder."""
  path = pathlib.Path(path).absolute()
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
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
  come back as saved, on the default device.
  """
  directory = find_checkpoint_dir(path) / "params"
  with ocp.StandardCheckpointer() as ckptr:
    if abstract_params is None:
      return ckptr.restore(directory)
    return ckptr.restore(directory, abstract_params)


def abstract_like(tree, shardings):
  """ShapeDtypeStructs with shardings for an Orbax restore target."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
