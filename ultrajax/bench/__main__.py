r"""Benchmarks: `python -m ultrajax.bench <name> [--config=...] [--steps=N]`.

  pretrain  MAE/UltraMIM training step, centralized vs federated (C vmapped clients) at the
            same total batch: img/s, ms per step, ms per round (aggregation + broadcast
            included), TFLOP/s per device (the model's matrix products, every layer once:
            train/perf.py's matmul_flops) and MFU.
            Default config: configs/pretrain_fed.py (ViT-B/16 at 224); on a CPU try
            --config=configs/pretrain_fed.py:cpu. Also times a PyTorch MAE peer
            (ultrajax/bench/torch_mae.py: timm blocks as facebookresearch/mae builds them, the
            step as its engine_pretrain.py takes it: per-step lr, loss checked finite,
            gradient norm, AdamW) at the centralized shapes in the same run, in a process of
            its own, and prints ultrajax / PyTorch img/s (--torch_peer=false skips it; without
            torch it is skipped with a message). --rounds=R (default 3) alternates the timings:
            each round times --steps chunk calls of every mode, then as many peer steps; the
            figures are medians over rounds and each ratio is taken within a round (the
            machine's speed drifts), its range printed. For plain MAE set
            --config.ultramim.tgm_mode=random --config.ultramim.mic=False.
            --profile_dir=DIR then traces --steps chunk calls of each mode (jax.profiler,
            DIR/<mode>, a perfetto trace for ui.perfetto.dev) and prints the XLA ops that took
            the most time, device busy time against wall time first (train/perf.py).

  urfm      URFM feature-target step (centralized): pixel targets vs teacher targets computed
            in the step vs cached targets read with the batch, and the one-off cost of
            building the cache (teacher forward only). Takes configs/pretrain_urfm.py with
            the --config's preset when --config is not a teacher-target config, e.g.
            --config=configs/pretrain_urfm.py:cpu.

  plan      compile the config's round chunk for --devices=N fake CPU devices (mesh and
            sharding rules as configured) without running it: per-device state and XLA
            memory (arguments, outputs, temporaries), FLOPs per step, and the time per round
            at --mfu on H100/H200/A100/TPU v4/v5e/v5p (ultrajax/bench/plan.py), e.g.
            --config=configs/pretrain_fed.py --devices=32. --target=H100|H200|A100 compiles
            for that many of those GPUs instead, on this host without one (JAX's CUDA plugin,
            `pip install 'jax-cuda13-plugin[with-cuda]'`): XLA:GPU's own memory analysis, and
            the kernels of a local step priced at the GPU's bandwidth and peak (bench/hlo.py).

  pipeline  host input pipeline img/s and img/s per core at 224 px, at 0 (threads), 1, 2, 4 ...
            worker processes (--pipeline_workers=0,1,2): ultrajax on a temporary JPEG folder
            (phantom images) next to the official MAE pipeline (torchvision ImageFolder +
            RandomResizedCrop + flip in a DataLoader with as many workers), and ultrajax on
            the phantom (ultrajax/bench/pipeline.py). Needs no config.

  sam       SAM image encoder img/s and decoder ms per prompt batch, ultrajax next to
            segment_anything (PyTorch) with the same weights in the same run; flags
            --sam_variant, --sam_image_size, --sam_batch, --sam_prompts, --sam_dtype
            (ultrajax/bench/sam.py). On a CPU try --sam_image_size=256. --target=H200 (or
            H100, A100) compiles both for one such GPU instead, on this host without one, and
            prints their kernels priced by a roofline, as `plan --target` does.
            --profile_dir=DIR traces --steps encoder calls into DIR/sam and prints where their
            time went, as `pretrain` does.

The XLA flags are the jobs' (ultrajax/train/compiler.py: 512-bit vectors on an AVX-512 CPU);
the persistent compilation cache stays off, so `compile s` is the compile time.
Data comes from device-resident random images so that the figures measure the compiled
program; the Grain pipeline is measured by the job's own img/s log line. Record results with
the machine and the exact command in docs/benchmarks.md.
"""

from __future__ import annotations

