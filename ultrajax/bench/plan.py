"""`bench plan`: compile a config's round chunk for N devices without running it.

Lowers the pretraining chunk (K local steps of L lanes, the mesh and sharding rules as
configured) with abstract inputs, so nothing is allocated, and reports per device:
  - the training state the sharding rules leave on each device (server params, the C
    clients' AdamW states, the L lanes' params and moments), counted from shard shapes;
  - XLA's memory analysis of the compiled chunk (arguments, outputs, temporaries, donated
    aliases) and of the compiled round end (params + client optimizer states);
  - the model FLOPs per local step (the matrix products of the traced chunk, every layer once:
    train/perf.py's matmul_flops), and the time per round they imply at a given MFU on named
    accelerators (train/perf.py's bf16 peaks).
Fake CPU devices stand in for the accelerators (`--devices=N`, set before JAX starts), so a
user learns whether a layout fits 16/32/80 GB per device before renting one. XLA's CPU
backend schedules buffers differently from the GPU/TPU backends: temporaries are a guide
(typically an overestimate for fused GPU kernels), the state bytes are exact.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import numpy as np

from ultrajax import pretrain_checks
from ultrajax.bench import hlo
from ultrajax.data import sources as sources_lib
from ultrajax.fed import rounds
from ultrajax.train import checkpoint, mim_programs, perf, sharding

# Accelerators the plan prices a round on: name -> dense bf16 FLOP/s (train/perf.py).
ACCELERATORS = ("H100", "H200", "A100", "TPU v4", "TPU v5e", "TPU v5p")
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class GpuTarget:
  """What XLA:GPU needs to compile for a GPU it cannot see (its GpuTargetConfig), from the
  vendors' datasheets, and the memory bandwidth `hlo.roofline` prices bytes at."""

  name: str  # as the device reports its kind
  compute_capability: tuple[int, int]
  sms: int
  memory_bytes: int
  bandwidth: float  # bytes/s
  clock_ghz: float
  shared_memory_per_sm: int
  l2_bytes: int

  def target_config(self) -> str:
    """The GpuTargetConfig text proto; cuDNN 9.12 and CUDA 13.0, as JAX's CUDA 13 plugin."""
    major, minor = self.compute_capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_memory_per_sm} threads_per_core_limit: 2048
  core_count: {self.sms} fpus_per_core: {64 if major == 8 else 128}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(self.bandwidth)} l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: {self.clock_ghz} device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: {self.shared_memory_per_sm - 1024}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 12 }}
runtime_version {{ major: 13 minor: 0 }}
device_description_str: "{self.name}"
"""


# `bench plan --target=NAME`: SXM parts.
GPU_TARGETS = {
  "H100": GpuTarget(
    "NVIDIA H100 80GB HBM3", (9, 0), 132, 80 * GIB, 3.35e12, 1.98, 233472, 50 * 2**20
  ),
  "H200": GpuTarget("NVIDIA H200", (9, 0), 132, 141 * 10**9, 4.8e12, 1.98, 233472, 50 * 2**20),
  "A100": GpuTarget(
    "NVIDIA A100-SXM4-80GB", (8, 0), 108, 80 * GIB, 2.039e12, 1.41, 167936, 40 * 2**20
  ),
}


def gpu_target(device) -> GpuTarget | None:
  """The GPU_TARGETS entry `device` is (by its kind), None for any other device."""
  return next((t for t in GPU_TARGETS.values() if t.name == device.device_kind), None)


def target_devices(target: str, count: int) -> list:
  """`count` compile-only devices of the GPU `target` (GPU_TARGETS), 8 per host: XLA:GPU
  compiles for them on a host without a GPU, through JAX's CUDA plugin. GEMMs go to cuBLAS
  without autotuning: XLA's Triton GEMMs need a device to pick tile sizes (the caller sets
  --xla_gpu_enable_triton_gemm=false before JAX starts)."""
  if target not in GPU_TARGETS:
    raise ValueError(f"--target={target!r}: one of {', '.join(GPU_TARGETS)}")
  per_host = min(count, 8)
  if count < 1 or count % per_host:
    raise ValueError(f"--devices={count}: 1 to 8, or a multiple of 8 (8 GPUs per host)")
  from jax.experimental import topologies

  try:
    topology = topologies.get_topology_desc(
      platform="cuda",
      target_config=GPU_TARGETS[target].target_config(),
      topology=f"1x{count // per_host}x{per_host}",
    )
  except Exception as e:  # the plugin is missing, or too old for compile-only topologies
    raise RuntimeError(
      f"--target={target} compiles for a GPU without one, through JAX's CUDA plugin: "
      f"pip install 'jax-cuda13-plugin[with-cuda]=={jax.__version__}' (no GPU needed). "
      f"JAX said: {e}"
    ) from None
  return list(topology.devices)


def device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded (abstract) arrays: its shard shapes."""

  def one(x):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return math.prod(shape) * np.dtype(x.dtype).itemsize

  return int(sum(one(x) for x in jax.tree.leaves(tree)))


