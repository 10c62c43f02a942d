"""Benchmarks: the PyTorch MAE peer of `bench pretrain` computes MAE's objective (checked
against ultrajax's own loss on the peer's predictions and mask); `bench plan` counts the
per-device state as a hand count and XLA do."""

import dataclasses
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ultrajax import configlib
from ultrajax.bench import plan as plan_lib
from ultrajax.models import mae
from ultrajax.train import perf

REPO = pathlib.Path(__file__).resolve().parents[1]

TINY = dict(
  image_size=32,
  patch_size=8,
  width=32,
  depth=1,
  num_heads=4,
  decoder_width=32,
  decoder_depth=1,
  decoder_heads=4,
  mask_ratio=0.75,
)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_torch_peer_masks_and_loss_like_mae(norm_pix):
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  from ultrajax.bench import torch_mae

  torch.manual_seed(0)
  model = torch_mae.TorchMAE(**TINY, norm_pix_loss=norm_pix)
  images = torch.randn(3, 3, 32, 32)
  with torch.no_grad():
    loss, pred, mask = model(images)
  # Random masking keeps exactly int(16 * 0.25) = 4 patches per image, different ones per image.
  np.testing.assert_array_equal(mask.sum(1).numpy(), [12, 12, 12])
  assert len({tuple(row) for row in mask.numpy()}) > 1
  expected, _ = mae.mae_loss(
    pred.numpy(),
    images.permute(0, 2, 3, 1).numpy(),
    mask.numpy().astype(bool),
    8,
    norm_pix=norm_pix,
  )
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
  # Fixed positions are buffers, not trained; biases and norms have no weight decay.
  names = {n for n, _ in model.named_parameters()}
  assert "pos_embed" not in names and "decoder_pos_embed" not in names
  groups = torch_mae.adamw(model, 1e-3, 0.05).param_groups
  assert all(p.ndim > 1 for p in groups[0]["params"]) and groups[1]["weight_decay"] == 0.0


def test_torch_peer_step_is_the_recipes():
  """recipe_step (MAE's engine_pretrain step): the lr MAE's lr_sched gives, worked by hand; the
  gradient norm it reports equals numpy's over the gradients of the same forward; the update is
  plain AdamW at that lr; gradients are cleared afterwards."""
  pytest.importorskip("timm")
  import copy

  import torch

  from ultrajax.bench import torch_mae

  lr = torch_mae.recipe_lr
  assert [lr(s, 1.0, 4, 12) for s in (0, 2, 4, 8, 12)] == pytest.approx([0, 0.5, 1, 0.5, 0])
  torch.manual_seed(0)
  model, images = torch_mae.TorchMAE(**TINY), torch.randn(2, 3, 32, 32)
  twin = copy.deepcopy(model)
  torch.manual_seed(1)
  loss, norm = torch_mae.recipe_step(model, torch_mae.adamw(model, 9.0, 0.05), images, 1e-3)
  torch.manual_seed(1)  # the same masking noise
  twin_loss = twin(images)[0]
  twin_loss.backward()
  grads = [p.grad.numpy().ravel() for p in twin.parameters()]
  assert loss == pytest.approx(twin_loss.item(), rel=1e-6)
  assert norm == pytest.approx(float(np.linalg.norm(np.concatenate(grads))), rel=1e-5)
  torch_mae.adamw(twin, 1e-3, 0.05).step()
  for a, b in zip(model.parameters(), twin.parameters(), strict=True):
    np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-6, atol=1e-7)
    assert a.grad is None


def _mae_param_count(width, depth, patch, dec_width, dec_depth):
  """MAE parameters by hand: a pre-norm block holds 12 w^2 + 13 w (qkv, proj, 2 MLP layers of
  ratio 4, two LayerNorms); the encoder adds the patch embedding, cls token and final norm, the
  decoder its embedding, mask token, norm and per-patch pixel head. Positions are fixed."""
  block = lambda w: 12 * w * w + 13 * w
  pixels = patch * patch * 3
  encoder = pixels * width + width + width + depth * block(width) + 2 * width
  decoder = (
    width * dec_width
    + dec_width
    + dec_width
    + dec_depth * block(dec_width)
    + 2 * dec_width
    + dec_width * pixels
    + pixels
  )
  return encoder + decoder


