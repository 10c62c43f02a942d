"""What a compiled program launches, read off its optimized HLO text (`compiled.as_text()`).

`census` lists the kernels one call runs: every instruction of the entry computation and of the
loops, calls and conditionals it reaches that is not free bookkeeping (parameters, tuples,
bitcasts, constants), each with how many times it runs (a loop's body times its known trip
count), the bytes of its operands and results, and the FLOPs of a library matrix product.
`roofline` prices them on a device: each kernel takes at least its bytes over the memory
bandwidth and its FLOPs over the peak. It is a lower bound built from the program alone, for
comparing two versions of a program compiled for an accelerator this host does not have
(`bench plan --target`): a fusion that reads only part of an operand is charged for all of it,
and no kernel is charged for its launch.

The steady state is priced: a loop whose trip count XLA does not know (`rounds.apply_if`'s
0-or-1 loops, which load and finish clients) is counted zero times, and a conditional by its
first branch (lax.cond's false branch).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

_ITEM_BYTES = dict(
  pred=1, s4=0.5, u4=0.5, s8=1, u8=1, f8e4m3fn=1, f8e5m2=1, s16=2, u16=2, f16=2, bf16=2,
  s32=4, u32=4, f32=4, s64=8, u64=8, f64=8, c64=8, c128=16,
)  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(_ITEM_BYTES) + r")\[([0-9,]*)\]")
_NAME = r"%([\w.\-]+)"
# Instructions that launch nothing: the loops, calls and conditionals are walked into instead.
_FREE = {
  "parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "partition-id",
  "replica-id", "opt-barrier", "add-dependency", "copy-start", "copy-done", "while", "call",
  "conditional",
}  # fmt: skip
_COLLECTIVES = (
  "all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all", "send", "recv",
)  # fmt: skip


@dataclasses.dataclass
class Kernel:
  name: str  # the HLO instruction
  op: str  # its opcode: fusion, custom-call, copy, ...
  kind: str  # fusion name without its number, a custom call's target, else the opcode
  runs: int  # times one call of the program runs it
  bytes: int  # operands + results, per run
  result_bytes: int  # results, per run
  flops: float  # a library matrix product's FLOPs per run (2 per multiply-add), else 0
  source: str  # the JAX op it came from (op_name metadata)
  result: str = ""  # its result type without layouts, e.g. 'bf16[64,197,512]'


def array_bytes(hlo_type: str) -> int:
  """Bytes of every array in an HLO type, e.g. '(bf16[8,4]{1,0}, f32[2])' -> 72."""
  return int(sum(_ITEM_BYTES[t] * math.prod(_dims(d)) for t, d in _ARRAY.findall(hlo_type)))


def _dims(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def _split_type(rest: str) -> tuple[str, str]:
  """'(a, b) op(...)' or 'f32[2]{0} op(...)' -> (type, 'op(...)...')."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += (ch == "(") - (ch == ")")
      if depth == 0:
        return rest[: i + 1], rest[i + 2 :]
  head, _, tail = rest.partition(" ")
  return head, tail


def _call(rest: str) -> tuple[str, list[str], str]:
  """'op(%a, %b), attrs' -> (op, [a, b], attrs)."""
  start = rest.index("(")
  depth = 0
  for i in range(start, len(rest)):
    depth += (rest[i] in "({") - (rest[i] in ")}")
    if depth == 0:
      break
  return rest[:start], re.findall(_NAME, rest[start + 1 : i]), rest[i + 1 :]


def parse(hlo_text: str) -> tuple[dict[str, list[dict]], str]:
  """({computation: [instruction dicts: name, type, op, operands, attrs]}, entry name)."""
  computations, entry, body = {}, "", None
  for line in hlo_text.splitlines():
    header = re.match(r"(ENTRY )?" + _NAME + r" ", line)
    if header and line.rstrip().endswith("{"):
      body = computations[header.group(2)] = []
      entry = header.group(2) if header.group(1) else entry
      continue
    if line.startswith("}"):
      body = None
    found = re.match(r"\s*(?:ROOT )?" + _NAME + r" = (.*)$", line)
    if body is None or not found:
      continue
    hlo_type, rest = _split_type(found.group(2))
    op, operands, attrs = _call(rest)
    body.append(dict(name=found.group(1), type=hlo_type, op=op, operands=operands, attrs=attrs))
  if not entry:
    raise ValueError("no ENTRY computation in the HLO text")
  return computations, entry