def pretrain_meshes(config, clients: int):
  """(centralized mesh, federated mesh) for `bench pretrain`: the config's mesh for the
  federated mode; centralized training is one client, which the job refuses on a clients axis
  wider than 1, so it runs on the same devices with all of them on the data axis."""
  mesh = sharding.make_mesh(config.mesh.clients, config.mesh.data)
  pretrain_checks.check_layout(config, mesh, clients, f"--clients={clients} clients")
  return sharding.make_mesh(1, mesh.size, devices=mesh.devices.flatten()), mesh


def table1_steps(config) -> np.ndarray:
  """[C] local steps per round of the config's phantom clients shaped as UltraFedFM's Table 1
  (the first data.num_clients, SMAT partners doubling them at smat_ratio 1): the paper's
  packing of unequal clients. Other sources are only known once read: the plan uses these."""
  counts = np.array([n for *_, n in sources_lib.DEFAULT_CLIENTS[: config.data.num_clients]])
  u = config.ultramim
  counts = counts + (np.round(counts * u.smat_ratio).astype(int) if u.smat else 0)
  return np.maximum(counts // config.data.batch_size, 1) * config.fed.local_epochs


@dataclasses.dataclass
class Plan:
  """Per-device figures of one compiled layout (bytes, FLOPs per device)."""

  mesh: dict
  num_clients: int
  num_lanes: int
  chunk_steps: int
  num_chunks: int
  batch: int
  param_count: int
  server_bytes: int  # server params held by the device
  client_opt_bytes: int  # the C clients' optimizer states held by the device
  clients_held: float  # client optimizer states per device, in whole-client equivalents
  lane_bytes: int  # the L lanes' params + optimizer states
  batch_bytes: int  # one chunk of images
  xla: dict  # the chunk's memory analysis: argument, output, alias, temp bytes
  xla_state: dict  # of the clients' optimizer init: its output is their AdamW states
  flops_by_dtype: dict  # model FLOPs per device per chunk call, by the products' operand dtype
  compile_s: float
  device_kind: str = ""
  roofline: dict | None = None  # hlo.roofline of the chunk, per chunk call (GPU targets only)
  roofline_mfu: float | None = None  # the MFU if every kernel ran at its roofline

  @property
  def chunk_flops(self) -> float:
    """Model FLOPs per device per chunk call."""
    return sum(self.flops_by_dtype.values())

  @property
  def peak_bytes(self) -> int:
    """Live at once while the chunk runs: inputs, outputs not aliased to donated inputs, temps."""
    x = self.xla
    return x["argument"] + x["output"] - x["alias"] + x["temp"]

  def round_seconds(self, accelerator: str, mfu: float) -> float | None:
    if not self.chunk_flops:
      return None
    return self.chunk_flops * self.num_chunks / (mfu * perf.PEAK_BF16_FLOPS[accelerator])


def _memory(compiled) -> dict:
  m = compiled.memory_analysis() if compiled else None
  if m is None:
    return dict(argument=0, output=0, alias=0, temp=0)
  return dict(
    argument=int(m.argument_size_in_bytes),
    output=int(m.output_size_in_bytes),
    alias=int(m.alias_size_in_bytes),
    temp=int(m.temp_size_in_bytes),
  )


def plan(config, steps_per_client=None, compile_chunk: bool = True, devices=None) -> Plan:
  """Compiles the config's round chunk and round end for `devices` (default: JAX's; or
  `target_devices`) without data or allocation. steps_per_client: [C] local steps per round;
  default table1_steps(config). compile_chunk=False: traced, not compiled: the state and model
  FLOPs only (XLA's memory analysis of the chunk is zero)."""
  pretrain_checks.validate(config)
  config = config.copy_and_resolve_references()
  mesh = sharding.make_mesh(config.mesh.clients, config.mesh.data, devices=devices)
  steps = np.asarray(table1_steps(config) if steps_per_client is None else steps_per_client)
  num_clients, batch = len(steps), config.data.batch_size
  # The job's checks and chunking, before any compile.
  pretrain_checks.check_layout(config, mesh, num_clients, f"{num_clients} clients")
  num_lanes = config.fed.lanes or rounds.auto_lanes(steps, mesh.shape["clients"])
  round_plan, k = rounds.plan_chunked(steps, num_lanes, config.fed.chunk_steps)
  num_chunks = round_plan.client_ids.shape[1] // k
  with jax.set_mesh(mesh):
    programs = mim_programs.Programs(config, mesh, num_clients, num_lanes)
    server = checkpoint.abstract_like(programs.abstract_params, programs.server_sharding)
    client_opt = checkpoint.abstract_like(programs.abstract_opt, programs.opt_sharding)
    # The lane state as the job's round start lays it out (shapes and shardings, no data).
    state = checkpoint.abstract_like(
      jax.eval_shape(programs.start_round, server, client_opt), programs.state_sharding
    )
    s = config.model.image_size
    images = jax.ShapeDtypeStruct(
      (num_lanes, k, batch, s, s, 3), np.uint8, sharding=programs.batch_sharding
    )
    vector = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=programs.vector)
    scalar = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=programs.replicated)
    args = (
      server,
      state,
      images,
      rounds.RoundPlan(*map(vector, round_plan.chunk(0, k))),
      scalar((num_clients,), np.float32),
      scalar((num_clients,), np.float32),
      scalar((), np.int32),
      jax.eval_shape(lambda: jax.random.key(0)),
    )
    t0 = time.perf_counter()
    traced, flops_by_dtype = programs.trace_chunk(*args)
    compiled = traced.lower().compile() if compile_chunk else None
    compile_s = time.perf_counter() - t0
    device = mesh.devices.flat[0]
    roofline = roofline_mfu = None
    if compiled is not None and gpu_target(device):
      roofline = gpu_roofline(compiled, device)
      if roofline["seconds"]:
        roofline_mfu = perf.mfu(sum(flops_by_dtype.values()) / roofline["seconds"], device)
    # XLA's own count of the clients' AdamW states: the output of their init.
    opt_init = programs.init_opt.lower(server).compile()
  client_opt_bytes = device_bytes(client_opt)
  param_count = sum(math.prod(x.shape) for x in jax.tree.leaves(programs.abstract_params))
  moments_per_client = 2 * 4 * param_count  # AdamW's mu and nu, float32
  return Plan(
    mesh=dict(mesh.shape),
    num_clients=num_clients,
    num_lanes=num_lanes,
    chunk_steps=k,
    num_chunks=num_chunks,
    batch=batch,
    param_count=param_count,
    server_bytes=device_bytes(server),
    client_opt_bytes=client_opt_bytes,
    clients_held=client_opt_bytes / moments_per_client,
    lane_bytes=device_bytes((state.params, state.opt_state)),
    batch_bytes=device_bytes(images),
    xla=_memory(compiled),
    xla_state=_memory(opt_init),
    flops_by_dtype=flops_by_dtype,
    compile_s=compile_s,
    device_kind=device.device_kind,
    roofline=roofline,
    roofline_mfu=roofline_mfu,
  )


