"""Generic federated round drivers on any parameter pytree with a leading client axis.

`make_round`: every client's local steps (vmap over clients of a scan over steps), then the
strategy's aggregation. `make_splitavg_round`: SplitAVG's split learning (see there).

The job supplies

  loss_fn(params, model_state, batch, key) -> (loss, (new_model_state, aux))

for ONE client and one batch (no client axis): params are differentiated; model_state is
non-trainable state such as BatchNorm running statistics (use {} when there is none); aux is
a dict of scalars to average per client (may be {}). And per round

  batches: pytree with leading axes [C, S, ...]   S = the largest client's local steps
  num_steps: [C] int                              client c uses batches[c, :num_steps[c]]
  weights: [C]                                    strategy.client_weights(num_examples)

Steps s >= num_steps[c] change nothing (masked), so clients of different sizes share one
compiled program. Each client keeps its own optimizer state across rounds (`FedState.opt_state`);
re-initialise it (`reset_opt_state`) where a protocol wants a fresh optimizer per round.

Randomness: client c's step s uses fold_in(fold_in(round_key, c), s), independent of S.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ultrajax.fed import aggregate as agg

# loss_fn(params, model_state, batch, key) -> (loss, (new_model_state, aux))
LossFn = Callable[..., tuple]


class FedState(NamedTuple):
  """Everything a federated run carries between rounds (a pytree; checkpoint it whole).

  params, model_state, opt_state: [C, ...] per client; strategy_state: strategy.init's pytree.
  """
  params: object
  model_state: object
  opt_state: object
  strategy_state: object


def init_state(strategy, tx: optax.GradientTransformation, server_params, num_clients: int,
               model_state=None) -> FedState:
  """Every client starts from the same server params (and model state)."""
  model_state = {} if model_state is None else model_state
  params = agg.broadcast(server_params, num_clients)
  return FedState(
      params=params,
      model_state=agg.broadcast(model_state, num_clients),
      opt_state=jax.vmap(tx.init)(params),
      strategy_state=strategy.init(server_params, num_clients, model_state))


def reset_opt_state(state: FedState, tx: optax.GradientTransformation) -> FedState:
  return state._replace(opt_state=jax.vmap(tx.init)(state.params))


def _select(flag, new, old):
  return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)


def make_local_train(loss_fn: LossFn, tx: optax.GradientTransformation, strategy):
  """Returns local_train(params, model_state, opt_state, ctx, batches, num_steps, round_key)
  -> (params, model_state, opt_state, metrics), all per client [C, ...].

  metrics: {'loss': [C], **aux}: means over each client's active steps.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def one_client(params, model_state, opt_state, ctx, batches, num_steps, key):
    start = params

    def step(carry, xs):
      params, model_state, opt_state = carry
      batch, s = xs
      (loss, (new_ms, aux)), grads = grad_fn(params, model_state, batch, jax.random.fold_in(key, s))
      grads = strategy.local_grad_transform(grads, params, start, ctx)
      updates, new_opt = tx.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      active = s < num_steps
      carry = (_select(active, new_params, params), _select(active, new_ms, model_state),
               _select(active, new_opt, opt_state))
      metrics = {"loss": loss, **aux}
      return carry, jax.tree.map(lambda m: jnp.where(active, m, 0.0), metrics)

    num_slots = jax.tree.leaves(batches)[0].shape[0]
    (params, model_state, opt_state), metrics = jax.lax.scan(
        step, (params, model_state, opt_state), (batches, jnp.arange(num_slots)))
    count = jnp.maximum(num_steps, 1).astype(jnp.float32)
    return params, model_state, opt_state, jax.tree.map(lambda m: m.sum(0) / count, metrics)

  def local_train(params, model_state, opt_state, ctx, batches, num_steps, round_key):
    num_clients = num_steps.shape[0]
    keys = jax.vmap(lambda c: jax.random.fold_in(round_key, c))(jnp.arange(num_clients))
    ctx_axis = None if ctx is None else 0
    return jax.vmap(one_client, in_axes=(0, 0, 0, ctx_axis, 0, 0, 0))(
        params, model_state, opt_state, ctx, batches, num_steps, keys)

  return local_train


def make_round(loss_fn: LossFn, tx: optax.GradientTransformation, strategy):
  """Returns round_fn(state: FedState, batches [C, S, ...], num_steps [C], weights [C],
  round_key) -> (state, metrics {'loss': [C], **aux}). Pure; wrap it in jax.jit."""
  local_train = make_local_train(loss_fn, tx, strategy)

  def round_fn(state: FedState, batches, num_steps, weights, round_key):
    num_steps = jnp.asarray(num_steps, jnp.int32)
    weights = jnp.asarray(weights, jnp.float32)
    ctx = strategy.local_context(state.strategy_state)
    params, model_state, opt_state, metrics = local_train(
        state.params, state.model_state, state.opt_state, ctx, batches, num_steps, round_key)
    params, strategy_state = strategy.aggregate(params, state.params, weights,
                                                state.strategy_state, num_steps)
    model_state = strategy.aggregate_state(model_state, weights)
    return FedState(params, model_state, opt_state, strategy_state), metrics

  return round_fn