import os
import pathlib
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ultrajax import configlib, pretrain_checks
from ultrajax.bench import pipeline as pipeline_bench, plan as plan_bench, sam as sam_bench
from ultrajax.data import sources as sources_lib
from ultrajax.fed import rounds
from ultrajax.models import vit
from ultrajax.train import compiler, loop, mim_objectives, mim_programs, perf, sharding

_DEFAULT_CONFIG = str(configlib.find_config_file("configs/pretrain_fed.py").resolve())
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Pretraining config.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed chunk calls per mode (after one warm-up).")
_CLIENTS = flags.DEFINE_integer("clients", 0, "Federated clients (0: config.data.num_clients).")
_DEVICES = flags.DEFINE_integer("devices", 0, "bench plan: fake CPU devices (0: the real ones).")
_MFU = flags.DEFINE_float("mfu", 0.5, "bench plan: MFU that prices a round on each accelerator.")
_TARGET = flags.DEFINE_string(
  "target",
  "",
  "bench plan: compile for --devices of this GPU (H100, H200, A100) without one, through "
  "JAX's CUDA plugin; '' = fake CPU devices (--devices) or the real ones. bench sam: compile "
  "the encoder and decoder for one such GPU instead of timing them.",
)
_WORKERS = flags.DEFINE_string(
  "pipeline_workers",
  "",
  "bench pipeline: worker counts, e.g. '0,1,2' ('': 0, 1, 2, 4, ... up to the cores).",
)
_PIPELINE_BATCHES = flags.DEFINE_integer("pipeline_batches", 8, "bench pipeline: timed batches.")
_TORCH_PEER = flags.DEFINE_boolean("torch_peer", True, "bench pretrain: also time the PyTorch MAE.")
_ROUNDS = flags.DEFINE_integer(
  "rounds",
  3,
  "bench pretrain: timing rounds, each --steps chunk calls of every mode and then as many "
  "steps of the PyTorch peer; medians are printed, and the ratio's range over rounds.",
)
_MODES = flags.DEFINE_list(
  "pretrain_modes", ["central", "federated"], "bench pretrain: which of central, federated to run."
)
_PROFILE_DIR = flags.DEFINE_string(
  "profile_dir",
  "",
  "bench pretrain: after the figures, trace --steps chunk calls of each mode with "
  "jax.profiler into DIR/<mode> and print where the time went (train/perf.py's trace_summary). "
  "bench sam: trace --steps encoder calls into DIR/sam the same way.",
)


def _programs(config, mesh, num_clients: int, **kwargs):
  """(programs, params, client optimizer states) of the job's round for `num_clients` clients
  on as many lanes; kwargs: Programs' teacher and cached."""
  programs = mim_programs.Programs(config, mesh, num_clients, num_clients, **kwargs)
  params = programs.init_params(jax.random.key(0))
  return programs, params, programs.init_opt(params)


def _chunk_args(programs, num_clients: int, k: int, client_weights) -> tuple:
  """The chunk's arguments after the batch. Every client runs 1000 steps per round; the timed
  chunks sit in its middle."""
  plan = rounds.plan_round(np.full(num_clients, 1000), num_clients, k).chunk(3, k)
  put = loop.put_global
  return (
    rounds.RoundPlan(*(put(a, programs.vector) for a in plan)),
    put(np.full((num_clients,), 1000.0, np.float32), programs.replicated),
    put(client_weights, programs.replicated),
    put(np.int32(5), programs.replicated),
    jax.random.key(2),
  )