def fit_hints(p: Plan, config, device_bytes: float = 16e9) -> list[str]:
  """What to change when the peak exceeds `device_bytes` (docs/benchmarks.md, stop 43: on XLA,
  remat lowers the temporaries only with scan_layers; `fsdp` rules split the state)."""
  if p.peak_bytes <= device_bytes:
    return []
  hints = []
  if any(kind == "replicated" for _, kind in config.sharding_rules):
    hints.append(
      "every device holds a whole copy of what the 'replicated' rules match: "
      "--config.sharding_rules=\"(('.*', 'fsdp'),)\" splits it over the data axis"
    )
  m = config.model
  if not (m.get("scan_layers", False) and m.get("remat", "none") not in ("none", False)):
    hints.append(
      f"temporaries are {p.xla['temp'] / GIB:.2f} GiB: --config.model.scan_layers=True with "
      "--config.model.remat=dots (or full) keeps one block's activations at a time "
      "(L/16 on 8 devices: 17.1 -> 13.7 or 11.3 GiB)"
    )
  hints.append("more devices (--devices=N here, a larger mesh there) split the state and batch")
  return hints


def roofline_lines(p: Plan) -> list[str]:
  """The compiled chunk's kernels per local step, priced by `hlo.roofline`."""
  r, k = p.roofline, p.chunk_steps
  ms = lambda seconds: f"{1e3 * seconds / k:.1f} ms"  # noqa: E731
  kinds = sorted(r["by_kind"].items(), key=lambda kv: -kv[1]["seconds"])
  lines = [
    f"XLA:GPU program for {p.device_kind} (GEMMs by cuBLAS, not autotuned), per local step: "
    f"{r['launches'] / k:.0f} kernels, {r['bytes'] / k / 1e9:.1f} GB moved, "
    f"{r['gemm_flops'] / k / 1e12:.2f} TFLOP in library GEMMs; roofline {ms(r['seconds'])}",
    f"  collectives between devices (not priced): {r['collectives'] / k:.0f}, "
    f"{r['collective_bytes'] / k / 1e9:.2f} GB of results",
    "  busiest kinds: "
    + ", ".join(f"{kind} {ms(v['seconds'])} ({v['launches'] / k:.0f}x)" for kind, v in kinds[:6]),
  ]
  if p.roofline_mfu:
    lines.append(
      f"  MFU at most {100 * p.roofline_mfu:.0f}% with every kernel at its roofline "
      "(no launch costs)"
    )
  return lines + heaviest_lines(r.get("heaviest", []), k, "step")


