"""Throughput accounting: FLOPs of compiled programs, peak FLOP/s by device, MFU."""

from __future__ import annotations

import os
import platform

import jax

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity).
PEAK_BF16_FLOPS = {
  "H100": 989e12,
  "H200": 989e12,
  "A100": 312e12,
  "L4": 121e12,
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
}


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled program, from XLA's cost analysis (None if absent)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # not every backend implements cost analysis
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def mfu(flops_per_second_per_device: float | None, device=None) -> float | None:
  """The FLOP/s as a fraction of `device`'s (default: the first device's) bf16 peak; None when
  either is unknown (CPU)."""
  kind = (device or jax.devices()[0]).device_kind.lower()
  peak = next((p for name, p in PEAK_BF16_FLOPS.items() if name.lower() in kind), None)
  if not flops_per_second_per_device or not peak:
    return None
  return flops_per_second_per_device / peak


def host_description() -> str:
  """The host's CPU model and usable cores, e.g. 'AMD EPYC, 2 cores': figures from different
  CPUs do not compare (PyTorch's MKL, for one, takes a slower path on AMD than on Intel)."""
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return f"{model}, {cores} cores"
