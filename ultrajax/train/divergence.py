"""Divergence: a non-finite loss or gradient stops the run, or has its step skipped.

config.on_nonfinite = 'stop' (default): the job raises DivergenceError naming the round or
epoch and the step, before anything of that round is logged or saved, so the last checkpoint
stays the last good one. 'skip': a step whose loss or gradient is not finite leaves the params
and optimizer state unchanged (the update is dropped on device, `keep_if`); the job counts the
skipped steps in its metrics and raises only when every step of a round was skipped.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ultrajax import configlib

MODES = ("stop", "skip")


class DivergenceError(FloatingPointError, configlib.ConfigError):
  """Training produced a non-finite loss or gradient; names where. A user error (reported in
  one line): the fix is in the config (learning rate, on_nonfinite)."""


def global_norm(tree):
  """L2 norm over every leaf of one (unstacked) pytree, float32 scalar."""
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def finite_and_norm(loss, grads):
  """(finite, norm): whether the loss and every gradient entry are free of NaN and inf, and
  the gradient's global L2 norm, from one pass over the gradient. A NaN or inf entry makes the
  sum of squares non-finite; so does a norm beyond float32's range (about 1.8e19), which counts
  as divergence too. (A per-leaf isfinite beside optax.global_norm made XLA:CPU pass over the
  gradient several times: 82 against 18 ms for MAE-B's gradient, docs/benchmarks.md.)"""
  norm = global_norm(grads)
  return jnp.isfinite(loss) & jnp.isfinite(norm), norm


def keep_if(ok, new, old):
  """`new` where the scalar `ok` holds, else `old` (leafwise; same structure)."""
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def apply_update(tx, grads, opt_state, params, ok, mode: str):
  """(new params, new optimizer state) after one optax step; with mode 'skip' both stay as they
  were where the scalar `ok` (loss and gradient finite) is false."""
  updates, new_opt = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  if mode == "skip":
    return keep_if(ok, (new_params, new_opt), (params, opt_state))
  return new_params, new_opt


def screen(
  losses: np.ndarray,
  active: np.ndarray,
  *,
  where: str,
  mode: str,
  describe: Callable[[tuple], str] = lambda i: f"step {i[-1]}",
) -> np.ndarray:
  """The steps to count: active and finite.  losses, active: [..., T] (T = time, last axis).

  A non-finite loss marks a step whose loss or gradient was not finite (the training steps
  report NaN for both). mode 'stop' raises DivergenceError at the earliest such step,
  `describe(index)` naming it; 'skip' returns the mask, raising only if no step is left.
  """
  losses, active = np.asarray(losses), np.asarray(active, bool)
  bad = active & ~np.isfinite(losses)
  valid = active & ~bad
  if not bad.any():
    return valid
  hits = np.argwhere(bad)
  first = tuple(int(v) for v in hits[np.argmin(hits[:, -1])])
  what = (
    f"{where}: non-finite loss or gradient at {describe(first)} ({int(bad.sum())} of "
    f"{int(active.sum())} steps)"
  )
  if mode == "stop" or not valid.any():
    raise DivergenceError(
      f"{what}; stopped before logging or saving it, so the last checkpoint is the last good "
      "one. Lower the learning rate, or set config.on_nonfinite='skip' to drop such steps' "
      "updates" + (" (here every step was non-finite)" if mode == "skip" else "")
    )
  return valid