def heaviest_lines(groups: list[dict], per: int, unit: str) -> list[str]:
  """`hlo.heaviest`'s groups as text, their roofline and launches divided by `per` (calls of
  the `unit` in one compiled call)."""
  lines = [
    f"  heaviest kernels besides cuBLAS's (kind, result, JAX op): roofline and launches per {unit}"
  ]
  for g in groups:
    source = g["source"] if len(g["source"]) <= 60 else "..." + g["source"][-57:]
    lines.append(
      f"    {1e3 * g['seconds'] / per:6.2f} ms {g['launches'] / per:6.0f}x  {g['kind'][:28]:<28} "
      f"{g['result'][:44]:<44} {source}"
    )
  return lines


def gpu_roofline(compiled, device) -> dict:
  """`hlo.roofline` of a program compiled for `device`, a GPU_TARGETS kind, at its peak and
  bandwidth, with 'heaviest': `hlo.heaviest` of the kernels besides cuBLAS's (the GEMMs are
  priced at the peak already; what else the program spends is what to cut)."""
  target = gpu_target(device)
  peak = perf.peak_bf16_flops(device)
  kernels = hlo.census(compiled.as_text())
  r = hlo.roofline(kernels, peak, target.bandwidth)
  others = [k for k in kernels if not k.kind.startswith("__cublas")]
  r["heaviest"] = hlo.heaviest(others, peak, target.bandwidth)
  return r


def report(p: Plan, config, mfu: float = 0.5) -> str:
  """The plan as text: state and XLA memory per device, FLOPs, time per round."""
  g = lambda b: f"{b / GIB:8.2f} GiB"
  m = config.model
  lines = [
    f"# plan: {m.variant or f'{m.width}x{m.depth}/{m.patch_size}'} at {m.image_size}px, "
    f"{p.num_clients} clients on {p.num_lanes} lanes, batch {p.batch} per client, chunk of "
    f"{p.chunk_steps} steps x {p.num_chunks} per round, mesh {p.mesh}, "
    f"sharding_rules {tuple(tuple(r) for r in config.sharding_rules)}",
    f"parameters {p.param_count / 1e6:.1f} M; per device:",
    f"  server params                  {g(p.server_bytes)}",
    f"  client AdamW states            {g(p.client_opt_bytes)}  "
    f"({p.clients_held:.2f} clients' moments)",
    f"  lane params + AdamW states     {g(p.lane_bytes)}",
    f"  one chunk of images (uint8)    {g(p.batch_bytes)}",
    f"XLA memory analysis of the chunk: arguments {g(p.xla['argument'])}, outputs "
    f"{g(p.xla['output'])}, donated aliases {g(p.xla['alias'])}, temporaries "
    f"{g(p.xla['temp'])}",
    f"  peak while the chunk runs      {g(p.peak_bytes)}  "
    f"(fits 16 GB: {'yes' if p.peak_bytes <= 16e9 else 'no'}, 32 GB: "
    f"{'yes' if p.peak_bytes <= 32e9 else 'no'}, 80 GB: {'yes' if p.peak_bytes <= 80e9 else 'no'})",
    f"  client AdamW states (XLA: output of their init) {g(p.xla_state['output'])}",
    f"compile {p.compile_s:.1f} s for {p.device_kind}",
  ]
  if p.roofline:
    lines += roofline_lines(p)
  lines += [f"to fit 16 GB: {hint}" for hint in fit_hints(p, config)]
  if p.chunk_flops:
    lines.append(
      f"model FLOPs per device (matrix products): {p.chunk_flops / p.chunk_steps / 1e12:.3f} "
      f"TFLOP per local step (all {p.num_lanes} lanes), "
      f"{p.chunk_flops * p.num_chunks / 1e15:.2f} PFLOP per round"
      + f"; by operand dtype: {perf.dtype_shares(p.flops_by_dtype)}"
    )
    lines.append(
      f"time per round at {100 * mfu:.0f}% MFU: "
      + ", ".join(f"{a} {p.round_seconds(a, mfu):.1f} s" for a in ACCELERATORS)
    )
  return "\n".join(lines)
