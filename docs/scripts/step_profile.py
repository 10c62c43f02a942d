"""Where the MAE step's time goes on XLA:CPU, beside the PyTorch peer's (docs/benchmarks.md,
2026-12-02): the plain jitted step (loss + AdamW, as in lane_axis_cost.py) traced with
jax.profiler, its thunks joined with the optimized HLO by instruction name and summed by kind
and JAX op; then the PyTorch MAE's step (bench/torch_mae.py) under torch.profiler.

  python docs/scripts/step_profile.py BATCH small|b16 [ROWS]

XLA:CPU runs some thunks (Eigen dots) asynchronously, so their rows understate them and the
thunks they overlap overstate theirs; the rows sum to about the step's wall time.
"""

import sys
import tempfile
import time

import jax
import mae_step

from ultrajax.models import vit
from ultrajax.train import perf

batch, kind = int(sys.argv[1]), sys.argv[2]
rows = int(sys.argv[3]) if len(sys.argv) > 3 else 30
config, params, tx, step, images = mae_step.build(batch, kind)
size = config.model.image_size
compiled = (
  jax.jit(step, donate_argnums=(0, 1))
  .lower(params, tx.init(params), images, jax.random.key(0))
  .compile()
)
names = perf.op_names(compiled.as_text())
p, o = params, tx.init(params)
for i in range(3):
  c0 = time.process_time()
  p, o, loss = compiled(p, o, images, jax.random.key(i))
  jax.block_until_ready(loss)
  print(f"XLA step {i}: {1e3 * (time.process_time() - c0) / batch:.1f} CPU ms/img")
with tempfile.TemporaryDirectory() as trace_dir:
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    p, o, loss = compiled(p, o, images, jax.random.key(9))
    jax.block_until_ready(loss)
  summary = perf.trace_summary(perf.latest_trace(trace_dir), names, rows)
print(f"\nXLA thunks, one step ({summary['total_ms']:.0f} ms in all):")
for ms, count, hlo_kind, op in summary["rows"]:
  print(f"{ms:8.1f} ms {count:4d}x  {hlo_kind:24s} {op[-56:]}")

import torch  # noqa: E402  (the optional extra, after XLA's half)
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from ultrajax.bench import torch_mae  # noqa: E402

torch.set_num_threads(2)
torch.manual_seed(0)
width, depth, heads, patch = vit.model_dims(config.model)
net = torch_mae.TorchMAE(
  image_size=size,
  patch_size=patch,
  width=width,
  depth=depth,
  num_heads=heads,
  decoder_width=config.model.decoder_width,
  decoder_depth=config.model.decoder_depth,
  decoder_heads=config.model.decoder_heads,
)
opt = torch_mae.adamw(net, 1e-4, 0.05)
x = torch.randn(batch, 3, size, size)


def torch_step():
  loss = net(x)[0]
  opt.zero_grad(set_to_none=True)
  loss.backward()
  opt.step()


for i in range(3):
  c0 = time.process_time()
  torch_step()
  print(f"PyTorch step {i}: {1e3 * (time.process_time() - c0) / batch:.1f} CPU ms/img")
with profile(activities=[ProfilerActivity.CPU]) as prof:
  torch_step()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
