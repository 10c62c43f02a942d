"""Safe (re)starts in a workdir: one process per workdir, the config checked on resume, and a
fallback past damaged checkpoints. Every checkpointing job uses these (docs/reliability.md).

  with resume.WorkdirLock(workdir):          # a second process on the workdir stops here
    restored = resume.restore_latest(ckpt, abstract_params, abstract_train, data,
                                     config=resume.snapshot(config),
                                     allow=resume.allowed_changes(config))

restore_latest compares the config saved with the newest readable checkpoint to the new one:
a field that changes the result must match, or the run stops with the list of differing fields.
The fields that may always change are CHANGEABLE, here and nowhere else;
`--config.allow_config_change=a.b,c` accepts others knowingly.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from ultrajax import configlib
from ultrajax.train import checkpoint, divergence

# Fields (or whole blocks) that may differ between the run that wrote a checkpoint and the
# one resuming it: durations that extend the run (their schedules are re-derived), cadences
# of logging, images, evaluation and checkpoints, where files go, reader threads, the device
# layout, the start-up source (a workdir's own checkpoint takes precedence over init_from), and
# what only reads the trained params: the pretraining evaluators (`evals`), attention maps,
# test-time blur sigmas and UltraSam's prompted-classification stage after training
# (`classification`).
CHANGEABLE = (
  "preset",
  "fed.num_rounds",
  "num_steps",
  "log_every_rounds",
  "profile_round",
  "image_every_rounds",
  "ckpt_every_rounds",
  "keep_checkpoints",
  "log_every_steps",
  "ckpt_every_steps",
  "eval.every_steps",
  "ckpt_every_epochs",
  "data.num_threads",
  "teacher.cache_dir",
  "mesh",
  "sharding_rules",
  "init_from",
  "allow_config_change",
  "on_nonfinite",
  "evals",
  "classification",
  "attention_every_rounds",
  "eval.blur_sigmas",
)
LOCK_NAME = ".ultrajax.lock"


class ConfigMismatchError(configlib.ConfigError):
  """A resume whose config differs from the checkpoint's in fields that change the result."""


class WorkdirLockedError(configlib.DataError):
  """Another live process holds the workdir."""


# ----------------------------------------------------------------------------- config checks
def validate(config) -> None:
  """Start-up checks of the fields this module reads (every checkpointing job calls it)."""
  if "on_nonfinite" in config:  # jobs that can skip steps (pretrain, finetune) have the field
    configlib.check_choice(config, "on_nonfinite", divergence.MODES)
  for name in allowed_changes(config):
    try:
      configlib.get_field(config, name)
    except configlib.ConfigError:
      raise configlib.ConfigError(
        f"config.allow_config_change names {name!r}, which is not a config field"
      ) from None


def allowed_changes(config) -> tuple[str, ...]:
  return tuple(f.strip() for f in config.get("allow_config_change", "").split(",") if f.strip())


def snapshot(config: ml_collections.ConfigDict, exclude=()) -> dict:
  """The config as saved in a checkpoint's meta (JSON types: tuples become lists), without the
  top-level fields `exclude` (those a study's cell does not depend on)."""
  saved = json.loads(config.to_json_best_effort())
  return {k: v for k, v in saved.items() if k not in exclude}


def _matches(path: str, names) -> bool:
  return any(path == n or path.startswith(n + ".") for n in names)


def config_diff(saved: dict, new: dict, allow=()) -> tuple[list, list]:
  """([(field, saved, new)] differing, [fields only one side has]), CHANGEABLE and `allow` left
  out. Fields only one side has (a field added or removed by an upgrade) cannot be compared."""
  a, b = configlib.flatten(saved), configlib.flatten(new)
  skip = CHANGEABLE + tuple(allow)
  differ = [
    (k, a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k] and not _matches(k, skip)
  ]
  one_side = sorted(k for k in a.keys() ^ b.keys() if not _matches(k, skip))
  return differ, one_side


def check_config(saved, new: dict, *, where: str, allow=()) -> None:
  """Raises ConfigMismatchError with a readable diff when `saved` (dict or JSON string) and
  `new` differ in a field that changes the result."""
  if saved is None:
    logging.warning(
      "%s records no config (written by an older ultrajax): cannot check that "
      "this run's config matches it.",
      where,
    )
    return
  if isinstance(saved, str):
    saved = json.loads(saved)
  differ, one_side = config_diff(saved, new, allow)
  if one_side:
    logging.warning(
      "%s: config fields %s exist on one side only (another ultrajax version?); not compared.",
      where,
      one_side,
    )
  if differ:
    lines = "\n".join(f"  {k}: {json.dumps(old)} -> {json.dumps(now)}" for k, old, now in differ)
    raise ConfigMismatchError(
      f"{where} was written with another config; these fields differ (saved -> now):\n{lines}\n"
      "Use a new --workdir for a new run, or continue knowingly with "
      f"--config.allow_config_change={','.join(k for k, _, _ in differ)}"
    )


# ----------------------------------------------------------------------------- restore
def _summary(error: BaseException) -> str:
  """'Type: first line' of the error and of its root cause (Orbax wraps TensorStore's)."""

  def line(e):
    text = str(e).split("See full TensorStore details")[0].strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"

  root = error
  while root.__cause__ is not None or root.__context__ is not None:
    root = root.__cause__ or root.__context__
  return line(error) if root is error else f"{line(error)} <- {line(root)}"