class SplitState(NamedTuple):
  """SplitAVG's carried state: per-client sub-networks [C, ...] and one server sub-network."""
  client_params: object
  client_model_state: object
  client_opt_state: object
  server_params: object
  server_model_state: object
  server_opt_state: object


def init_split_state(client_tx, server_tx, client_params, server_params, num_clients: int,
                     client_model_state=None, server_model_state=None) -> SplitState:
  """Every client starts from the same client sub-network."""
  params = agg.broadcast(client_params, num_clients)
  return SplitState(params, agg.broadcast({} if client_model_state is None else client_model_state,
                                          num_clients),
                    jax.vmap(client_tx.init)(params), server_params,
                    {} if server_model_state is None else server_model_state,
                    server_tx.init(server_params))


def make_splitavg_round(client_fn, server_loss_fn, client_tx, server_tx, cut_grad: str = "average"):
  """SplitAVG (Zhang et al., IEEE JBHI 2022): feature-level fusion by split learning.

  client_fn(params, model_state, batch, key) -> (features, new_model_state): ONE client's
    sub-network up to the cut layer; features: pytree of [B, ...].
  server_loss_fn(params, model_state, features, batch, key) -> (loss, (new_model_state, aux)):
    the server sub-network on every client's features concatenated along the batch axis
    ([C * B, ...], client-major), with the batches concatenated alike.

  Each step every client sends its features; the server concatenates them (so its batch
  approximates the pooled distribution), takes one step on the joint loss and returns the
  cut-layer gradient. cut_grad='average' (SplitAVG; the 'AVG') sends every client the mean
  over clients of the per-client gradient slices; 'own' sends each client its own slice
  (plain parallel split learning, exact back-propagation of the joint loss). Client
  sub-networks are never averaged. The official code's averaging loop skips client 0's
  slice and divides inside the loop; the mean over all clients is used here.

  Returns round_fn(state: SplitState, batches [C, S, B, ...], round_key) -> (state, metrics
  {'loss': [S], **aux [S]}). Every client contributes a batch at every step (the official
  code cycles each site's loader), so there is no per-client step mask. Pure; jit it.
  """
  if cut_grad not in ("average", "own"):
    raise ValueError(f"splitavg cut_grad={cut_grad!r} is not 'average' or 'own'")
  merge = lambda x: x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
  server_grad = jax.value_and_grad(server_loss_fn, argnums=(0, 2), has_aux=True)

  def step(state: SplitState, xs):
    batch, s, key = xs
    num_clients = jax.tree.leaves(batch)[0].shape[0]
    keys = jax.vmap(lambda c: jax.random.fold_in(jax.random.fold_in(key, c), s))(
        jnp.arange(num_clients))
    clients = lambda p: jax.vmap(client_fn)(p, state.client_model_state, batch, keys)
    features, vjp_fn, client_ms = jax.vjp(clients, state.client_params, has_aux=True)
    server_key = jax.random.fold_in(jax.random.fold_in(key, num_clients), s)
    (loss, (server_ms, aux)), (g_server, g_features) = server_grad(
        state.server_params, state.server_model_state, jax.tree.map(merge, features),
        jax.tree.map(merge, batch), server_key)
    g_features = jax.tree.map(lambda g, f: g.reshape(f.shape), g_features, features)
    if cut_grad == "average":
      g_features = jax.tree.map(lambda g: jnp.broadcast_to(g.mean(0), g.shape), g_features)
    (g_clients,) = vjp_fn(g_features)
    updates, client_opt = jax.vmap(client_tx.update)(g_clients, state.client_opt_state,
                                                      state.client_params)
    server_updates, server_opt = server_tx.update(g_server, state.server_opt_state,
                                                  state.server_params)
    state = SplitState(optax.apply_updates(state.client_params, updates), client_ms, client_opt,
                       optax.apply_updates(state.server_params, server_updates), server_ms,
                       server_opt)
    return state, {"loss": loss, **aux}

  def round_fn(state: SplitState, batches, round_key):
    time_major = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), batches)
    num_slots = jax.tree.leaves(time_major)[0].shape[0]
    step_with_key = lambda st, xs: step(st, (*xs, round_key))
    return jax.lax.scan(step_with_key, state, (time_major, jnp.arange(num_slots)))

  return round_fn
