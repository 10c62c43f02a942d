"""How XLA compiles a job: the persistent compilation cache, and XLA:CPU's vector width.

Both must be set before JAX starts its backends, so `ultrajax.main` (and `bench`) call them
first thing.

- `use_compilation_cache(path)`: JAX's persistent cache. A restarted or repeated run loads its
  compiled programs instead of compiling them again (the `smoke` pretraining run: 10.7 -> 3.7 s
  of compiling, 27 -> 16 s in all; docs/benchmarks.md). JAX keys an entry by the program, its
  compile options, the XLA flags and the devices, so a hit is the same executable and the run
  the same to the bit. The cache is kept under a size limit, least recently used out first.
- `tune_for_host()`: on an AVX-512 CPU, `--xla_cpu_prefer_vector_width=512` (XLA:CPU emits
  256-bit vectors by default). The MAE-B/16 step ran 5-9% faster with it on an AMD EPYC
  (docs/benchmarks.md); a vector width already in XLA_FLAGS is kept.
"""

from __future__ import annotations

import os
import pathlib
import re

from ultrajax import configlib

CACHE_ENV = "ULTRAJAX_COMPILATION_CACHE"
DEFAULT_CACHE = "~/.cache/ultrajax/xla"
CACHE_MAX_BYTES = 4 << 30
VECTOR_WIDTH_FLAG = "--xla_cpu_prefer_vector_width"


def default_cache_dir() -> str:
  """Where the cache goes unless a flag says otherwise: $ULTRAJAX_COMPILATION_CACHE, else JAX's
  own $JAX_COMPILATION_CACHE_DIR, else ~/.cache/ultrajax/xla. An empty value turns it off."""
  for name in (CACHE_ENV, "JAX_COMPILATION_CACHE_DIR"):
    if name in os.environ:
      return os.environ[name]
  return DEFAULT_CACHE


def use_compilation_cache(directory: str | None) -> pathlib.Path | None:
  """Turns JAX's persistent compilation cache on at `directory` ('~' expanded; '' or None: off)
  and returns the folder. Programs that took at least a second to compile are kept (JAX's
  default threshold), up to CACHE_MAX_BYTES in all; with a size limit JAX also locks the folder,
  so processes sharing it read whole entries. A folder that cannot be made raises ConfigError
  naming it."""
  if not directory:
    return None
  import jax

  path = pathlib.Path(directory).expanduser()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise configlib.ConfigError(
      f"--compilation_cache={directory}: cannot create the folder ({e.strerror}); "
      "pass another folder, or --compilation_cache= to run without the cache"
    ) from None
  _stamp_unstamped_entries(path)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
  return path


def _stamp_unstamped_entries(path: pathlib.Path) -> None:
  """Gives every entry in the folder an access-time file where it has none.

  With a size limit JAX keeps a `<key>-atime` file beside each `<key>-cache` entry and reads
  them all before writing a new entry; one missing (an entry written by a JAX process without
  a limit, e.g. one that only set $JAX_COMPILATION_CACHE_DIR, which this job's default shares)
  fails every later write with FileNotFoundError, a warning only, so nothing compiled in the run
  is kept (jax 0.10-0.11). The stamp is the entry's modification time, in JAX's format
  (nanoseconds, 8 bytes little-endian), so such entries are evicted first."""
  for entry in path.glob("*-cache"):
    stamp = path / (entry.name.removesuffix("-cache") + "-atime")
    try:
      if not stamp.exists():
        stamp.write_bytes(entry.stat().st_mtime_ns.to_bytes(8, "little"))
    except OSError:  # removed meanwhile, or a read-only folder: JAX reports its own errors
      pass


def cpu_flags() -> set[str]:
  """The host CPU's feature flags from /proc/cpuinfo ('avx512f', ...); empty where unreadable."""
  try:
    with open("/proc/cpuinfo") as f:
      line = next((line for line in f if line.startswith("flags")), "")
  except OSError:
    return set()
  return set(line.partition(":")[2].split())


def host_xla_flags(xla_flags: str, features: set[str]) -> str:
  """`xla_flags` (an XLA_FLAGS value) with the vector width for a CPU with these features:
  512 where it has AVX-512 (avx512f) and the flags name no width; otherwise unchanged."""
  if "avx512f" not in features or re.search(rf"{VECTOR_WIDTH_FLAG}\b", xla_flags):
    return xla_flags
  return f"{xla_flags} {VECTOR_WIDTH_FLAG}=512".strip()


def tune_for_host() -> None:
  """Sets XLA_FLAGS for this host's CPU (`host_xla_flags`). Call it before JAX starts."""
  os.environ["XLA_FLAGS"] = host_xla_flags(os.environ.get("XLA_FLAGS", ""), cpu_flags())
