"""Local training of C clients on L parallel lanes: a scan over steps of a vmap over lanes.

Works on any parameter pytree. Clients differ in size, so running every client in parallel
(one lane each) wastes the steps where small clients wait for the largest one. Instead a
round is *planned*: clients are packed onto L lanes (longest first, onto the least loaded
lane), each lane trains its clients one after another, and L is chosen so the round is no
longer than the largest client's local epoch. When a lane starts a client it loads the server
parameters and that client's own optimizer state; when the client's last step is done its
parameters are added, weighted by n_k / n, to the next server parameters and its optimizer
state is stored back. So FedAvg's result is exactly that of training each client on its own.

Per-client randomness: key(round, client, step) = fold_in(fold_in(round_key, client), step),
independent of lanes and chunking, so a resumed run draws exactly the same masks.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ultrajax.train import divergence, optimizer

# loss_fn(params, batch, key) -> (scalar loss, aux pytree)
LossFn = Callable[..., tuple]


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

  @property
  def num_lanes(self) -> int:
    return self.client_ids.shape[0]

  def chunk(self, j: int, k: int) -> "RoundPlan":
    """The j-th block of k steps."""
    return RoundPlan(*(a[:, j * k:(j + 1) * k] for a in self))


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
  """Packs C clients' local steps onto num_lanes lanes.  steps_per_client: [C] ints >= 1."""
  steps = np.asarray(steps_per_client, np.int64)
  lanes = _assign(steps, num_lanes)
  length = max(sum(steps[c] for c in lane) for lane in lanes)
  length = int(np.ceil(length / chunk_steps) * chunk_steps)
  client_ids = np.full((num_lanes, length), -1, np.int32)
  step_ids = np.zeros((num_lanes, length), np.int32)
  first = np.zeros((num_lanes, length), bool)
  last = np.zeros((num_lanes, length), bool)
  for lane, clients in enumerate(lanes):
    t = 0
    for c in clients:
      client_ids[lane, t:t + steps[c]] = c
      step_ids[lane, t:t + steps[c]] = np.arange(steps[c])
      first[lane, t] = True
      last[lane, t + steps[c] - 1] = True
      t += steps[c]
  return RoundPlan(client_ids, step_ids, first, last)


def _select(mask, new, old):
  """Per-lane choice between two trees with a leading lane axis.  mask: [L] bool."""
  return jax.tree.map(lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
                      new, old)


class LaneState(NamedTuple):
  """What a round carries between chunks: the lanes' current client params and optimizer
  states [L, ...], every client's stored optimizer state [C, ...], and the running weighted
  sum of finished clients' params (the next server params, float32)."""
  params: object
  opt_state: object
  client_opt_state: object
  server_sum: object


def start_round(server_params, client_opt_state, num_lanes: int) -> LaneState:
  """Lane state at the start of a round (lane contents are replaced at each client's first step)."""
  lanes = lambda x: jnp.broadcast_to(x, (num_lanes, *x.shape))
  return LaneState(
      params=jax.tree.map(lanes, server_params),
      opt_state=jax.tree.map(lambda x: lanes(x[0]), client_opt_state),
      client_opt_state=client_opt_state,
      server_sum=jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), server_params))


def finish_round(state: LaneState, server_params):
  """The aggregated server params (dtype of the old ones) and the clients' optimizer states."""
  new = jax.tree.map(lambda s, x: s.astype(x.dtype), state.server_sum, server_params)
  return new, state.client_opt_state