def restore_latest(
  ckpt: checkpoint.Checkpointer,
  abstract_params,
  abstract_train,
  data_iterator,
  *,
  config: dict,
  allow=(),
):
  """(step, params, train, meta) of the newest checkpoint that restores, or None if there is
  none. Before reading arrays: the process count and the config (`snapshot(config)`) must match
  the checkpoint's meta and the shapes its metadata (errors, not fallbacks). A checkpoint that
  fails to read (truncated or corrupted file, missing item, bad JSON) is skipped with a warning
  and, once an older one restored, renamed aside to `<step>.damaged`, never deleted.
  """
  failures = []
  for r in reversed(ckpt.all_steps()):
    where = f"checkpoint {ckpt.directory}/{r}"
    try:
      meta = ckpt.read_meta(r)
    except Exception as e:  # noqa: BLE001 - any read failure is damage; reported below
      failures.append((r, e))
      continue
    count = meta.get("process_count", 1)
    if count != jax.process_count():
      raise ValueError(
        f"{where} was written by {count} processes, this run has {jax.process_count()}"
      )
    check_config(meta.get("config"), config, where=where, allow=allow)
    try:
      params, train, meta = ckpt.restore(r, abstract_params, abstract_train, data_iterator)
    except checkpoint.ShapeMismatchError:
      raise
    except Exception as e:  # noqa: BLE001
      failures.append((r, e))
      continue
    for bad, e in failures:
      moved = ckpt.set_aside(bad)
      logging.warning(
        "Checkpoint %s/%d could not be restored (%s); renamed it to %s and "
        "resumed from step %d instead.",
        ckpt.directory,
        bad,
        _summary(e),
        moved,
        r,
      )
    return r, params, train, meta
  if failures:
    raise configlib.DataError(
      f"no checkpoint under {ckpt.directory} could be restored: "
      + "; ".join(f"{r}: {_summary(e)}" for r, e in failures)
    )
  return None


# ----------------------------------------------------------------------------- lock
def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


class WorkdirLock:
  """`workdir/.ultrajax.lock` (JSON: host, pid, start time), held for a run's lifetime.

  Taken atomically (a complete file hard-linked into place); a second process stops with
  WorkdirLockedError naming the holder; a lock whose holder pid is gone on this host (a killed
  run) is taken over with a warning. Multi-process runs: process 0 takes it and the others
  learn whether it succeeded. Released on exit, error or not.
  """

  def __init__(self, workdir):
    self.path = pathlib.Path(workdir).absolute() / LOCK_NAME
    self.info = dict(
      host=socket.gethostname(), pid=os.getpid(), started=time.strftime("%Y-%m-%d %H:%M:%S %Z")
    )
    self._held = False

  def _describe(self, holder: dict) -> str:
    return (
      f"process {holder.get('pid')} on host {holder.get('host')!r}, started {holder.get('started')}"
    )

  def _acquire(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = self.path.with_name(f"{LOCK_NAME}.{self.info['host']}.{self.info['pid']}.tmp")
    tmp.write_text(json.dumps(self.info))
    try:
      for _ in range(3):
        try:
          os.link(tmp, self.path)
          self._held = True
          return
        except FileExistsError:
          pass
        try:
          holder = json.loads(self.path.read_text())
        except FileNotFoundError:
          continue  # released meanwhile: try again
        except (OSError, ValueError) as e:
          raise WorkdirLockedError(
            f"{self.path} exists but cannot be read ({e}); if no run is "
            "using this workdir, delete it"
          ) from None
        same_host = holder.get("host") == self.info["host"]
        pid = holder.get("pid")
        if same_host and isinstance(pid, int) and pid != self.info["pid"] and _alive(pid):
          raise WorkdirLockedError(
            f"{self.path.parent} is in use by {self._describe(holder)}; "
            "wait for it to finish or use another --workdir"
          )
        if not same_host:
          raise WorkdirLockedError(
            f"{self.path.parent} is in use by {self._describe(holder)}; if that run is gone, "
            f"delete {self.path}"
          )
        logging.warning(
          "Taking over the stale lock %s of %s (%s).",
          self.path,
          self._describe(holder),
          "this process" if pid == self.info["pid"] else "no such process any more",
        )
        self.path.unlink(missing_ok=True)
      raise WorkdirLockedError(f"could not take {self.path}: other processes keep taking it")
    finally:
      tmp.unlink(missing_ok=True)

  def __enter__(self):
    error = None
    if jax.process_index() == 0:
      try:
        self._acquire()
      except WorkdirLockedError as e:
        error = e
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
      if not ok and error is None:
        error = WorkdirLockedError(f"process 0 could not take {self.path}")
    if error is not None:
      raise error
    return self

  def release(self) -> None:
    if not self._held:
      return
    self._held = False
    try:
      if json.loads(self.path.read_text()) == self.info:
        self.path.unlink()
    except (OSError, ValueError):
      pass  # already gone or replaced: not ours to remove

  def __exit__(self, *exc) -> None:
    self.release()