@pytest.mark.parametrize(
  "mesh_clients,rules,held,compile_chunk",
  [
    # each device: every param, half the 4 clients' states; the chunk compiled too
    (2, ((".*", "replicated"),), 1.0, True),
    (1, ((".*", "fsdp"),), 1 / 8, False),  # every leaf split 8 ways over the data axis
  ],
)
def test_plan_state_bytes_match_an_analytic_count(mesh_clients, rules, held, compile_chunk):
  config = configlib.load_config_module(REPO / "configs" / "pretrain_fed.py").get_config("smoke")
  config.model.update(width=32, depth=1, num_heads=2, image_size=16, decoder_width=32)
  config.mesh.clients, config.sharding_rules = mesh_clients, rules
  config.fed.chunk_steps, config.data.batch_size = 1, 8
  p = plan_lib.plan(config, steps_per_client=[3, 2, 2, 1], compile_chunk=compile_chunk)
  count = _mae_param_count(32, 1, 8, 32, 1)
  assert p.param_count == count
  clients_held = 4 / mesh_clients * held
  # params x 4 bytes x (1 + 2 Adam moments x clients held), per device
  analytic = count * 4 * (held + 2 * clients_held)
  assert p.server_bytes + p.client_opt_bytes == pytest.approx(analytic, rel=0.05)
  assert p.clients_held == pytest.approx(clients_held, rel=0.05)
  # XLA's own per-device figure of the clients' AdamW states: the output of their init.
  assert p.xla_state["output"] == pytest.approx(count * 4 * 2 * clients_held, rel=0.05)
  assert p.num_lanes % mesh_clients == 0
  if compile_chunk:
    assert p.chunk_flops > 0
    assert p.xla["argument"] >= p.server_bytes + p.client_opt_bytes + p.lane_bytes


def _mae_train_flops(width, depth, patch, size, dec_width, dec_depth, keep):
  """Matrix-product FLOPs of one MAE training image by hand (2 per multiply-add). A block on t
  tokens of width w: qkv, proj and the ratio-4 MLP (12 t w^2), q k^T and p v (2 t^2 w). The
  encoder embeds all N patches and runs 1 + keep tokens, the decoder 1 + N. Training is the
  forward and two products per forward product (input and kernel gradients), except the patch
  embedding, whose input (the images) takes no gradient."""
  n = (size // patch) ** 2
  block = lambda t, w: 12 * t * w * w + 2 * t * t * w
  embed = n * patch * patch * 3 * width
  rest = (
    depth * block(1 + keep, width)
    + (1 + keep) * width * dec_width
    + dec_depth * block(1 + n, dec_width)
    + (1 + n) * dec_width * patch * patch * 3
  )
  return 2 * (2 * embed + 3 * rest)


def test_plan_model_flops_count_every_layer_once_by_hand():
  """The chunk's model FLOPs (MFU's numerator) equal a hand count of the MAE's products, per
  device, whether the blocks are scanned or rematerialised: XLA's cost analysis would count a
  scanned block once and a remat'd forward twice."""
  config = configlib.load_config_module(REPO / "configs" / "pretrain_fed.py").get_config("smoke")
  config.model.update(width=32, depth=2, num_heads=2, image_size=16, decoder_width=32)
  config.mesh.clients, config.fed.chunk_steps, config.data.batch_size = 1, 2, 8
  flops = {}
  for remat, scan in [("none", False), ("full", False), ("none", True), ("dots", True)]:
    config.model.update(remat=remat, scan_layers=scan)
    p = plan_lib.plan(config, steps_per_client=[3, 2, 2, 1], compile_chunk=False)
    flops[remat, scan] = p.chunk_flops
  # Every lane computes every step of the chunk (idle lanes too); the work is split 8 ways.
  per_image = _mae_train_flops(32, 2, 8, 16, 32, 1, keep=1)
  by_hand = p.num_lanes * p.chunk_steps * 8 * per_image / 8
  assert flops == {key: pytest.approx(by_hand, rel=1e-9) for key in flops}
  assert p.flops_by_dtype == {"float32": pytest.approx(by_hand, rel=1e-9)}
  # The paper's bfloat16: every product of the step, forward and backward, in bfloat16 (the
  # attention scores' gradient included, vit.attention_scores).
  config.model.update(remat="none", scan_layers=False, dtype="bfloat16")
  p = plan_lib.plan(config, steps_per_client=[3, 2, 2, 1], compile_chunk=False)
  assert p.flops_by_dtype == {"bfloat16": pytest.approx(by_hand, rel=1e-9)}


def test_plan_model_flops_count_cudnn_attention_as_its_products(monkeypatch):
  """On a GPU the bf16 attention is cuDNN's, one call with no products in the trace: the model
  FLOPs are still the hand count, from the chunk traced with explicit attention. The backend is
  reported as a GPU's here and jax.nn.dot_product_attention replaced by an opaque stand-in
  (host callbacks, traced only)."""
  zeros = lambda *a: None  # never called: the chunk is traced, not run

  def opaque(q, k, v, bias=None, implementation=None, **seq_lengths):
    out = jax.ShapeDtypeStruct(q.shape, q.dtype)

    @jax.custom_vjp
    def attend(q, k, v):
      return jax.pure_callback(zeros, out, q, k, v, vmap_method="sequential")

    def backward(qkv, g):
      shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in qkv)
      return jax.pure_callback(zeros, shapes, *qkv, g, vmap_method="sequential")

    attend.defvjp(lambda q, k, v: (attend(q, k, v), (q, k, v)), backward)
    return attend(q, k, v)

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax.nn, "dot_product_attention", opaque)
  config = configlib.load_config_module(REPO / "configs" / "pretrain_fed.py").get_config("smoke")
  config.model.update(width=32, depth=2, num_heads=2, image_size=16, decoder_width=32)
  config.model.dtype = "bfloat16"
  config.mesh.clients, config.fed.chunk_steps, config.data.batch_size = 1, 2, 8
  p = plan_lib.plan(config, steps_per_client=[3, 2, 2, 1], compile_chunk=False)
  by_hand = p.num_lanes * p.chunk_steps * 8 * _mae_train_flops(32, 2, 8, 16, 32, 1, keep=1) / 8
  assert p.flops_by_dtype == {"bfloat16": pytest.approx(by_hand, rel=1e-9)}


