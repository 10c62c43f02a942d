"""What the round chunk's structure costs on XLA:CPU: the MAE step (loss + AdamW) compiled
plain, under vmap with a lane axis of 1, inside a one-step lax.scan, and both; interleaved
timings in process CPU time per image (docs/benchmarks.md, 2026-12-02).

  python docs/scripts/lane_axis_cost.py BATCH small|b16 ROUNDS [plain,vmap,scan,vmapscan]

small | b16: the shapes of mae_step.py (the step timed).
"""

import sys
import time

import jax
import jax.numpy as jnp
import mae_step

batch, kind, num_rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
names = sys.argv[4].split(",") if len(sys.argv) > 4 else ["plain", "vmap", "scan", "vmapscan"]
config, params, tx, step, images = mae_step.build(batch, kind)


def lane_step(p, o, b, key):
  return jax.vmap(step, in_axes=(0, 0, 0, None))(p, o, b, key)


def scanned(fn):
  def run(p, o, b, key):
    def body(carry, x):
      p, o, loss = fn(*carry, x, key)
      return (p, o), loss

    (p, o), losses = jax.lax.scan(body, (p, o), b[None])
    return p, o, losses[0]

  return run


def lane(tree):
  return jax.tree.map(lambda x: x[None], tree)


variants = {
  "plain": (step, lambda: (params, tx.init(params), images)),
  "vmap": (lane_step, lambda: (lane(params), lane(tx.init(params)), images[None])),
  "scan": (scanned(step), lambda: (params, tx.init(params), images)),
  "vmapscan": (scanned(lane_step), lambda: (lane(params), lane(tx.init(params)), images[None])),
}
compiled, state = {}, {}
for name in names:
  fn, init = variants[name]
  compiled[name] = jax.jit(fn, donate_argnums=(0, 1))
  p, o, b = jax.tree.map(jnp.copy, init())
  t0 = time.perf_counter()
  p, o, loss = compiled[name](p, o, b, jax.random.key(0))
  jax.block_until_ready(loss)
  print(
    f"{name}: compile + 1 step {time.perf_counter() - t0:.0f} s, loss {float(jnp.ravel(loss)[0]):.6f}"
  )
  state[name] = (p, o, b)
for r in range(num_rounds):
  for name in names:
    p, o, b = state[name]
    t0, c0 = time.perf_counter(), time.process_time()
    p, o, loss = compiled[name](p, o, b, jax.random.key(r + 1))
    jax.block_until_ready(loss)
    state[name] = (p, o, b)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"{name}: {1e3 * wall:.0f} ms wall, {1e3 * cpu / batch:.1f} CPU ms/img", flush=True)
