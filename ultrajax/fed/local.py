"""SplitAVG's split-learning driver (a different algorithm from parameter mixing: the client
and server halves of one model train together at every step). Every parameter-mixing strategy
runs on the lane engine, fed/rounds.py.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ultrajax.fed import aggregate as agg


class SplitState(NamedTuple):
  """SplitAVG's carried state: per-client sub-networks [C, ...] and one server sub-network."""

  client_params: object
  client_model_state: object
  client_opt_state: object
  server_params: object
  server_model_state: object
  server_opt_state: object


def init_split_state(
  client_tx,
  server_tx,
  client_params,
  server_params,
  num_clients: int,
  client_model_state=None,
  server_model_state=None,
) -> SplitState:
  """Every client starts from the same client sub-network."""
  params = agg.broadcast(client_params, num_clients)
  return SplitState(
    params,
    agg.broadcast({} if client_model_state is None else client_model_state, num_clients),
    jax.vmap(client_tx.init)(params),
    server_params,
    {} if server_model_state is None else server_model_state,
    server_tx.init(server_params),
  )


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
      jnp.arange(num_clients)
    )
    clients = lambda p: jax.vmap(client_fn)(p, state.client_model_state, batch, keys)
    features, vjp_fn, client_ms = jax.vjp(clients, state.client_params, has_aux=True)
    server_key = jax.random.fold_in(jax.random.fold_in(key, num_clients), s)
    (loss, (server_ms, aux)), (g_server, g_features) = server_grad(
      state.server_params,
      state.server_model_state,
      jax.tree.map(merge, features),
      jax.tree.map(merge, batch),
      server_key,
    )
    g_features = jax.tree.map(lambda g, f: g.reshape(f.shape), g_features, features)
    if cut_grad == "average":
      g_features = jax.tree.map(lambda g: jnp.broadcast_to(g.mean(0), g.shape), g_features)
    (g_clients,) = vjp_fn(g_features)
    updates, client_opt = jax.vmap(client_tx.update)(
      g_clients, state.client_opt_state, state.client_params
    )
    server_updates, server_opt = server_tx.update(
      g_server, state.server_opt_state, state.server_params
    )
    state = SplitState(
      optax.apply_updates(state.client_params, updates),
      client_ms,
      client_opt,
      optax.apply_updates(state.server_params, server_updates),
      server_ms,
      server_opt,
    )
    return state, {"loss": loss, **aux}

  def round_fn(state: SplitState, batches, round_key):
    time_major = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), batches)
    num_slots = jax.tree.leaves(time_major)[0].shape[0]
    step_with_key = lambda st, xs: step(st, (*xs, round_key))
    return jax.lax.scan(step_with_key, state, (time_major, jnp.arange(num_slots)))

  return round_fn