def make_chunk(loss_fn: LossFn, tx: optax.GradientTransformation,
               lr_fn: Callable[[jax.Array], jax.Array], on_nonfinite: str = "stop",
               grad_norms: bool = False):
  """Returns chunk(server_params, state, batches, plan, steps_per_client, weights,
  round_index, round_key) -> (state, losses [L, K]), or with grad_norms=True
  (state, losses [L, K], the global L2 norms of the steps' gradients [L, K]; 0 when idle).

  batches: pytree with leading axes [L, K]; plan: a RoundPlan chunk of K steps (arrays
  [L, K]); steps_per_client, weights: [C]. The learning rate of client c's step s is
  lr_fn(round_index + s / steps_per_client[c]) (MAE's per-iteration schedule); idle steps
  change nothing and report loss 0. A step whose loss or gradient is not finite reports loss
  NaN (the host stops the run, train/divergence.py); with on_nonfinite='skip' its update is
  also dropped: that lane's params and optimizer state stay as they were.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def one_step(params, opt_state, batch, step_id, steps, round_index, client_key):
    epoch = round_index + step_id.astype(jnp.float32) / steps
    (loss, _), grads = grad_fn(params, batch, jax.random.fold_in(client_key, step_id))
    finite = divergence.all_finite((loss, grads))
    new_opt = optimizer.set_lr(opt_state, lr_fn(epoch))
    updates, new_opt = tx.update(grads, new_opt, params)
    new_params = optax.apply_updates(params, updates)
    if on_nonfinite == "skip":
      new_params, new_opt = divergence.keep_if(finite, (new_params, new_opt), (params, opt_state))
    return new_params, new_opt, (jnp.where(finite, loss, jnp.nan), optax.global_norm(grads))

  def chunk(server_params, state: LaneState, batches, plan: RoundPlan, steps_per_client,
            weights, round_index, round_key):
    num_clients = weights.shape[0]

    def step(state: LaneState, xs):
      batch, client, step_id, first, last = xs
      active = client >= 0
      c = jnp.maximum(client, 0)
      # A lane starting a client loads the server params and the client's optimizer state.
      incoming_opt = jax.tree.map(lambda a: a[c], state.client_opt_state)
      params = _select(first, jax.tree.map(lambda x: jnp.broadcast_to(x, (c.shape[0], *x.shape)),
                                           server_params), state.params)
      opt_state = _select(first, incoming_opt, state.opt_state)
      keys = jax.vmap(lambda i: jax.random.fold_in(round_key, i))(c)
      new_params, new_opt, (loss, norm) = jax.vmap(one_step, in_axes=(0, 0, 0, 0, 0, None, 0))(
          params, opt_state, batch, step_id, steps_per_client[c], round_index, keys)
      params = _select(active, new_params, params)
      opt_state = _select(active, new_opt, opt_state)
      # A lane finishing a client adds n_k/n * params to the server sum and stores its state.
      w = jnp.where(last, weights[c], 0.0)
      server_sum = jax.tree.map(
          lambda s, p: s + jnp.tensordot(w, p.astype(jnp.float32), axes=(0, 0)),
          state.server_sum, params)
      target = jnp.where(last, c, num_clients)  # out of range: dropped
      client_opt_state = jax.tree.map(lambda a, o: a.at[target].set(o, mode="drop"),
                                      state.client_opt_state, opt_state)
      return (LaneState(params, opt_state, client_opt_state, server_sum),
              (jnp.where(active, loss, 0.0), jnp.where(active, norm, 0.0)))

    time_major = lambda x: jnp.swapaxes(x, 0, 1)
    xs = (jax.tree.map(time_major, batches), *(time_major(jnp.asarray(a)) for a in plan))
    state, (losses, norms) = jax.lax.scan(step, state, xs)
    return (state, losses.T, norms.T) if grad_norms else (state, losses.T)

  return chunk


def client_losses(losses: np.ndarray, client_ids: np.ndarray, num_clients: int) -> np.ndarray:
  """Mean loss per client over a round.  losses, client_ids: [L, T] -> [C]."""
  active = client_ids >= 0
  total = np.bincount(client_ids[active], losses[active], minlength=num_clients)
  count = np.bincount(client_ids[active], minlength=num_clients)
  return total / np.maximum(count, 1)


def round_key(seed_key, round_index):
  return jax.random.fold_in(seed_key, round_index)