def test_matmul_flops_by_dtype_by_hand():
  """perf.matmul_flops_by_dtype: 2 FLOPs per multiply-add, by operand dtype, a scan's body
  `length` times and a cond's costliest branch once."""
  bf16, f32 = jnp.bfloat16, jnp.float32

  def f(a, b, x, flag):
    y = a @ b  # bf16 [2, 3] @ [3, 4]: 2 * 2 * 4 * 3
    x, _ = jax.lax.scan(lambda c, _: (c @ c, None), x, length=5)  # f32 [4, 4] @ [4, 4], 5 times
    mixed = lambda: x[:2, :3] @ b  # f32 x bf16 [2, 3] @ [3, 4]
    cheap = lambda: x[:2, :4]
    z = jax.lax.cond(flag, mixed, cheap)
    conv = jax.lax.conv(a[None, None], b[None, None, :2, :2], (1, 1), "VALID")  # 2 outputs
    return y, z, conv

  args = (jnp.ones((2, 3), bf16), jnp.ones((3, 4), bf16), jnp.ones((4, 4), f32), True)
  jaxpr = jax.make_jaxpr(f)(*args)
  assert perf.matmul_flops_by_dtype(jaxpr) == {
    "bfloat16": 2 * 2 * 4 * 3 + 2 * 2 * 4,  # the product; the convolution, 2 x 2 window each
    "float32": 5 * 2 * 4 * 4 * 4,
    "float32 x bfloat16": 2 * 2 * 4 * 3,
  }
  assert perf.matmul_flops(jaxpr) == 48 + 16 + 640 + 48
  assert perf.dtype_shares({"bfloat16": 3.0, "float32": 1.0}) == "bfloat16 75.0%, float32 25.0%"


