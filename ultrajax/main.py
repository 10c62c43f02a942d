r"""ultrajax entry point: `python -m ultrajax.main --config=configs/<job>.py[:preset] --workdir=DIR`.

Loads the config (any field can be overridden with `--config.field=value`; an unknown field
stops start-up naming it), starts multi-process JAX when launched as several processes,
prints versions, devices and the mesh, and runs `config.job`.
"""
from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Job config file[:preset,k=v].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and PNGs go.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0, for multi-process runs without a TPU/SLURM "
    "environment that JAX detects by itself (see launch/local_multiprocess.sh).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")

# config.job -> module in ultrajax.jobs with a `run(config, workdir)` function.
JOBS = {
    "pretrain": "ultrajax.jobs.pretrain",
    "sam": "ultrajax.jobs.sam",
    "hsl": "ultrajax.jobs.hsl",
    "finetune": "ultrajax.jobs.finetune",
    "transfer_study": "ultrajax.jobs.transfer_study",
}

def _launched_as_several_processes() -> bool:
  env = os.environ
  return bool(env.get("JAX_COORDINATOR_ADDRESS")
              or "," in env.get("TPU_WORKER_HOSTNAMES", "")  # a multi-host TPU slice
              or int(env.get("SLURM_NTASKS", "1")) > 1)


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() when this is one of several processes."""
  import jax
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _launched_as_several_processes():
    jax.distributed.initialize()


def describe_runtime() -> None:
  import flax
  import jax
  import optax
  import orbax.checkpoint
  import grain
  logging.info("python %s | jax %s | flax %s | optax %s | orbax %s | grain %s",
               sys.version.split()[0], jax.__version__, flax.__version__, optax.__version__,
               orbax.checkpoint.__version__, grain.__version__)
  logging.info("process %d of %d; %d local / %d global devices: %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               ", ".join(sorted({d.device_kind for d in jax.devices()})))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config=configs/<job>.py[:preset] is required")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  if config.job not in JOBS:
    raise app.UsageError(f"config.job={config.job!r} is not one of {sorted(JOBS)}")
  maybe_initialize_distributed()
  describe_runtime()
  importlib.import_module(JOBS[config.job]).run(config, _WORKDIR.value)


def entry():
  app.run(main)


if __name__ == "__main__":
  entry()