def _timed_chunks(programs, params, state, data, args, steps: int):
  """(state, wall s, process CPU s) per chunk call, over `steps` calls."""
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(steps):
    state, losses, _ = programs.run_chunk(params, state, data, *args)
  jax.block_until_ready(losses)
  return state, (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def _prepare_mode(config, mesh, num_clients: int, batch: int, steps: int):
  """(figures, timed) for one compiled chunk of K local steps of `num_clients` equal clients on
  as many lanes: figures has the compile time, the round's end + start (ms_aggregate), the
  chunk's FLOPs and chunk_hlo() (its compiled HLO, for profiles); timed() runs `steps` more
  chunk calls and returns (wall s, CPU s) per call."""
  config = config.copy_and_resolve_references()
  config.data.batch_size = batch
  k, s = config.fed.chunk_steps, config.model.image_size
  programs, params, opt_state = _programs(config, mesh, num_clients)
  images = jax.jit(
    lambda key: jax.random.randint(key, (num_clients, k, batch, s, s, 3), 0, 256).astype(np.uint8),
    out_shardings=programs.batch_sharding,
  )(jax.random.key(1))
  weights = programs.strategy.client_weights(np.ones(num_clients))
  args = _chunk_args(programs, num_clients, k, weights)

  t0 = time.perf_counter()
  state = programs.start_round(params, opt_state)
  state, losses, _ = programs.run_chunk(params, state, images, *args)
  jax.block_until_ready(losses)
  compile_s = time.perf_counter() - t0
  for timed in (False, True):  # the first pass compiles the round's end and start
    t0 = time.perf_counter()
    for _ in range(steps if timed else 1):
      params, opt_state, _ = programs.finish_round(state, params)
      state = programs.start_round(params, opt_state)
    jax.block_until_ready(state)
  sync_s = (time.perf_counter() - t0) / steps
  held = dict(state=state)

  def timed():
    held["state"], chunk_s, cpu_s = _timed_chunks(
      programs, params, held["state"], images, args, steps
    )
    return chunk_s, cpu_s

  figures = dict(
    clients=num_clients,
    batch=batch,
    steps_per_chunk=k,
    images_per_chunk=num_clients * batch * k,
    ms_aggregate=1e3 * sync_s,
    compile_s=compile_s,
    flops=programs.chunk_flops,
    flops_by_dtype=programs.chunk_flops_by_dtype,
    chunk_hlo=programs.chunk_hlo,
  )
  return figures, timed


def _speed(figures: dict, chunk_s: float, cpu_s: float) -> dict:
  """img/s, ms/step, CPU ms/img, TFLOP/s and MFU of one timed chunk call."""
  k = figures["steps_per_chunk"]
  tflops = figures["flops"] / chunk_s / 1e12 if figures["flops"] else None
  return dict(
    img_per_s=figures["images_per_chunk"] / chunk_s,
    ms_per_step=1e3 * chunk_s / k,
    cpu_ms_per_img=1e3 * cpu_s / figures["images_per_chunk"],
    tflops=tflops,
    mfu=perf.mfu(tflops * 1e12) if tflops else None,
  )


def _paper_packing() -> None:
  """How well the paper's 16 unequal clients (Table 1, SMAT doubles them) fill the lanes."""
  counts = np.array([n for *_, n in sources_lib.DEFAULT_CLIENTS]) * 2
  steps = counts // 64
  all_parallel = steps.sum() / (len(steps) * steps.max())
  lanes = rounds.auto_lanes(steps)
  plan = rounds.plan_round(steps, lanes, 32)
  print(
    f"Table-1 clients at batch 64: {steps.sum()} client steps per round, the largest "
    f"client {steps.max()}. All 16 in parallel: {100 * all_parallel:.0f}% of lane steps "
    f"busy; packed on {lanes} lanes: {100 * (plan.client_ids >= 0).mean():.0f}% busy, "
    f"{plan.client_ids.shape[1]} steps per round."
  )


def _torch_peer(config, batch: int, total_steps: int):
  """The PyTorch MAE's training step at the config's shapes in a process of its own
  (torch_mae.PeerProcess, after its warm-up), or None (message) without torch."""
  try:
    from ultrajax.bench import torch_mae
  except ImportError as e:
    print(f"PyTorch peer skipped: {e} (install the torch extra: pip install '.[torch]')")
    return None
  m = config.model
  width, depth, heads, patch = vit.model_dims(m)
  kwargs = dict(
    image_size=m.image_size,
    patch_size=patch,
    width=width,
    depth=depth,
    num_heads=heads,
    decoder_width=m.decoder_width,
    decoder_depth=m.decoder_depth,
    decoder_heads=m.decoder_heads,
    mask_ratio=m.mask_ratio,
    norm_pix_loss=m.norm_pix_loss,
  )
  return torch_mae.PeerProcess(
    kwargs,
    batch=batch,
    total_steps=total_steps,
    bfloat16=m.dtype == "bfloat16",
    lr=config.optim.base_lr,
    weight_decay=config.optim.weight_decay,
  )


def bench_pretrain(config, steps: int, clients: int) -> None:
  pretrain_checks.validate(config)
  clients = clients or config.data.num_clients
  central_mesh, mesh = plan_bench.pretrain_meshes(config, clients)
  batch, k, n_rounds = config.data.batch_size, config.fed.chunk_steps, _ROUNDS.value
  dev, host = jax.devices()[0], perf.host_description()
  print(
    f"# pretrain benchmark: {config.model.variant or 'custom'} at {config.model.image_size}px, "
    f"dtype {config.model.dtype}, chunk of {k} steps, {mesh.size} x {dev.device_kind} "
    f"({host}), mesh central {dict(central_mesh.shape)}, federated "
    f"{dict(mesh.shape)}"
  )
  bad = sorted(set(_MODES.value) - {"central", "federated"})
  if bad or not _MODES.value or n_rounds < 1:
    raise app.UsageError(
      f"--pretrain_modes={_MODES.value} must name central and/or federated, --rounds >= 1"
    )
  # The peer first (its process warms up before XLA compiles), so that each round below times
  # every mode and then the peer, close together in time.
  peer = _torch_peer(config, clients * batch, n_rounds * steps * k) if _TORCH_PEER.value else None
  prepared = {}
  modes = (("central", central_mesh, 1, clients * batch), ("federated", mesh, clients, batch))
  for name, m, c, b in modes:
    if name in _MODES.value:
      with jax.set_mesh(m):
        prepared[name] = (m, *_prepare_mode(config, m, c, b, steps))
  timings = {name: [] for name in prepared}
  peer_timings = []
  for _ in range(n_rounds):
    for name, (m, _, timed) in prepared.items():
      with jax.set_mesh(m):
        timings[name].append(timed())
    if peer:  # as many steps as one mode's timed chunk calls ran
      peer_timings.append(peer.time(steps * k))
  if peer:
    peer.close()

  print(
    f"{'mode':<12}{'clients':>8}{'batch':>7}{'img/s':>10}{'ms/step':>10}{'ms/round+':>10}"
    f"{'TFLOP/s/dev':>13}{'MFU':>7}{'compile s':>11}{'CPU ms/img':>12}"
  )
  results = {}
  for name, (_, figures, _) in prepared.items():
    wall, cpu = np.median(np.array(timings[name]), axis=0)
    r = results[name] = _speed(figures, wall, cpu)
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
    tflops = f"{r['tflops']:.2f}" if r["tflops"] else "-"
    print(
      f"{name:<12}{figures['clients']:>8}{figures['batch']:>7}{r['img_per_s']:>10.1f}"
      f"{r['ms_per_step']:>10.1f}{figures['ms_aggregate']:>10.1f}{tflops:>13}{mfu:>7}"
      f"{figures['compile_s']:>11.1f}{r['cpu_ms_per_img']:>12.2f}"
    )
  print(
    "ms/round+: aggregation and round start, paid once per round on top of the local steps. "
    "CPU ms/img: this process's CPU time (all threads) per image while timed, which other "
    f"jobs on the machine do not inflate as they do wall time. Medians of {n_rounds} "
    "round(s) of --steps chunk calls."
  )
  print(
    "model FLOPs by the matrix products' operand dtype (only bfloat16 runs at the peak MFU "
    "divides by): "
    + "; ".join(
      f"{name} {perf.dtype_shares(f['flops_by_dtype'])}" for name, (_, f, _) in prepared.items()
    )
  )
  if peer_timings:
    first = peer_timings[0]
    img_s = np.median([t["img_per_s"] for t in peer_timings])
    cpu_ms = np.median([t["cpu_ms_per_img"] for t in peer_timings])
    print(
      f"{'pytorch MAE':<12}{1:>8}{clients * batch:>7}{img_s:>10.1f}"
      f"{1e3 * clients * batch / img_s:>10.1f}   ({first['device']}, {first['threads']} "
      f"threads, MAE recipe step; {cpu_ms:.2f} CPU ms/img)"
    )
    if first["device"] == "cpu" and "AMD" in host and config.model.dtype == "float32":
      print(
        "On AMD CPUs PyTorch's MKL (its float32 GEMMs) takes its generic (non-Intel) path, "
        "about half as fast at MAE-B's shapes; docs/benchmarks.md (2026-12-02, AMD EPYC) shows "
        "how the peer was also timed on MKL's AVX-512 path."
      )
    for name, (_, figures, _) in prepared.items():
      per_round = [  # ratios within each round: the machine's drift cancels
        (_speed(figures, w, c), t) for (w, c), t in zip(timings[name], peer_timings)
      ]
      img = [r["img_per_s"] / t["img_per_s"] for r, t in per_round]
      cpu = [t["cpu_ms_per_img"] / r["cpu_ms_per_img"] for r, t in per_round]
      spread = (
        f" (median of {n_rounds} rounds; img/s {min(img):.2f}-{max(img):.2f}, "
        f"CPU {min(cpu):.2f}-{max(cpu):.2f})"
        if n_rounds > 1
        else ""
      )
      print(
        f"ratio ultrajax {name} / pytorch: {np.median(img):.2f} in img/s, "
        f"{np.median(cpu):.2f} in CPU time per image{spread}"
      )
  if _PROFILE_DIR.value:
    for name, (m, figures, timed) in prepared.items():
      with jax.set_mesh(m):
        _profile_mode(name, figures, timed, pathlib.Path(_PROFILE_DIR.value) / name)
  _paper_packing()


def _profile_mode(name: str, figures: dict, timed, trace_dir: pathlib.Path, rows: int = 15):
  """Traces one timed() of a prepared mode and prints trace_summary's rows, each line starting
  'profile <name>'; a failure is printed, not raised (the figures above are already out)."""
  try:
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
      chunk_s, _ = timed()
    wall_s, what = chunk_s * _STEPS.value, f"{_STEPS.value} chunk call(s)"
    trace, lines = perf.profile_report(trace_dir, figures["chunk_hlo"](), wall_s, what, rows)
  except Exception as e:  # noqa: BLE001 (a profiler or trace-format problem ends the profile only)
    print(f"profile {name}: failed, {type(e).__name__}: {e}")
    return
  print(f"profile {name}: {lines[0]}; trace {trace}")
  for line in lines[1:]:
    print(f"profile {name} {line}")


def _time_urfm(config, mesh, mode: str, steps: int) -> dict:
  """One compiled chunk of K centralized steps; mode 'pixels' | 'in_step' | 'cached'."""
  config = config.copy_and_resolve_references()
  if mode == "pixels":
    config.target, config.model.pred_dim = "pixels", 0
  cached = mode == "cached"
  teacher = mim_objectives.build_teacher(config, jax.random.key(0)) if mode != "pixels" else None
  k, batch, s = config.fed.chunk_steps, config.data.batch_size, config.model.image_size
  programs, params, opt_state = _programs(config, mesh, 1, teacher=teacher, cached=cached)
  make_images = lambda key: jax.random.randint(key, (1, k, batch, s, s, 3), 0, 256).astype(np.uint8)
  if cached:
    grid = s // mim_objectives.patch_size_of(config.model)
    shape = (1, k, batch, grid * grid, config.model.pred_dim)
    data = jax.jit(
      lambda key: dict(
        images=make_images(key),
        teacher=jax.random.normal(key, shape).astype(config.teacher.cache_dtype),
      ),
      out_shardings=programs.batch_sharding,
    )(jax.random.key(1))
  else:
    data = jax.jit(make_images, out_shardings=programs.batch_sharding)(jax.random.key(1))
  args = _chunk_args(programs, 1, k, np.ones(1, np.float32))
  state = programs.start_round(params, opt_state)
  state, losses, _ = programs.run_chunk(params, state, data, *args)
  jax.block_until_ready(losses)
  state, chunk_s, _ = _timed_chunks(programs, params, state, data, args, steps)
  out = dict(img_per_s=batch * k / chunk_s, ms_per_step=1e3 * chunk_s / k)
  if mode == "in_step":  # the cache's one-off cost: the teacher forward alone
    targets = jax.jit(
      lambda p, x: mim_objectives.teacher_targets(
        teacher[0], p, x.astype(np.float32) / 255.0, config
      )
    )
    frozen, images = programs.frozen, data[0, 0]
    jax.block_until_ready(targets(frozen, images))
    t0 = time.perf_counter()
    for _ in range(steps):
      y = targets(frozen, images)
    jax.block_until_ready(y)
    out["teacher_img_per_s"] = batch * steps / (time.perf_counter() - t0)
  return out


def bench_urfm(config, steps: int, clients: int) -> None:
  del clients  # centralized
  if config.get("target", "pixels") != "teacher":
    urfm = configlib.load_config_module(pathlib.Path(_DEFAULT_CONFIG).with_name("pretrain_urfm.py"))
    config = urfm.get_config(config.preset)
  pretrain_checks.validate(config)
  mesh = sharding.make_mesh(config.mesh.clients, config.mesh.data)
  dev = jax.devices()[0]
  t = config.teacher
  print(
    f"# urfm benchmark: student {config.model.variant or 'custom'} at "
    f"{config.model.image_size}px, teacher {t.variant or f'{t.width}x{t.depth}/{t.patch_size}'}"
    f" at {t.image_size}px, dtype {config.model.dtype}, batch {config.data.batch_size}, "
    f"{jax.device_count()} x {dev.device_kind}"
  )
  print(f"{'targets':<22}{'img/s':>10}{'ms/step':>10}")
  with jax.set_mesh(mesh):
    results = {m: _time_urfm(config, mesh, m, steps) for m in ("pixels", "in_step", "cached")}
  names = dict(pixels="pixels", in_step="teacher, in the step", cached="teacher, cached")
  for mode, r in results.items():
    print(f"{names[mode]:<22}{r['img_per_s']:>10.1f}{r['ms_per_step']:>10.1f}")
  print(
    f"Building the cache (teacher forward only): "
    f"{results['in_step']['teacher_img_per_s']:.1f} img/s, once per fixed view."
  )


def _target_devices(count: int) -> list:
  """--target's compile-only GPUs, `count` of them; call before anything starts JAX's backends
  (the flags and the config file do not)."""
  jax.config.update("jax_platforms", "cpu")
  flags_now = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = f"{flags_now} --xla_gpu_enable_triton_gemm=false".strip()
  try:
    return plan_bench.target_devices(_TARGET.value, count)
  except (ValueError, RuntimeError) as e:
    raise app.UsageError(str(e)) from None


def bench_plan(config, steps: int, clients: int) -> None:
  del steps, clients  # nothing runs; the clients are the config's
  devices = None
  if _TARGET.value:
    devices = _target_devices(_DEVICES.value or 1)
  elif _DEVICES.value:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  print(plan_bench.report(plan_bench.plan(config, devices=devices), config, _MFU.value))


def bench_sam(config, steps: int, clients: int) -> None:
  if _TARGET.value:  # compiled for one GPU of that kind, nothing run
    sam_bench.bench_sam_target(_target_devices(1)[0])
  else:
    sam_bench.bench_sam(config, steps, clients, _PROFILE_DIR.value and f"{_PROFILE_DIR.value}/sam")


def bench_pipeline(config, steps: int, clients: int) -> None:
  del config, steps, clients
  try:
    workers = [int(w) for w in _WORKERS.value.split(",") if w.strip()]
  except ValueError:
    raise app.UsageError(
      f"--pipeline_workers={_WORKERS.value!r} is not a comma list of integers"
    ) from None
  pipeline_bench.bench_pipeline(
    workers or pipeline_bench.default_workers(),
    num_batches=_PIPELINE_BATCHES.value,
    torch_peer=_TORCH_PEER.value,
  )


BENCHMARKS = {
  "pretrain": bench_pretrain,
  "plan": bench_plan,
  "pipeline": bench_pipeline,
  "urfm": bench_urfm,
  "sam": bench_sam,
}


def main(argv):
  if len(argv) != 2 or argv[1] not in BENCHMARKS:
    raise app.UsageError(f"usage: python -m ultrajax.bench {{{'|'.join(BENCHMARKS)}}} [flags]")
  compiler.tune_for_host()  # the jobs' XLA:CPU flags; no compilation cache (compile s is real)
  BENCHMARKS[argv[1]](_CONFIG.value, _STEPS.value, _CLIENTS.value)


if __name__ == "__main__":
  app.run(main)
