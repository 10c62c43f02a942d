r"""ultrajax entry point: `python -m ultrajax.main --config=configs/<job>.py[:preset] --workdir=DIR`.

Loads the config (any field can be overridden with `--config.field=value`, tuples as a Python
literal; an unknown field stops start-up naming it), validates it before JAX starts, starts
multi-process JAX when launched as several processes, prints versions, devices and the mesh,
logs the resolved config once (also written to `<workdir>/config.json`) and runs `config.job`.
Orbax's INFO lines (about 60 per checkpoint save) are left out unless --verbose. A user error (configlib.USER_ERRORS: a config value, a data or weights
file) prints one line naming the field or file and exits 1; `--verbose` or ULTRAJAX_VERBOSE=1
shows its traceback. Compiled programs are kept in JAX's persistent compilation cache
(`--compilation_cache`, default ~/.cache/ultrajax/xla; ultrajax/train/compiler.py), so a resumed
or repeated run skips most of its compiling.
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ultrajax import configlib
from ultrajax.train import compiler

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Job config file[:preset,k=v].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and PNGs go.")
_COORDINATOR = flags.DEFINE_string(
  "coordinator",
  None,
  "host:port of process 0, for multi-process runs without a TPU/SLURM "
  "environment that JAX detects by itself (see launch/local_multiprocess.sh).",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_COMPILATION_CACHE = flags.DEFINE_string(
  "compilation_cache",
  compiler.default_cache_dir(),
  "Folder of JAX's persistent compilation cache: a restarted or repeated run loads its "
  f"compiled programs from it. Default ${compiler.CACHE_ENV}, else $JAX_COMPILATION_CACHE_DIR, "
  f"else {compiler.DEFAULT_CACHE}; empty: off.",
)
_VERBOSE = flags.DEFINE_bool(
  "verbose",
  False,
  "Show the traceback of user errors (config, data, "
  "files) and Orbax's INFO lines too; also env ULTRAJAX_VERBOSE=1.",
)

# config.job -> module in ultrajax.jobs with a `run(config, workdir)` function.
JOBS = {
  name: f"ultrajax.jobs.{name}"
  for name in ("pretrain", "sam", "hsl", "finetune", "transfer_study", "benefit")
}


def _launched_as_several_processes() -> bool:
  env = os.environ
  return bool(
    env.get("JAX_COORDINATOR_ADDRESS")
    or "," in env.get("TPU_WORKER_HOSTNAMES", "")  # a multi-host TPU slice
    or int(env.get("SLURM_NTASKS", "1")) > 1
  )


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() when this is one of several processes."""
  import jax

  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _launched_as_several_processes():
    jax.distributed.initialize()


def describe_runtime() -> None:
  import flax
  import grain
  import jax
  import optax
  import orbax.checkpoint

  logging.info(
    "python %s | jax %s | flax %s | optax %s | orbax %s | grain %s",
    sys.version.split()[0],
    jax.__version__,
    flax.__version__,
    optax.__version__,
    orbax.checkpoint.__version__,
    grain.__version__,
  )
  logging.info(
    "process %d of %d; %d local / %d global devices: %s",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    ", ".join(sorted({d.device_kind for d in jax.devices()})),
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config=configs/<job>.py[:preset] is required")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  try:
    config.job  # noqa: B018 -- a file that failed to load raises here, on first use
  except OSError as e:  # ml_collections could not load the file; its message says which
    raise configlib.ConfigError(f"--config: {' '.join(str(e).split())}") from None
  if config.job not in JOBS:
    raise app.UsageError(f"config.job={config.job!r} is not one of {sorted(JOBS)}")
  compiler.tune_for_host()  # XLA_FLAGS and the cache before JAX starts its backends
  compiler.use_compilation_cache(_COMPILATION_CACHE.value)
  job = importlib.import_module(JOBS[config.job])
  if hasattr(job, "validate"):  # a bad value fails here, before devices start or models build
    job.validate(config)
  maybe_initialize_distributed()
  from ultrajax.train import writers

  writers.quiet_orbax(not _verbose())
  describe_runtime()
  writers.log_config(config, _WORKDIR.value)
  job.run(config, _WORKDIR.value)


def _verbose() -> bool:
  return _VERBOSE.value or os.environ.get(configlib.VERBOSE_ENV, "") not in ("", "0")


def resolve_config_flag(argv):
  """`--config=configs/x.py[:arg]` also names the configs shipped with ultrajax, so an installed
  (non-editable) package runs the README's commands from any directory."""
  out = []
  for arg in argv:
    if arg.startswith("--config="):
      path, sep, rest = arg[len("--config=") :].partition(":")
      found = configlib.find_config_file(path)
      if found is not None:
        arg = f"--config={found}{sep}{rest}"
    out.append(arg)
  return out


def parse_flags(argv):
  """absl's flag parsing, with a misspelt `--config.<field>` as one line naming it (ml_collections
  raises AttributeError, which absl would print as a traceback)."""
  try:
    return app.parse_flags_with_usage(resolve_config_flag(argv))
  except AttributeError as e:
    if "--verbose" in argv or os.environ.get(configlib.VERBOSE_ENV, "") not in ("", "0"):
      raise
    detail = e.args[0] if e.args else e
    while isinstance(detail, KeyError) and detail.args:  # ml_collections wraps a KeyError
      detail = detail.args[0]
    detail = " ".join(str(detail).split())
    print(f"error: a --config.* flag names no config field: {detail}", file=sys.stderr, flush=True)
    sys.exit(1)


def entry():
  app.run(configlib.report_user_errors(main, lambda: _VERBOSE.value), flags_parser=parse_flags)


if __name__ == "__main__":
  entry()
