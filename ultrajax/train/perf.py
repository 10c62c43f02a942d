"""Throughput accounting: FLOPs of traced and compiled programs, peak FLOP/s by device, MFU,
and where a profiled program's time went (`trace_summary`)."""

from __future__ import annotations

import collections
import gzip
import json
import math
import os
import pathlib
import platform
import re

import jax
import jax.extend.core
from absl import logging

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
  return sum(matmul_flops_by_dtype(jaxpr).values())


def matmul_flops_by_dtype(jaxpr) -> dict[str, float]:
  """matmul_flops split by the products' operand dtypes: {'bfloat16': ..., 'float32': ...}, a
  product of two dtypes under 'bfloat16 x float32'. On an accelerator only the bfloat16 share
  runs at the bf16 peak that MFU divides by; a float32 product runs several times slower."""
  tally: dict[str, float] = {}
  for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
    name = eqn.primitive.name
    if name in ("dot_general", "conv_general_dilated"):
      out = math.prod(eqn.outvars[0].aval.shape)
      lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
      if name == "dot_general":
        (contracted, _), _ = eqn.params["dimension_numbers"]
        flops = 2.0 * out * math.prod(lhs[d] for d in contracted)
      else:  # rhs: out features x in features per group x window
        flops = 2.0 * out * math.prod(rhs) / rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
      a, b = (str(v.aval.dtype) for v in eqn.invars[:2])
      _add(tally, {a if a == b else f"{a} x {b}": flops})
    inner = [matmul_flops_by_dtype(j) for j in jax.extend.core.jaxprs_in_params(eqn.params)]
    if name == "scan":
      for part in inner:
        _add(tally, part, eqn.params["length"])
    elif name == "cond":
      _add(tally, max(inner, key=lambda part: sum(part.values()), default={}))
    else:
      for part in inner:
        _add(tally, part)
  return tally


def dtype_shares(by_dtype: dict[str, float]) -> str:
  """'bfloat16 99.2%, float32 0.8%': matmul_flops_by_dtype's shares, largest first."""
  total = sum(by_dtype.values()) or 1.0
  ranked = sorted(by_dtype.items(), key=lambda kv: -kv[1])
  return ", ".join(f"{key} {100 * flops / total:.1f}%" for key, flops in ranked)


def _add(tally: dict[str, float], part: dict[str, float], times: float = 1.0) -> None:
  for key, flops in part.items():
    tally[key] = tally.get(key, 0.0) + times * flops


def peak_bf16_flops(device=None) -> float | None:
  """`device`'s (default: the first device's) dense bf16 peak FLOP/s; None when unknown (CPU)."""
  kind = (device or jax.devices()[0]).device_kind.lower()
  return next((p for name, p in PEAK_BF16_FLOPS.items() if name.lower() in kind), None)


def mfu(flops_per_second_per_device: float | None, device=None) -> float | None:
  """The FLOP/s as a fraction of `device`'s (default: the first device's) bf16 peak; None when
  either is unknown (CPU)."""
  peak = peak_bf16_flops(device)
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


def op_names(hlo_text: str) -> dict[str, str]:
  """{HLO instruction name: the JAX op it came from} (its op_name metadata, the jit's own name
  dropped) from a compiled module's text (`compiled.as_text()`)."""
  names = {}
  for line in hlo_text.splitlines():
    found = re.match(r"\s*(?:ROOT )?%?([\w.-]+) = ", line)
    op = re.search(r'op_name="([^"]+)"', line)
    if found and op:
      names[found.group(1)] = re.sub(r"^jit\([^)]*\)/", "", op.group(1))
  return names


def _union_ms(spans: list[tuple[float, float]]) -> float:
  """Length of the union of [start, end) spans (microseconds) in milliseconds."""
  total, end = 0.0, -math.inf
  for a, b in sorted(spans):
    if b > end:
      total += b - max(a, end)
      end = b
  return total / 1e3


def _leaves(events: list[dict]) -> list[dict]:
  """The events that hold no other event of their line (pid, tid) inside their span: a
  while loop's thunk holds its body's on XLA:CPU, and counting both would count the body twice."""
  by_line = collections.defaultdict(list)
  for e in events:
    by_line[e["pid"], e.get("tid")].append(e)
  leaves = []
  for line in by_line.values():
    line.sort(key=lambda e: (e["ts"], -e["dur"]))
    for e, after in zip(line, line[1:] + [None]):
      if after is None or after["ts"] + after["dur"] > e["ts"] + e["dur"]:  # not inside e
        leaves.append(e)
  return leaves


def _instruction(event: dict) -> str:
  """The HLO instruction a trace event ran: its `hlo_op`, or, for a GPU kernel inside a CUDA
  graph (XLA's command buffers, whose kernels all carry the command buffer's name as hlo_op),
  the kernel's own name with its '_N' suffix as HLO's '.N' (fusion_12 -> fusion.12; cuBLAS
  kernels keep their names)."""
  args = event.get("args") or {}
  op = args.get("hlo_op") or event["name"]
  if "cuda_graph_id" in args or op.startswith("command_buffer"):
    op = re.sub(r"_([0-9]+)$", r".\1", event["name"])
  return op


