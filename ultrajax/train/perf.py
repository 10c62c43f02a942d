"""Throughput accounting: FLOPs of traced and compiled programs, peak FLOP/s by device, MFU."""

from __future__ import annotations

import math
import os
import platform

import jax
import jax.extend.core

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


def matmul_flops(jaxpr) -> float:
  """FLOPs of a (closed) jaxpr's matrix products, dot_general and convolutions, 2 per
  multiply-add: the model FLOPs that MFU divides by (elementwise work is left out).

  Sub-jaxprs count too: a scan's body `length` times, a cond's costliest branch, any other
  (pjit, custom_vjp's primal, a while body) once. A scan over the layers therefore counts every
  layer, where XLA's cost analysis counts a loop body once. A rematerialised block's recomputed
  forward sits in the jaxpr too, so count a model traced without remat.
  """
  total = 0.0
  for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
    name = eqn.primitive.name
    if name in ("dot_general", "conv_general_dilated"):
      out = math.prod(eqn.outvars[0].aval.shape)
      lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
      if name == "dot_general":
        (contracted, _), _ = eqn.params["dimension_numbers"]
        total += 2.0 * out * math.prod(lhs[d] for d in contracted)
      else:  # rhs: out features x in features per group x window
        total += 2.0 * out * math.prod(rhs) / rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
    inner = [matmul_flops(j) for j in jax.extend.core.jaxprs_in_params(eqn.params)]
    if name == "scan":
      total += eqn.params["length"] * sum(inner)
    elif name == "cond":
      total += max(inner, default=0.0)
    else:
      total += sum(inner)
  return total


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
