"""Local training of C clients at once: vmap over clients of a scan over local steps.

Works on any parameter pytree. Client c runs its first `steps_per_epoch[c]` steps of a
round; steps past that are padding, computed but discarded (`active` is False), so C, the
number of steps K per call and the batch are static and nothing recompiles.

Per-client randomness: key(round, client, step) = fold_in(fold_in(fold_in(seed_key, round),
client), step), so a resumed run draws exactly the same masks and corruptions.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ultrajax.train import optimizer

# loss_fn(params, batch, key) -> (scalar loss, aux pytree)
LossFn = Callable[..., tuple]


def round_key(seed_key, round_index):
  return jax.random.fold_in(seed_key, round_index)


def make_client_steps(loss_fn: LossFn, tx: optax.GradientTransformation,
                      lr_fn: Callable[[jax.Array], jax.Array]):
  """Returns `client_steps` for ONE client: K local steps under `lax.scan`.

  client_steps(params, opt_state, batches, active, step_ids, steps_per_epoch, round_index,
               client_key) -> (params, opt_state, losses [K])
    batches: pytree with leading axis K; active: [K] bool; step_ids: [K] int, the index of
    each step inside the round; steps_per_epoch: scalar; the learning rate of a step is
    lr_fn(round_index + step_id / steps_per_epoch), MAE's per-iteration schedule.
  Inactive steps leave params and optimizer state untouched and report loss 0.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def client_steps(params, opt_state, batches, active, step_ids, steps_per_epoch,
                   round_index, client_key):
    def step(carry, xs):
      params, opt_state = carry
      batch, is_active, step_id = xs
      epoch = round_index + step_id.astype(jnp.float32) / steps_per_epoch
      (loss, _), grads = grad_fn(params, batch, jax.random.fold_in(client_key, step_id))
      new_opt_state = optimizer.set_lr(opt_state, lr_fn(epoch))
      updates, new_opt_state = tx.update(grads, new_opt_state, params)
      new_params = optax.apply_updates(params, updates)
      keep = lambda new, old: jnp.where(is_active, new, old)
      carry = jax.tree.map(keep, (new_params, new_opt_state), (params, opt_state))
      return carry, jnp.where(is_active, loss, 0.0)

    (params, opt_state), losses = jax.lax.scan(
        step, (params, opt_state), (batches, active, step_ids))
    return params, opt_state, losses

  return client_steps


def make_round_chunk(client_steps):
  """vmaps `client_steps` over the leading client axis of params, states, batches.

  chunk(params [C..], opt_state [C..], batches [C, K, ..], active [C, K], step_ids [K],
        steps_per_epoch [C], round_index, round_key) -> (params, opt_state, losses [C, K])
  """
  def chunk(params, opt_state, batches, active, step_ids, steps_per_epoch, round_index,
            key):
    num_clients = active.shape[0]
    client_keys = jax.vmap(lambda c: jax.random.fold_in(key, c))(jnp.arange(num_clients))
    return jax.vmap(client_steps, in_axes=(0, 0, 0, 0, None, 0, None, 0))(
        params, opt_state, batches, active, step_ids, steps_per_epoch, round_index,
        client_keys)
  return chunk


def active_steps(steps_per_epoch, start: int, num_steps: int):
  """[C, K] bool: which of steps start..start+K-1 each client runs in this round."""
  step_ids = np.arange(start, start + num_steps)
  return step_ids[None, :] < np.asarray(steps_per_epoch)[:, None]