def _gemm_flops(instruction: dict, types: dict[str, str]) -> float:
  """2 x output elements x contracted size, from a library GEMM's dot dimension numbers."""
  out = _ARRAY.findall(instruction["type"])
  lhs = _ARRAY.findall(types.get(instruction["operands"][0], "")) if instruction["operands"] else []
  dims = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', instruction["attrs"])
  if not (out and lhs and dims):
    return 0.0
  contracted = [int(d.strip('"')) for d in dims.group(1).split(",") if d.strip()]
  lhs_dims = _dims(lhs[0][1])
  return 2.0 * math.prod(_dims(out[0][1])) * math.prod(lhs_dims[d] for d in contracted)


def census(hlo_text: str) -> list[Kernel]:
  """The kernels one call of a compiled program runs in its steady state (module docstring)."""
  computations, entry = parse(hlo_text)
  types = {i["name"]: i["type"] for body in computations.values() for i in body}
  kernels: list[Kernel] = []

  def walk(name: str, runs: int) -> None:
    for ins in computations[name]:
      op, attrs = ins["op"], ins["attrs"]
      if op == "while":
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
        n = int(trips.group(1)) if trips else 0
        walk(re.search(r"body=" + _NAME, attrs).group(1), runs * n)
        walk(re.search(r"condition=" + _NAME, attrs).group(1), runs * (n + 1))
      elif op == "call":
        walk(re.search(r"to_apply=" + _NAME, attrs).group(1), runs)
      elif op == "conditional":
        first = re.search(r"(?:false_computation=|branch_computations=\{)" + _NAME, attrs)
        walk(first.group(1), runs)
      elif op not in _FREE and runs:
        target = re.search(r'custom_call_target="([^"]*)"', attrs)
        kind = target.group(1) if target else op
        if op == "fusion":
          kind = re.sub(r"[.\d]+$", "", ins["name"])
        source = re.search(r'op_name="([^"]*)"', attrs)
        kernels.append(
          Kernel(
            name=ins["name"],
            op=op,
            kind=kind,
            runs=runs,
            bytes=array_bytes(ins["type"])
            + sum(array_bytes(types.get(o, "")) for o in ins["operands"]),
            result_bytes=array_bytes(ins["type"]),
            flops=_gemm_flops(ins, types) if kind.startswith("__cublas") else 0.0,
            source=re.sub(r"^jit\([^)]*\)/", "", source.group(1)) if source else "",
            result=re.sub(r"\{[^}]*\}|/\*[^*]*\*/", "", ins["type"]),
          )
        )

  walk(entry, 1)
  return kernels


def is_collective(kernel: Kernel) -> bool:
  """Whether the kernel moves data between devices (all-gather, reduce-scatter, ...)."""
  return kernel.op.startswith(_COLLECTIVES)


def roofline(kernels: list[Kernel], peak_flops: float, bandwidth: float) -> dict:
  """Per call: kernel launches, bytes moved through device memory, library GEMM FLOPs, the
  roofline's seconds (each kernel at max(bytes / bandwidth, FLOPs / peak)) and the same by
  kind. Collectives are left out of the seconds and bytes (their time depends on the links,
  not on device memory) and counted apart: `collective_bytes`, their results, once each."""
  by_kind: dict[str, list] = collections.defaultdict(lambda: [0, 0.0, 0.0])
  local = [k for k in kernels if not is_collective(k)]
  for k in local:
    row = by_kind[k.kind]
    row[0] += k.runs
    row[1] += k.runs * k.bytes
    row[2] += k.runs * max(k.bytes / bandwidth, k.flops / peak_flops)
  moved = [k for k in kernels if is_collective(k) and not k.op.endswith("-done")]
  return dict(
    launches=sum(k.runs for k in kernels),
    bytes=sum(k.runs * k.bytes for k in local),
    gemm_flops=sum(k.runs * k.flops for k in local),
    seconds=sum(row[2] for row in by_kind.values()),
    collectives=sum(k.runs for k in moved),
    collective_bytes=sum(k.runs * k.result_bytes for k in moved),
    by_kind={kind: dict(launches=r[0], bytes=r[1], seconds=r[2]) for kind, r in by_kind.items()},
  )


def heaviest(kernels: list[Kernel], peak_flops: float, bandwidth: float, n: int = 8) -> list[dict]:
  """The n costliest groups of local kernels on the roofline (`roofline`'s pricing), a group
  being one kind, result type and JAX op: [{kind, result, source, launches, bytes, seconds}],
  costliest first. It names what to change: the op, and the shapes it moves."""
  groups: dict[tuple, dict] = {}
  for k in kernels:
    if is_collective(k):
      continue
    g = groups.setdefault(
      (k.kind, k.result, k.source),
      dict(kind=k.kind, result=k.result, source=k.source, launches=0, bytes=0, seconds=0.0),
    )
    g["launches"] += k.runs
    g["bytes"] += k.runs * k.bytes
    g["seconds"] += k.runs * max(k.bytes / bandwidth, k.flops / peak_flops)
  return sorted(groups.values(), key=lambda g: -g["seconds"])[:n]
