"""ultrajax/train/compiler.py: the persistent compilation cache and the host's XLA flags."""

import os
import subprocess
import sys
import textwrap

import pytest

from ultrajax import configlib
from ultrajax.train import compiler

AVX512 = {"fpu", "avx2", "avx512f", "avx512bw"}


@pytest.mark.parametrize(
  "flags, features, expected",
  [
    ("", AVX512, "--xla_cpu_prefer_vector_width=512"),
    ("--xla_force_host_platform_device_count=8", AVX512,
     "--xla_force_host_platform_device_count=8 --xla_cpu_prefer_vector_width=512"),
    ("--xla_force_host_platform_device_count=8", {"fpu", "avx2"},
     "--xla_force_host_platform_device_count=8"),
    ("--xla_cpu_prefer_vector_width=256", AVX512, "--xla_cpu_prefer_vector_width=256"),
    ("", set(), ""),
  ],
)  # fmt: skip
def test_host_flags_ask_for_512_bit_vectors_only_on_avx512_and_keep_a_users_width(
  flags, features, expected
):
  assert compiler.host_xla_flags(flags, features) == expected


def test_cpu_flags_read_this_hosts_cpuinfo():
  if not os.path.exists("/proc/cpuinfo"):
    pytest.skip("no /proc/cpuinfo")
  with open("/proc/cpuinfo") as f:
    line = next(line for line in f if line.startswith("flags"))
  assert compiler.cpu_flags() == set(line.split(":", 1)[1].split())


def test_default_cache_prefers_ultrajax_then_jax_environment(monkeypatch):
  monkeypatch.delenv(compiler.CACHE_ENV, raising=False)
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  assert compiler.default_cache_dir() == "~/.cache/ultrajax/xla"
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/j")
  assert compiler.default_cache_dir() == "/j"
  monkeypatch.setenv(compiler.CACHE_ENV, "")  # empty: off, even with JAX's set
  assert compiler.default_cache_dir() == ""
  assert compiler.use_compilation_cache("") is None


def test_a_cache_folder_that_cannot_be_made_names_it(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(configlib.ConfigError, match=r"--compilation_cache=.*file/xla"):
    compiler.use_compilation_cache(str(tmp_path / "file" / "xla"))


def test_a_second_process_loads_the_program_the_first_compiled(tmp_path):
  """Two fresh processes with the cache at one folder: the first writes the entry, the second
  reports a cache hit (JAX's monitoring event) and computes the same value. The folder already
  holds an entry of a plain JAX process without a size limit (no access-time file beside it),
  which once made every write of a process with a limit fail."""
  script = textwrap.dedent(f"""
    import jax, jax.numpy as jnp
    from ultrajax.train import compiler
    hits = []
    jax.monitoring.register_event_listener(
      lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
    print(compiler.use_compilation_cache({str(tmp_path / "cache")!r}))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    x = jnp.arange(12.0).reshape(3, 4)
    print(float(jax.jit(lambda a: jnp.tanh(a @ a.T).sum())(x)), len(hits))
  """)
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  plain = "import jax, jax.numpy as jnp; print(jax.jit(jnp.cos)(jnp.ones(5)))"
  subprocess.run(
    [sys.executable, "-c", plain],
    env=dict(env, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"),
    check=True, capture_output=True, timeout=300,
  )  # fmt: skip
  assert {f.name.split("-")[-1] for f in (tmp_path / "cache").iterdir()} == {"cache"}
  runs = [
    subprocess.run(
      [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    for _ in range(2)
  ]
  for run in runs:
    assert run.returncode == 0, run.stderr[-2000:]
  (folder, first), (_, second) = (run.stdout.split("\n")[:2] for run in runs)
  assert folder == str(tmp_path / "cache")
  assert any(f.name.endswith("-cache") for f in (tmp_path / "cache").iterdir())
  assert first.split()[1] == "0" and second.split()[1] != "0"
  assert "Error writing persistent compilation cache" not in runs[0].stderr
  assert first.split()[0] == second.split()[0]