def test_plan_report_says_how_to_fit_a_16_gb_device():
  """A layout over 16 GB gets the changes that lower it: fsdp rules for replicated state, scan
  with remat for temporaries; one that fits, or already scans with remat, is not told to."""
  config = configlib.load_config_module(REPO / "configs" / "pretrain_fed.py").get_config("smoke")
  gib = plan_lib.GIB
  figures = dict(
    mesh={"clients": 1, "data": 8},
    num_clients=16,
    num_lanes=5,
    chunk_steps=32,
    num_chunks=231,
    batch=64,
    param_count=10,
    server_bytes=0,
    client_opt_bytes=0,
    clients_held=2.0,
    lane_bytes=0,
    batch_bytes=0,
    xla_state=dict(argument=0, output=0, alias=0, temp=0),
    flops_by_dtype={"bfloat16": 1e12},
    compile_s=1.0,
  )
  big = plan_lib.Plan(
    xla=dict(argument=8 * gib, output=7 * gib, alias=7 * gib, temp=9 * gib), **figures
  )
  assert big.peak_bytes == 17 * gib
  hints = plan_lib.fit_hints(big, config)
  assert len(hints) == 3 and "fsdp" in hints[0] and "temporaries are 9.00 GiB" in hints[1]
  assert "to fit 16 GB: every device holds" in plan_lib.report(big, config)
  config.sharding_rules = ((".*", "fsdp"),)
  config.model.update(scan_layers=True, remat="dots")
  assert plan_lib.fit_hints(big, config) == hints[2:]
  small = dataclasses.replace(big, xla=dict(argument=8 * gib, output=0, alias=0, temp=6 * gib))
  assert plan_lib.fit_hints(small, config) == []


def test_bench_pipeline_times_both_peers_on_one_folder(tmp_path):
  from ultrajax.bench import pipeline as pipeline_bench
  from ultrajax.data import sources

  root = pipeline_bench.write_jpeg_folder(tmp_path, 6, 40)
  folder = sources.folder_clients(str(root))[0]
  assert len(folder) == 6 and folder[0]["image"].shape == (40, 40, 3)
  rows = pipeline_bench.bench_pipeline(
    [0], num_images=6, stored_size=40, batch=2, num_batches=1, torch_peer=False
  )
  assert [(r["pipeline"], r["workers"]) for r in rows] == [
    ("ultrajax, JPEG folder", 0),
    ("ultrajax, phantom", 0),
  ]
  assert all(r["img_per_s"] > 0 and r["per_core"] == r["img_per_s"] for r in rows)
  assert all(r["per_cpu_s"] > 0 for r in rows)
  try:  # the official loader needs the [torch] extra
    import torchvision  # noqa: F401
  except ImportError:
    return
  assert min(pipeline_bench.torch_img_per_s(root, 0, 2, 1)) > 0


def test_bench_pipeline_leaves_each_workers_start_up_out(monkeypatch):
  """Workers take batches in turn, so with W workers the first W batches each hold a worker's
  start-up (an H200 host's 2-worker row came out at 597 img/s against 4905 for one worker):
  _time_batches starts its clocks after max(W, 1) batches. CPU time counts the worker
  processes: a child that burns CPU while timed raises the CPU seconds per image."""
  import subprocess
  import sys
  import time

  from ultrajax.bench import pipeline as pipeline_bench

  ticks = iter(range(100))
  monkeypatch.setattr(pipeline_bench.time, "perf_counter", lambda: float(next(ticks)))
  taken = []
  batches = (taken.append(i) or i for i in range(100))
  img_s, _ = pipeline_bench._time_batches(batches, batch=4, num_batches=3, warmup=2)
  assert taken == [0, 1, 2, 3, 4] and img_s == 12 / 1.0  # clocks read once each side
  monkeypatch.undo()
  burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
  before = pipeline_bench._tree_cpu_s()
  child = subprocess.Popen([sys.executable, "-c", burn + "\ntime.sleep(30)"])
  try:
    time.sleep(1.0)  # the child's 0.3 s of CPU, then sleeping
    assert pipeline_bench._tree_cpu_s() - before >= 0.25
  finally:
    child.kill()
    child.wait()


def test_bench_pretrain_meshes_run_central_on_the_same_devices():
  config = configlib.load_config_module(REPO / "configs" / "pretrain_fed.py").get_config("smoke")
  config.mesh.clients, config.data.batch_size = 2, 8
  central, federated = plan_lib.pretrain_meshes(config, 4)
  assert dict(federated.shape) == {"clients": 2, "data": 4}
  assert dict(central.shape) == {"clients": 1, "data": 8}
  assert set(central.devices.flat) == set(federated.devices.flat)
  with pytest.raises(configlib.ConfigError, match="mesh.clients=2"):
    plan_lib.pretrain_meshes(config, 3)
  config.data.batch_size = 6
  with pytest.raises(configlib.ConfigError, match="batch_size=6"):
    plan_lib.pretrain_meshes(config, 4)


