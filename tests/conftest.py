"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""

import os
from importlib import metadata

# --xla_cpu_use_fusion_emitters=false: XLA:CPU's older elemental emitters compile the suite's
# tiny programs in about half the time (measured 2026-12-01: the HSL smoke study's SCAFFOLD round
# chunk 15.2 -> 7.6 CPU s, the whole study 183 -> 163); subprocesses inherit it, so both sides of
# every cross-process equality run the same program. Jobs and benchmarks keep XLA's default.
# jaxlib 0.11 has no such flag (XLA exits on an unknown one): there the emitters are XLA's only.
_flags = " --xla_force_host_platform_device_count=8"
if tuple(int(v) for v in metadata.version("jaxlib").split(".")[:2]) < (0, 11):
  _flags += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + _flags).strip()
# The jobs' own XLA:CPU flags for this host too (512-bit vectors on AVX-512), which
# `ultrajax.main` adds in the subprocesses tests start: both sides of a comparison compile alike.
from ultrajax.train import compiler  # noqa: E402  (no JAX import)

compiler.tune_for_host()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# XLA's optimisation passes off for the whole session (xdist workers and the subprocesses tests
# start inherit it): the suite's tiny programs spend most of their CPU compiling, and compiling
# them unoptimised costs about a third less (measured 2026-12-01: one smoke pretraining run 40.1
# -> 26.3 CPU s, tests/test_finetune.py 106 -> 74 CPU s). What the tests check (equalities with
# references and across runs, resume, errors) holds either way; the jobs and the benchmarks run
# the optimised path. JAX_DISABLE_MOST_OPTIMIZATIONS=false pytest ... tests that path.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
# One persistent XLA compilation cache per test session, shared by the xdist workers and the
# subprocesses tests start (they inherit the environment): the same tiny programs (the smoke
# pretraining chunk above all) are compiled by many tests and by every restart of a killed run.
# A fresh folder each session, so a run's time does not depend on the one before. JAX keys
# entries by the program, its compile options and the devices, so a hit is the same executable.
if "PYTEST_XDIST_WORKER" not in os.environ:  # the controlling process: drop old sessions' caches
  import glob
  import shutil
  import time

  for old in glob.glob("/tmp/ultrajax-test-xla-cache-*"):
    if time.time() - os.path.getmtime(old) > 3600:
      shutil.rmtree(old, ignore_errors=True)
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  f"/tmp/ultrajax-test-xla-cache-{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}",
)
# The size limit `ultrajax.main` sets (compiler.use_compilation_cache), in every process: with
# one JAX keeps an access-time file per entry and needs it for every entry before it writes one,
# so workers without the limit beside subprocesses with it made every subprocess's write fail.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(compiler.CACHE_MAX_BYTES))

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
REAL_US = REPO.parent / "shared" / "data" / "real_us"


@pytest.fixture
def closes_event_files():
  """Fails the test if a TensorBoard event file opened during it is still open at its end.
  tensorboardX writes each file from a thread of its own; an unclosed one is left to an atexit
  hook, which Python 3.12 refuses ("can't create new thread at interpreter shutdown")."""
  import threading

  def writers():
    return {t for t in threading.enumerate() if type(t).__name__ == "_EventLoggerThread"}

  before = writers()
  yield
  assert not writers() - before, "event files left open"


@pytest.fixture(scope="session")
def real_us():
  """Path of the shared real ultrasound samples; skips the test where absent."""
  if not REAL_US.is_dir():
    pytest.skip(f"real ultrasound samples not found at {REAL_US}")
  return REAL_US


# Importing torch's optional triton package after TensorFlow segfaults on this stack (checked
# 2026-12-01: `import tensorflow; import timm` exits 139). ultrajax itself no longer imports
# TensorFlow (TensorBoard goes through tensorboardX), but tensorflow_datasets (the [tfds] extra)
# does; where torch is installed, load it (through timm, which pulls in torchvision and triton)
# before anything imports TensorFlow.
try:
  import timm  # noqa: E402,F401
except ImportError:
  pass


def pytest_configure(config):
  """`pytest -n N` schedules with xdist's loadgroup instead of its default load: tests that
  share a module-scoped fixture (one end-to-end run several tests assert on) form one group and
  run on one worker, so the run is not repeated on each worker its tests would be spread over.
  Other tests stay independent units."""
  if getattr(config.option, "dist", "no") == "load":
    config.option.dist = "loadgroup"


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
  """The controller tells each worker to group: a worker parses the command line itself, and
  `-n N` alone leaves its `dist` at 'no', so it would never group (checked 2026-12-01)."""
  node.workerinput["ultrajax_loadgroup"] = node.config.option.dist == "loadgroup"


def pytest_collection_modifyitems(config, items):
  """On loadgroup workers: the tests that use a module- or class-scoped fixture get the node id
  suffix `@<file name>` by which xdist's loadgroup scheduler groups, so each such fixture is set
  up once per session. Set here, not through an xdist_group mark: xdist 3.8 writes the suffix to
  `item._nodeid`, which pytest 9.2 no longer reads (pytest-xdist issue #1386), so marked tests
  were spread over the workers and each of them ran the fixture again."""
  if not getattr(config, "workerinput", {}).get("ultrajax_loadgroup"):
    return
  for item in items:
    fixturedefs = getattr(item, "_fixtureinfo", None)
    defs = fixturedefs.name2fixturedefs.values() if fixturedefs else ()
    if any(d.scope in ("module", "class") for ds in defs for d in ds):
      grouped = f"{item.nodeid}@{item.path.name}"
      if hasattr(item, "_id"):  # pytest >= 9.2: structured node ids
        from _pytest.nodeid import coerce_node_id

        item._id = coerce_node_id(grouped)
      else:
        item._nodeid = grouped