def trace_summary(trace_file, names: dict[str, str] | None = None, rows: int = 20) -> dict:
  """Where the XLA ops of one jax.profiler trace (a perfetto_trace.json.gz or trace.json.gz)
  spent their time: the events that carry an `hlo_op`, on the accelerator when the trace has
  one (its stream lines on a GPU, its 'XLA Ops' line on a TPU, so derived lines are not
  counted twice), else the host's XLA:CPU thunks; of nested events (a loop and its body) only
  the innermost.

  Returns {'where': which events, 'busy_ms': the union of their spans (the time any of the
  devices, or XLA:CPU's threads, ran an op), 'total_ms': their sum
  (above busy_ms where ops overlap), 'rows': [(ms, count, instruction kind, JAX op)] the
  largest first, at most `rows`}: kind is the instruction name without its '.N' suffix (the
  kernel's name where a device trace names no instruction), op its op_name from `names`
  (op_names of the program's HLO), '?' when unknown."""
  with gzip.open(trace_file, "rt") as f:
    events = json.load(f)["traceEvents"]
  meta = lambda kind: {  # noqa: E731
    (e["pid"], e.get("tid")) if kind == "thread_name" else e["pid"]: e["args"]["name"]
    for e in events
    if e.get("ph") == "M" and e.get("name") == kind
  }
  processes, threads = meta("process_name"), meta("thread_name")
  spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
  has_op = lambda e: "hlo_op" in (e.get("args") or {})  # noqa: E731
  device = [e for e in spans if str(processes.get(e["pid"], "")).startswith("/device:")]
  ops, where = [e for e in spans if has_op(e)], "host (XLA:CPU thunks)"
  if device:  # the device's events; by kernel name if none names its HLO instruction
    ops, where = [e for e in device if has_op(e)] or device, "device"
    line = lambda e: str(threads.get((e["pid"], e.get("tid")), ""))  # noqa: E731
    for prefix, label in (("Stream", "device streams"), ("XLA Ops", "device 'XLA Ops' line")):
      chosen = [e for e in ops if line(e).startswith(prefix)]
      if chosen:
        ops, where = chosen, label
        break
  ops = _leaves(ops)
  names = names or {}
  totals, counts = collections.Counter(), collections.Counter()
  for e in ops:
    instruction = _instruction(e)
    key = (re.sub(r"[.][0-9]+$", "", instruction), names.get(instruction, "?"))
    totals[key] += e["dur"] / 1e3
    counts[key] += 1
  return dict(
    where=where,
    busy_ms=_union_ms([(e["ts"], e["ts"] + e["dur"]) for e in ops]),
    total_ms=sum(totals.values()),
    rows=[(ms, counts[key], *key) for key, ms in totals.most_common(rows)],
  )


def latest_trace(trace_dir) -> pathlib.Path:
  """The newest perfetto_trace.json.gz that jax.profiler.trace(trace_dir,
  create_perfetto_trace=True) wrote (it adds plugins/profile/<time>/)."""
  found = list(pathlib.Path(trace_dir).glob("plugins/profile/*/perfetto_trace.json.gz"))
  if not found:
    raise FileNotFoundError(f"{trace_dir}: no perfetto_trace.json.gz under plugins/profile/")
  return max(found, key=os.path.getmtime)


def summary_lines(summary: dict, wall_ms: float, what: str) -> list[str]:
  """trace_summary's figures as lines: `what` (e.g. '2 chunk calls'), how busy the device was
  over `wall_ms`, then one line per row, the ops' nesting in the chunk's loop left out."""
  busy = summary["busy_ms"]
  lines = [
    f"{what}, {wall_ms:.1f} ms; XLA ops on the {summary['where']} busy {busy:.1f} ms "
    f"({100 * busy / max(wall_ms, 1e-9):.0f}%), {summary['total_ms']:.1f} ms summed"
  ]
  for ms, count, kind, op in summary["rows"]:
    op = re.sub(r"while/body/|closed_call/|eval_jaxpr/", "", op)
    lines.append(f"{ms:10.1f} ms {count:6d}x  {kind:<28} {op[-70:]}")
  return lines


def profile_report(trace_dir, hlo_text: str, wall_s: float, what: str, rows: int = 12):
  """(the newest trace under trace_dir, its summary_lines): a profiled program's XLA ops named
  from its compiled HLO text, busy time against wall_s. Raises if the trace cannot be read."""
  trace = latest_trace(trace_dir)
  return trace, summary_lines(trace_summary(trace, op_names(hlo_text), rows), 1e3 * wall_s, what)


def log_profile(trace_dir, hlo_text: str, wall_s: float, what: str, rows: int = 12) -> None:
  """Logs profile_report's lines (a job's profiled round); a trace that cannot be read is
  logged, not raised."""
  try:
    trace, lines = profile_report(trace_dir, hlo_text, wall_s, what, rows)
  except (OSError, ValueError, KeyError) as e:
    logging.warning("Profile of %s: the trace could not be read (%s)", what, e)
    return
  logging.info("Profile of %s (trace: %s):", lines[0], trace)
  for line in lines[1:]:
    logging.info("  %s", line)