def test_torch_peer_runs_in_a_fresh_process():
  """bench pretrain's PyTorch peer is timed in a spawned process (not after XLA's programs in
  this one): its step runs there and reports the batch's loss and a positive speed."""
  pytest.importorskip("timm")
  from ultrajax.bench import torch_mae

  peer = torch_mae.time_in_fresh_process(TINY, batch=2, steps=1, bfloat16=False)
  assert peer["device"] == "cpu" and peer["img_per_s"] > 0 and np.isfinite(peer["loss"])
  assert peer["pid"] != os.getpid()


def test_torch_peer_process_times_on_demand_and_raises_its_errors():
  """bench pretrain alternates the peer with ultrajax: one spawned process keeps its model and
  trains on between calls (the loss moves); an error while building it is raised here."""
  pytest.importorskip("timm")
  from ultrajax.bench import torch_mae

  with torch_mae.PeerProcess(TINY, batch=2, total_steps=2, bfloat16=False, lr=1e-2) as peer:
    first, second = peer.time(1), peer.time(1)
  assert first["pid"] == second["pid"] != os.getpid()
  assert first["loss"] != second["loss"]
  with pytest.raises(TypeError, match="bogus"):
    torch_mae.PeerProcess(dict(TINY, bogus=1), batch=2, total_steps=1, bfloat16=False)


def test_bench_sam_times_both_models_with_the_same_weights(tmp_path):
  """bench sam: ultrajax's SAM and segment_anything's, the same random weights imported, give
  the same image embedding and mask logits (float32), and both are timed. With a profile
  directory the encoder's calls are also traced, and the lines say where their time went."""
  pytest.importorskip("segment_anything")
  from ultrajax.bench import sam as sam_bench

  r = sam_bench.run("tiny", 64, batch=2, prompts=3, dtype="float32", steps=1)
  assert r["embedding_diff"] < 1e-4 and r["mask_diff"] < 1e-3, r
  for side in ("ultrajax", "torch"):
    assert all(r[side][k] > 0 for k in ("encoder_s", "decoder_s", "first_s")), r
  assert r["torch_device"].startswith("cpu")
  # --sam_attention_impl=einsum (launch/device_bench.sh's fallback): the same computation.
  r = sam_bench.run("tiny", 64, 1, 2, "float32", 1, attention_impl="einsum")
  assert r["embedding_diff"] < 1e-4 and r["mask_diff"] < 1e-3, r
  r = sam_bench.run("tiny", 64, 1, 1, "float32", 2, torch_peer=False, profile_dir=str(tmp_path))
  assert r["torch"] is None
  assert r["profile"][0].startswith("2 encoder call(s)") and "trace " in r["profile"][0], r
  assert len(r["profile"]) > 1 and "ms" in r["profile"][1]


