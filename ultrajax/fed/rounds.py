"""The federated round engine: C clients' local training on L parallel lanes (a scan over steps
of a vmap over lanes), driven by a strategy's hooks (fed/strategies.py). Any pytree. How a job
drives it: docs/federated.md, "The engine".

Clients differ in size, so running every client in parallel (one lane each) wastes the steps
where small clients wait for the largest one. Instead a round is *planned* over its
participants: clients are packed onto L lanes (longest first, onto the least loaded lane), each
lane trains its clients one after another, and L is chosen so the round is no longer than the
largest client's local epoch. A lane loads what `client_start` gives a client and its optimizer
state at the client's first step and hands the client to `on_client_done` after its last, so a
round's result is exactly that of training each client on its own, whatever L.

Per-client randomness: key(round, client, step) = fold_in(fold_in(round_key, client), step),
independent of lanes and chunking, so a resumed run draws exactly the same masks; the
server's key (DP noise, ...) is fold_in(round_key, SERVER_KEY).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ultrajax.fed.strategies import Finished, Server
from ultrajax.train import divergence, optimizer, sharding

# loss_fn(params, model_state, batch, key) -> (scalar loss, (new model_state, aux dict or None)),
# for ONE client and one batch (no client axis); use model_state {} when there is none.
LossFn = Callable[..., tuple]
SERVER_KEY = 0x7FFFFFFF  # fold_in(round_key, SERVER_KEY): the server's key (never a client index)


class RoundPlan(NamedTuple):
  """Which client each lane trains at each step of a round; all arrays [L, T].

  client_ids: the client (-1 = idle); step_ids: the step inside that client's round;
  first / last: the client's first / last step (load / store its state there).
  T is a multiple of the chunk length; steps past a lane's work are idle.
  """

  client_ids: np.ndarray
  step_ids: np.ndarray
  first: np.ndarray
  last: np.ndarray

  def chunk(self, j: int, k: int) -> RoundPlan:
    """The j-th block of k steps."""
    return RoundPlan(*(a[:, j * k : (j + 1) * k] for a in self))


def auto_lanes(steps_per_client, multiple_of: int = 1) -> int:
  """The fewest lanes that keep a round as short as the largest client's local epoch
  (ceil(total / max) for a perfect packing; one more when the greedy packing needs it),
  rounded up to a multiple of `multiple_of` (the mesh's 'clients' axis) and at most C."""
  steps = np.asarray(steps_per_client)
  num_clients = len(steps)
  lanes = int(np.ceil(steps.sum() / steps.max()))
  while lanes < num_clients and _packed_length(steps, lanes) > steps.max():
    lanes += 1
  lanes = int(np.ceil(lanes / multiple_of) * multiple_of)
  return min(lanes, int(np.ceil(num_clients / multiple_of) * multiple_of))


def _assign(steps: np.ndarray, num_lanes: int) -> list[list[int]]:
  """Longest-processing-time-first packing: clients per lane, in training order."""
  lanes = [[] for _ in range(num_lanes)]
  load = np.zeros(num_lanes, np.int64)
  for c in sorted(range(len(steps)), key=lambda c: (-steps[c], c)):
    lane = int(np.argmin(load))
    lanes[lane].append(c)
    load[lane] += steps[c]
  return lanes


def _packed_length(steps: np.ndarray, num_lanes: int) -> int:
  return max(sum(steps[c] for c in lane) for lane in _assign(steps, num_lanes))


def plan_round(steps_per_client, num_lanes: int, chunk_steps: int) -> RoundPlan:
  """Packs C clients' local steps onto num_lanes lanes.  steps_per_client: [C] ints >= 0; a
  client with 0 steps (not taking part this round) is left out of the plan."""
  steps = np.asarray(steps_per_client, np.int64)
  lanes = [[c for c in lane if steps[c] > 0] for lane in _assign(steps, num_lanes)]
  length = max(sum(steps[c] for c in lane) for lane in lanes)
  length = int(np.ceil(length / chunk_steps) * chunk_steps)
  client_ids = np.full((num_lanes, length), -1, np.int32)
  step_ids = np.zeros((num_lanes, length), np.int32)
  first = np.zeros((num_lanes, length), bool)
  last = np.zeros((num_lanes, length), bool)
  for lane, clients in enumerate(lanes):
    t = 0
    for c in clients:
      client_ids[lane, t : t + steps[c]] = c
      step_ids[lane, t : t + steps[c]] = np.arange(steps[c])
      first[lane, t] = True
      last[lane, t + steps[c] - 1] = True
      t += steps[c]
  return RoundPlan(client_ids, step_ids, first, last)


def plan_chunked(steps_per_client, num_lanes: int, max_chunk_steps: int) -> tuple[RoundPlan, int]:
  """(plan, chunk length K): the fewest chunks of at most max_chunk_steps steps that cover the
  packed round, as equal as possible so the last chunk is not mostly idle padding."""
  length = plan_round(steps_per_client, num_lanes, 1).client_ids.shape[1]
  chunk_steps = math.ceil(length / math.ceil(length / max_chunk_steps))
  return plan_round(steps_per_client, num_lanes, chunk_steps), chunk_steps


def select(mask, new, old):
  """Per slot: new where mask [L] else old (trees with a leading slot axis L, e.g. lanes)."""
  return jax.tree.map(
    lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old
  )


def _over_lanes(one_step, num_lanes: int):
  """one_step vmapped over the lanes (its 5th argument, the round index, shared). One lane runs
  one_step on the lane itself: XLA:CPU ran the vmapped MAE-B/16 step with a lane axis of 1 about
  1.3x slower than the same step unbatched (docs/benchmarks.md)."""
  if num_lanes > 1:
    return jax.vmap(one_step, in_axes=(0, 0, 0, 0, None, 0))

  def one_lane(*args):
    args = [a if i == 4 else jax.tree.map(lambda x: x[0], a) for i, a in enumerate(args)]
    return jax.tree.map(lambda x: x[None], one_step(*args))

  return one_lane


class LaneState(NamedTuple):
  """What a round carries between chunks.

  params, model_state, opt_state, ctx: the clients the lanes are training [L, ...] (ctx: the
  strategy's per-client context, e.g. FedProx's start params; None for FedAvg);
  client_opt_state: every client's optimizer state [C, ...], stored back as clients finish;
  strategy_state: the strategy's state (a finishing client may write its own slots);
  acc: the strategy's accumulator of the finished clients (FedAvg: sum w_k y_k, sum w_k).
  """

  params: object
  model_state: object
  opt_state: object
  ctx: object
  client_opt_state: object
  strategy_state: object
  acc: object

  @property
  def lanes(self) -> tuple:
    """What the lanes train: (params, model_state, opt_state, ctx)."""
    return self[:4]

  def with_lanes(self, lanes) -> LaneState:
    return LaneState(*lanes, *self[4:])


def _client_start(strategy, strategy_state, server: Server, clients):
  """strategy.client_start of each of `clients` [K]: (params, model_state, ctx) [K, ...]."""
  return jax.vmap(strategy.client_start, in_axes=(None, None, 0))(strategy_state, server, clients)


def _load(strategy, strategy_state, client_opt_state, server: Server, clients):
  """What the lanes hold when they start `clients` [L]: params, model state, opt state, ctx."""
  params, model_state, ctx = _client_start(strategy, strategy_state, server, clients)
  return params, model_state, jax.tree.map(lambda a: a[clients], client_opt_state), ctx


def start_round(
  strategy, server: Server, client_opt_state, strategy_state, num_clients: int, num_lanes: int
) -> LaneState:
  """Lane state at the start of a round (lane contents are replaced at each client's first step)."""
  clients = jnp.zeros((num_lanes,), jnp.int32)
  return LaneState(
    *_load(strategy, strategy_state, client_opt_state, server, clients),
    client_opt_state,
    strategy_state,
    strategy.accumulator(strategy_state, server, num_clients),
  )


def finish_round(strategy, state: LaneState, server: Server, round_key):
  """(next server, clients' optimizer states, strategy state): the strategy's server update."""
  new, strategy_state = strategy.server_update(
    state.acc, state.strategy_state, server, jax.random.fold_in(round_key, SERVER_KEY)
  )
  return new, state.client_opt_state, strategy_state


def client_models(strategy, strategy_state, server: Server, num_clients: int):
  """(params, model_state) [C, ...]: the model each client would start its next round from."""
  return _client_start(strategy, strategy_state, server, jnp.arange(num_clients))[:2]


def apply_if(pred, fn, state):
  """fn(state) where the scalar `pred` holds, else state. On a GPU as a loop of int(pred)
  iterations: XLA:GPU copies every buffer that a lax.cond's identity branch returns, and the
  round chunk's two conds (load a client, finish one) copied the whole lane state, the clients'
  optimizer states included, at every step (MAE-B, one client of 256, compiled for an H200:
  2,319 copies among 3,740 kernels per step; docs/benchmarks.md). A loop's carry is updated in
  place. Elsewhere lax.cond: on the CPU the loop made the step 5-10% slower."""
  if sharding.compute_platform() == "gpu":
    return jax.lax.fori_loop(0, pred.astype(jnp.int32), lambda _, s: fn(s), state)
  return jax.lax.cond(pred, fn, lambda s: s, state)


def make_chunk(
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  strategy,
  lr_fn: Callable[[jax.Array], jax.Array] | None = None,
  on_nonfinite: str = "stop",
):
  """Returns chunk(server, state, batches, plan, steps_per_client, weights, round_index,
  round_key) -> (state, metrics), metrics a dict of [L, K]: 'loss', 'grad_norm' (the global
  L2 norm of the loss gradient, after DP-SGD's clipping and noise when the strategy has it)
  and loss_fn's aux scalars; 0 on idle steps.

  server: strategies.Server at the round's start; batches: pytree with leading axes [L, K];
  plan: a RoundPlan chunk of K steps (arrays [L, K]); steps_per_client [C] (float), weights
  [C] (the strategy's client_weights). lr_fn: None leaves the optimizer's own schedule; else
  client c's step s runs at lr_fn(round_index + s / steps_per_client[c]) (MAE's per-iteration
  schedule, through optimizer.set_lr). Idle steps change nothing. A step whose loss or
  gradient is not finite reports loss NaN (the host stops the run, train/divergence.py); with
  on_nonfinite='skip' its update is also dropped: that lane stays as it was.
  """
  grad_fn = strategy.local_value_and_grad(loss_fn)

  def one_step(lane, batch, step_id, steps, round_index, key):
    params, model_state, opt_state, ctx = lane
    (loss, (new_ms, aux)), grads = grad_fn(
      params, model_state, batch, jax.random.fold_in(key, step_id)
    )
    finite, grad_norm = divergence.finite_and_norm(loss, grads)
    metrics = dict(loss=jnp.where(finite, loss, jnp.nan), grad_norm=grad_norm, **(aux or {}))
    grads = strategy.local_grad_transform(grads, params, ctx)
    new_opt = opt_state
    if lr_fn is not None:
      new_opt = optimizer.set_lr(
        opt_state, lr_fn(round_index + step_id.astype(jnp.float32) / steps)
      )
    updates, new_opt = tx.update(grads, new_opt, params)
    new = (optax.apply_updates(params, updates), new_ms, new_opt, ctx)
    if on_nonfinite == "skip":
      new = divergence.keep_if(finite, new, lane)
    return new, metrics

  def chunk(
    server: Server,
    state: LaneState,
    batches,
    plan: RoundPlan,
    steps_per_client,
    weights,
    round_index,
    round_key,
  ):
    num_lanes = plan.client_ids.shape[0]

    def finish(lane, c, state: LaneState):
      """Lane `lane` has done client c's last step: the strategy takes it, its opt state is stored."""
      take = lambda tree: jax.tree.map(lambda x: x[lane], tree)
      done = Finished(
        c,
        weights[c],
        take(state.params),
        take(state.model_state),
        steps_per_client[c].astype(jnp.float32),
      )
      acc, strategy_state = strategy.on_client_done(state.acc, state.strategy_state, server, done)
      client_opt_state = jax.tree.map(
        lambda a, o: a.at[c].set(o[lane]), state.client_opt_state, state.opt_state
      )
      return state._replace(
        acc=acc, strategy_state=strategy_state, client_opt_state=client_opt_state
      )

    def step(state: LaneState, xs):
      batch, client, step_id, first, last = xs
      active = client >= 0
      c = jnp.maximum(client, 0)

      def load(state):
        fresh = _load(strategy, state.strategy_state, state.client_opt_state, server, c)
        return state.with_lanes(select(first, fresh, state.lanes))

      state = apply_if(first.any(), load, state)
      keys = jax.vmap(lambda i: jax.random.fold_in(round_key, i))(c)
      lanes, metrics = _over_lanes(one_step, num_lanes)(
        state.lanes, batch, step_id, steps_per_client[c], round_index, keys
      )
      state = state.with_lanes(select(active, lanes, state.lanes))
      # The lanes that finished a client, in lane order, as one loop body: a Python loop
      # traced the strategy's on_client_done once per lane (the HSL MMoE chunk compiled in
      # 19.2 s, now 8.8; results, step time and memory unchanged: docs/benchmarks.md).
      finish_if_last = lambda lane, s: apply_if(
        last[lane], functools.partial(finish, lane, c[lane]), s
      )
      state = jax.lax.fori_loop(0, num_lanes, finish_if_last, state)
      return state, jax.tree.map(lambda m: jnp.where(active, m, 0.0), metrics)

    time_major = lambda x: jnp.swapaxes(x, 0, 1)
    xs = (jax.tree.map(time_major, batches), *(time_major(jnp.asarray(a)) for a in plan))
    state, metrics = jax.lax.scan(step, state, xs)
    return state, jax.tree.map(lambda m: m.T, metrics)

  return chunk


def without_model_state(loss_fn):
  """loss_fn(params, batch, key) -> (loss, aux) as the engine's LossFn (model state {})."""

  def engine_loss(params, model_state, batch, key):
    loss, aux = loss_fn(params, batch, key)
    return loss, (model_state, aux)

  return engine_loss


def state_shardings(tree, mesh, rules):
  """Shardings of a strategy state or accumulator: top-level entries whose key ends in
  'clients' carry a leading client axis (sharded over 'clients'); the rest follow the
  parameter rules by path, replicated where none matches."""
  rules = [tuple(r) for r in rules] + [(".*", "replicated")]
  if not isinstance(tree, dict):
    return sharding.tree_shardings(tree, mesh, rules, False)
  return {
    k: sharding.tree_shardings(v, mesh, rules, k.endswith("clients")) for k, v in tree.items()
  }


def client_losses(losses: np.ndarray, client_ids: np.ndarray, num_clients: int) -> np.ndarray:
  """Mean loss per client over a round.  losses, client_ids: [L, T] -> [C]."""
  active = client_ids >= 0
  total = np.bincount(client_ids[active], losses[active], minlength=num_clients)
  count = np.bincount(client_ids[active], minlength=num_clients)
  return total / np.maximum(count, 1)


def round_key(seed_key, round_index):
  return jax.random.fold_in(seed_key, round_index)