def test_bench_sam_compiles_from_abstract_inputs_the_program_it_times():
  """bench sam --target compiles the encoder and decoder from shapes alone (for a GPU this host
  does not have). Compiled so for this CPU, the two programs run on real inputs and give what
  the jitted model gives: the image embedding, the masks and their IoU predictions."""
  from ultrajax.bench import sam as sam_bench
  from ultrajax.models import sam as sam_lib

  device = jax.devices()[0]
  programs = sam_bench.compile_for(device, "tiny", 64, 2, 3, "float32", "dot_product")
  config = sam_lib.sam_config("tiny", image_size=64)
  model = sam_lib.Sam(config, dtype=jnp.float32, rngs=nnx.Rngs(3))
  params = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(2, 64, 64, 3)), jnp.float32)
  points = jnp.asarray(rng.uniform(0, 64, (3, 1, 2)), jnp.float32)
  labels = jnp.ones((3, 1), jnp.int32)
  embedding = programs["encoder"](params, images)
  np.testing.assert_allclose(embedding, model.encode_image(images), rtol=1e-5, atol=1e-5)
  masks, iou = programs["decoder"](params, embedding[:1], points, labels)
  want = model.decode(embedding[:1], *model.encode_prompts(points, labels))
  np.testing.assert_allclose(masks, want[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(iou, want[1], rtol=1e-4, atol=1e-4)


def _write_trace(path, events):
  import gzip
  import json

  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  return path


def test_trace_summary_counts_the_device_streams_once_by_hand(tmp_path):
  """perf.trace_summary on a hand-made GPU trace: only the XLA ops on the device's stream lines
  count (not the host's, not the derived 'XLA Ops' line that repeats them, not a loop that
  holds them); sums per
  instruction kind and JAX op, the union of overlapping spans as busy time. A TPU-like trace
  (no streams) counts its 'XLA Ops' line."""
  from ultrajax.train import perf

  meta = [
    dict(ph="M", name="process_name", pid=1, args=dict(name="/host:CPU")),
    dict(ph="M", name="process_name", pid=2, args=dict(name="/device:GPU:0")),
    dict(ph="M", name="thread_name", pid=2, tid=10, args=dict(name="Stream #7(Compute)")),
    dict(ph="M", name="thread_name", pid=2, tid=11, args=dict(name="XLA Ops")),
  ]
  op = lambda pid, tid, hlo, ts, dur: dict(  # noqa: E731
    ph="X", pid=pid, tid=tid, name="kernel", ts=ts, dur=dur, args=dict(hlo_op=hlo)
  )
  events = meta + [
    op(1, 5, "fusion.9", 0, 99_000),  # the host's launch of it: not device time
    op(2, 10, "while.4", 0, 25_000),  # a loop holding the three below: only they count
    op(2, 10, "fusion.1", 0, 10_000),
    op(2, 10, "fusion.2", 5_000, 10_000),  # overlaps fusion.1 by 5 ms
    op(2, 10, "custom-call.3", 20_000, 5_000),
    op(2, 11, "fusion.1", 0, 10_000),  # the derived line: the same op again
    dict(ph="X", pid=2, tid=10, name="memcpy", ts=30_000, dur=1_000, args={}),  # no hlo_op
  ]
  names = {"fusion.1": "jvp(Block)/dot_general", "fusion.2": "jvp(Block)/dot_general"}
  s = perf.trace_summary(_write_trace(tmp_path / "gpu.json.gz", events), names)
  assert s["where"] == "device streams"
  assert s["total_ms"] == pytest.approx(25.0) and s["busy_ms"] == pytest.approx(20.0)
  assert s["rows"] == [(20.0, 2, "fusion", "jvp(Block)/dot_general"), (5.0, 1, "custom-call", "?")]
  tpu = [e for e in events if e.get("tid") != 10]  # no stream line, its name included
  s = perf.trace_summary(_write_trace(tmp_path / "tpu.json.gz", tpu), names)
  assert s["where"] == "device 'XLA Ops' line"
  assert s["rows"] == [(10.0, 1, "fusion", "jvp(Block)/dot_general")]
  # A device trace whose kernels name no instruction: by kernel name, the host's left out.
  bare = [dict(e, args={}) if e.get("pid") == 2 and e["ph"] == "X" else e for e in events]
  s = perf.trace_summary(_write_trace(tmp_path / "bare.json.gz", bare), names)
  assert s["where"] == "device streams"
  assert s["rows"] == [(25.0, 3, "kernel", "?"), (1.0, 1, "memcpy", "?")]


def test_trace_summary_names_the_kernels_inside_cuda_graphs(tmp_path):
  """In XLA's command buffers (CUDA graphs) every kernel carries the command buffer's name as
  hlo_op (an H200 trace of the MAE step: one 'command_buffer_5' row for 97% of the time). The
  kernels' own names are the fused instructions' with '_N' for '.N': the rows name those, and
  JAX ops where the HLO names them; cuBLAS kernels keep their names."""
  from ultrajax.train import perf

  meta = [
    dict(ph="M", name="process_name", pid=2, args=dict(name="/device:GPU:0")),
    dict(ph="M", name="thread_name", pid=2, tid=10, args=dict(name="Stream #14(Compute)")),
  ]
  graph = lambda name, ts, dur: dict(  # noqa: E731
    ph="X", pid=2, tid=10, name=name, ts=ts, dur=dur,
    args=dict(hlo_op="command_buffer_5", cuda_graph_id="1895"),
  )  # fmt: skip
  events = meta + [
    graph("loop_add_fusion_295", 0, 2_000),
    graph("gemm_fusion_dot_576", 2_000, 3_000),
    graph("gemm_fusion_dot_575", 5_000, 1_000),
    graph("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", 6_000, 4_000),
  ]
  names = {"gemm_fusion_dot.576": "transpose(jvp(Block))/dot_general"}
  s = perf.trace_summary(_write_trace(tmp_path / "graphs.json.gz", events), names)
  assert s["rows"] == [
    (4.0, 1, "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", "?"),
    (3.0, 1, "gemm_fusion_dot", "transpose(jvp(Block))/dot_general"),
    (2.0, 1, "loop_add_fusion", "?"),
    (1.0, 1, "gemm_fusion_dot", "?"),
  ]


def test_trace_summary_of_a_cpu_trace_names_the_jax_ops():
  """A real XLA:CPU trace of a jitted function, three calls: its thunks, named after the JAX
  ops of the compiled HLO, busy no longer than the calls took."""
  import glob
  import tempfile
  import time

  import jax
  import jax.numpy as jnp

  from ultrajax.train import perf

  f = jax.jit(lambda a, b: jnp.tanh(a @ b) * 2.0)
  a = jnp.ones((128, 128))
  names = perf.op_names(f.lower(a, a).compile().as_text())
  jax.block_until_ready(f(a, a))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      t0 = time.perf_counter()
      for _ in range(3):
        jax.block_until_ready(f(a, a))
      wall_ms = 1e3 * (time.perf_counter() - t0)
    (trace,) = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)
    s = perf.trace_summary(trace, names)
  assert s["where"] == "host (XLA:CPU thunks)"
  assert 0 < s["busy_ms"] <= min(s["total_ms"], wall_ms) + 1e-6
  assert sum(count for _, count, *_ in s["rows"]) % 3 == 0  # the same thunks in each call
  ops = {op for *_, op in s["rows"]}
  assert ops <= set(names.values()) and ops & {"dot_general", "tanh", "mul"}, s


HAND_HLO = """HloModule hand, is_scheduled=true

%fused_add (p0: f32[8,4]) -> f32[8,4] {
  %p0 = f32[8,4]{1,0} parameter(0)
  ROOT %add.1 = f32[8,4]{1,0} add(%p0, %p0)
}

%body (s: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %s = (s32[], f32[8,4]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %x = f32[8,4]{1,0} get-tuple-element(%s), index=1
  %loop_add_fusion.3 = f32[8,4]{1,0} fusion(%x), kind=kLoop, calls=%fused_add, metadata={op_name="jit(f)/while/body/add"}
  %gemm.2 = (f32[8,8]{1,0}, s8[16]{0}) custom-call(%x, %x), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["1"]}}}
  ROOT %t = (s32[], f32[8,4]{1,0}) tuple(%i, %loop_add_fusion.3)
}

%cond (c: (s32[], f32[8,4])) -> pred[] {
  %c = (s32[], f32[8,4]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%c), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

%identity (a: bf16[16]) -> bf16[16] {
  ROOT %a = bf16[16]{0} parameter(0)
}

%negate (b: bf16[16]) -> bf16[16] {
  %b = bf16[16]{0} parameter(0)
  ROOT %neg = bf16[16]{0} negate(%b)
}

ENTRY %main (x0: f32[8,4], y: bf16[16], p: pred[]) -> (f32[8,4], bf16[16], bf16[64]) {
  %x0 = f32[8,4]{1,0} parameter(0)
  %y = bf16[16]{0} parameter(1)
  %p = pred[] parameter(2)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,4]{1,0}) tuple(%zero, %x0)
  %w = (s32[], f32[8,4]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %w2 = (s32[], f32[8,4]{1,0}) while(%init), condition=%cond, body=%body
  %r = bf16[16]{0} conditional(%p, %y, %y), true_computation=%negate, false_computation=%identity
  %copy.5 = bf16[16]{0} copy(%r)
  %ag = (bf16[16]{0}, bf16[64]{0}) all-gather-start(%copy.5), dimensions={0}
  %agd = bf16[64]{0} all-gather-done(%ag)
  %out = f32[8,4]{1,0} get-tuple-element(%w), index=1
  ROOT %res = (f32[8,4]{1,0}, bf16[16]{0}, bf16[64]{0}) tuple(%out, %copy.5, %agd)
}
"""


def test_hlo_census_counts_a_hand_written_module():
  """bench/hlo.py on a module written by hand: the loop body's kernels run its known trip count
  (3), its condition once more; a loop of unknown length runs 0 times (the steady state), its
  condition once; a
  conditional is priced by its false branch (an identity: nothing); a copy and the collective
  are kernels; bytes are operands plus results, a cuBLAS GEMM's FLOPs 2 x 8 x 8 x 4, and the
  roofline the sum of max(bytes / bandwidth, FLOPs / peak), collectives apart."""
  from ultrajax.bench import hlo

  census = hlo.census(HAND_HLO)
  # The condition runs 3 + 1 times for the first loop and once for the second.
  assert sorted((k.name, k.runs) for k in census if k.name == "lt") == [("lt", 1), ("lt", 4)]
  kernels = {k.name: k for k in census if (k.name, k.runs) != ("lt", 1)}
  assert sorted(kernels) == ["ag", "agd", "copy.5", "gemm.2", "loop_add_fusion.3", "lt"]
  fusion, gemm, lt = kernels["loop_add_fusion.3"], kernels["gemm.2"], kernels["lt"]
  assert (fusion.runs, fusion.bytes, fusion.kind, fusion.source) == (
    3,
    256,
    "loop_add_fusion",
    "while/body/add",
  )
  assert (gemm.runs, gemm.bytes, gemm.flops, gemm.kind) == (
    3,
    256 + 16 + 256,
    512.0,
    "__cublas$lt$matmul",
  )
  assert (lt.runs, lt.bytes) == (4, 4 + 4 + 1)
  assert (kernels["copy.5"].runs, kernels["copy.5"].bytes) == (1, 64)
  assert hlo.is_collective(kernels["ag"]) and kernels["ag"].result_bytes == 32 + 128
  r = hlo.roofline(census, peak_flops=256.0, bandwidth=128.0)
  want = 3 * max(256 / 128, 0) + 3 * max(528 / 128, 512 / 256) + 5 * 9 / 128 + 64 / 128
  assert r["seconds"] == pytest.approx(want)
  assert (r["launches"], r["collectives"], r["collective_bytes"]) == (3 + 3 + 5 + 1 + 2, 1, 160)
  assert r["bytes"] == 3 * 256 + 3 * 528 + 5 * 9 + 64 and r["gemm_flops"] == 3 * 512
  assert r["by_kind"]["loop_add_fusion"]["launches"] == 3
  # The costliest groups (kind, result type without layouts, JAX op), collectives left out.
  top = hlo.heaviest(census, peak_flops=256.0, bandwidth=128.0, n=2)
  assert [(g["kind"], g["result"], g["source"], g["launches"]) for g in top] == [
    ("__cublas$lt$matmul", "(f32[8,8], s8[16])", "", 3),
    ("loop_add_fusion", "f32[8,4]", "while/body/add", 3),
  ]
  assert [g["seconds"] for g in top] == pytest.approx([3 * 528 / 128, 3 * 256 / 128])


def test_hlo_census_reads_xla_cpu_modules():
  """The parser on XLA's own text (the CPU's here): a scan of 5 steps compiles to a loop whose
  kernels the census runs 5 times, and every kernel's bytes are at least its result's."""
  from ultrajax.bench import hlo

  def f(x):
    return jax.lax.scan(lambda c, _: (jnp.sin(c) * 2 + c, None), x, None, length=5)[0]

  text = jax.jit(f).lower(jnp.ones((64, 64))).compile().as_text()
  kernels = hlo.census(text)
  assert kernels and 5 in {k.runs for k in kernels}
  assert all(k.bytes >= k.result_bytes > 0 for k in kernels if k.op == "fusion")


def test_plan_target_devices_name_what_is_wrong():
  """`bench plan --target`: an unknown GPU or a device count that is not 1-8 or a multiple of
  8 is refused by name; a known one gives compile-only devices of that kind through JAX's CUDA
  plugin, and without the plugin an error that says how to install it."""
  with pytest.raises(ValueError, match="'B200': one of H100, H200, A100"):
    plan_lib.target_devices("B200", 1)
  with pytest.raises(ValueError, match="--devices=12"):
    plan_lib.target_devices("H200", 12)
  try:
    devices = plan_lib.target_devices("H200", 2)
  except RuntimeError as e:
    assert "pip install 'jax-cuda13-plugin[with-cuda]" in str(e)
  else:
    assert [d.device_kind for d in devices] == ["NVIDIA H200"] * 2
