"""Differential privacy for federated rounds: update clipping and noise, adaptive clipping, a
`dp-accounting` accountant, and example-level DP-SGD for a local step.

Pure functions on pytrees (a "client tree" has leaves [C, ...], one slice per client), called by
the engine's strategies (fed/protected.py: dp_fedavg, dp_secagg, DP-SGD) from the server update
or the local step. Which unit is protected: client-level DP-FedAvg protects a whole client (a
hospital) against the server and anyone who sees the model; DP-SGD protects one example inside
a client. The accountant only knows the mechanism it is given: say which one a reported epsilon
refers to.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import dp_accounting
import jax
import jax.numpy as jnp

from ultrajax import configlib
from ultrajax.train import divergence

SAMPLINGS = ("poisson", "fixed")
ACCOUNTANTS = ("rdp", "pld")


def clip_update(tree, clip_norm):
  """Scales one update so its global L2 norm is <= clip_norm: D * min(1, C / ||D||).
  Returns (clipped tree, norm before clipping)."""
  norm = divergence.global_norm(tree)
  scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-30))
  return jax.tree.map(lambda x: (x * scale).astype(x.dtype), tree), norm


def clip_updates(client_tree, clip_norm):
  """clip_update on every client: leaves [C, ...] -> (clipped [C, ...], norms [C])."""
  return jax.vmap(clip_update, in_axes=(0, None))(client_tree, clip_norm)


def add_noise(tree, std, key):
  """tree + N(0, std^2) on every coordinate (float32), one independent key per leaf."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  noisy = [
    (x.astype(jnp.float32) + std * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
    for x, k in zip(leaves, keys)
  ]
  return jax.tree.unflatten(treedef, noisy)


def adaptive_clip_from_count(
  clip_norm, unclipped, denominator, target_quantile: float, lr: float, sigma_b: float, key
):
  """Geometric quantile clipping (Andrew et al. 2021, Alg. 1): returns (new C, noised b_bar).

  unclipped: the count of updates with ||D_k|| <= C (NOT clipped); b_bar = (count + N(0,
  sigma_b^2)) / denominator, clamped to [0, 1]; C <- C * exp(-lr * (b_bar - gamma)). More
  unclipped clients than the target quantile gamma means C is above that quantile, so it
  shrinks, and vice versa. Under Poisson sampling the denominator must be the expected number
  of participants (the actual count would leak who took part).
  (Flower 1.28's `dp_adaptive_clipping.py` puts the *clipped* fraction in the same formula and
  so moves C the wrong way; TF Privacy's QuantileEstimatorQuery, behind TFF's adaptive
  aggregator, uses `record <= estimate`, as here.)
  The clip norm must be the one used for this round's clipping, so noise and C stay consistent.
  """
  b_bar = (unclipped + sigma_b * jax.random.normal(key, (), jnp.float32)) / jnp.maximum(
    denominator, 1.0
  )
  b_bar = jnp.clip(b_bar, 0.0, 1.0)  # noise can push it outside; TF Privacy clamps as well
  return clip_norm * jnp.exp(-lr * (b_bar - target_quantile)), b_bar


def adaptive_noise_multiplier(noise_multiplier: float, sigma_b: float) -> float:
  """Noise multiplier left for the update when the clipped-fraction count also costs privacy:
  z_D = (z^-2 - (2 sigma_b)^-2)^(-1/2) (Andrew et al. 2021, Thm. 1); z is what the accountant
  charges per round. Raises ConfigError when sigma_b is too small to leave any budget."""
  rest = noise_multiplier**-2 - (2.0 * sigma_b) ** -2
  if rest <= 0:
    raise configlib.ConfigError(
      f"sigma_b={sigma_b!r} is too small for noise_multiplier={noise_multiplier!r}: "
      f"need 2 * sigma_b > noise_multiplier"
    )
  return rest**-0.5


@dataclasses.dataclass(frozen=True)
class Accountant:
  """(epsilon, delta) of T rounds (or steps) of a sampled Gaussian mechanism, from dp-accounting.

  noise_multiplier: z (std / sensitivity) charged per round.
  sampling: 'poisson' (rate q, add/remove-one neighbours) or 'fixed' (sample_size of population
    without replacement, replace-one neighbours; RDP only, dp-accounting's PLD lacks it).
  kind: 'rdp' (Mironov 2017; dp-accounting's default orders and conversion) or 'pld'.
  The state is the round count alone: epsilon is re-derived from it and these fields, so a
  checkpoint stores `state(rounds)` and a resume calls `check_state`.
  """

  noise_multiplier: float
  delta: float
  sampling: str = "poisson"
  sampling_rate: float = 1.0
  population: int = 0
  sample_size: int = 0
  kind: str = "rdp"
  epsilon_budget: float = math.inf
  pld_discretization: float = 1e-4

  def __post_init__(self):
    bad = configlib.ConfigError
    if self.kind not in ACCOUNTANTS:
      raise bad(f"accountant kind={self.kind!r} is not one of {ACCOUNTANTS}")
    if self.sampling not in SAMPLINGS:
      raise bad(f"sampling={self.sampling!r} is not one of {SAMPLINGS}")
    if not self.noise_multiplier > 0:
      raise bad(f"noise_multiplier={self.noise_multiplier!r} must be > 0 for an accountant")
    if not 0.0 < self.delta < 1.0:
      raise bad(f"delta={self.delta!r} is not in (0, 1)")
    if self.sampling == "poisson" and not 0.0 < self.sampling_rate <= 1.0:
      raise bad(f"sampling_rate={self.sampling_rate!r} is not in (0, 1]")
    if self.sampling == "fixed":
      if not 0 < self.sample_size <= self.population:
        raise bad(f"sample_size={self.sample_size!r} is not in [1, population={self.population!r}]")
      if self.kind == "pld":
        raise bad(
          "sampling='fixed' needs kind='rdp': dp-accounting's PLD accountant does not "
          "support sampling without replacement"
        )
    if not self.epsilon_budget > 0:
      raise bad(f"epsilon_budget={self.epsilon_budget!r} must be > 0")

  def event(self) -> dp_accounting.DpEvent:
    """One round's DpEvent."""
    gauss = dp_accounting.GaussianDpEvent(self.noise_multiplier)
    if self.sampling == "fixed":
      return dp_accounting.SampledWithoutReplacementDpEvent(
        self.population, self.sample_size, gauss
      )
    if self.sampling_rate == 1.0:
      return gauss
    return dp_accounting.PoissonSampledDpEvent(self.sampling_rate, gauss)

  def _accountant(self):
    if self.sampling == "fixed":
      relation = dp_accounting.NeighboringRelation.REPLACE_ONE
    else:
      relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    if self.kind == "rdp":
      return dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    return dp_accounting.pld.PLDAccountant(
      relation, value_discretization_interval=self.pld_discretization
    )

  def epsilon(self, rounds: int) -> float:
    """epsilon at `delta` after `rounds` rounds (0 rounds: 0)."""
    if rounds <= 0:
      return 0.0
    acc = self._accountant()
    acc.compose(self.event(), int(rounds))
    return float(acc.get_epsilon(self.delta))

  def would_exceed(self, rounds_done: int) -> bool:
    """True when running one more round would take epsilon above epsilon_budget."""
    return self.epsilon(rounds_done + 1) > self.epsilon_budget

  def state(self, rounds: int) -> dict:
    """What a checkpoint stores: the round count and the mechanism it was counted for."""
    return {
      "rounds": int(rounds),
      **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
    }

  def check_state(self, state: dict) -> int:
    """The round count of a saved `state`; ConfigError if it was counted for another mechanism
    (a changed noise multiplier or sampling would make the saved count meaningless)."""
    for f in dataclasses.fields(self):
      if f.name in state and state[f.name] != getattr(self, f.name):
        raise configlib.ConfigError(
          f"privacy accountant: checkpoint was counted with {f.name}={state[f.name]!r}, the "
          f"config has {getattr(self, f.name)!r}"
        )
    return int(state["rounds"])


def dp_sgd_accountant(
  batch_size: int, num_examples: int, noise_multiplier: float, delta: float, **kw
) -> Accountant:
  """Accountant for example-level DP-SGD in one client: Poisson rate batch / n_k per step
  (count steps, not rounds). Fixed-size shuffled batches are only approximated by this."""
  if not 0 < batch_size <= num_examples:
    raise configlib.ConfigError(
      f"batch_size={batch_size!r} is not in [1, num_examples={num_examples!r}]"
    )
  return Accountant(
    noise_multiplier=noise_multiplier, delta=delta, sampling_rate=batch_size / num_examples, **kw
  )


@functools.lru_cache(maxsize=4096)
def dp_sgd_epsilon(
  batch_size: int, num_examples: int, noise_multiplier: float, delta: float, kind: str, steps: int
) -> float:
  """epsilon at delta of `steps` DP-SGD steps in one client (dp_sgd_accountant), cached: a job
  asks for every client after every round."""
  acct = dp_sgd_accountant(batch_size, num_examples, noise_multiplier, delta, kind=kind)
  return acct.epsilon(steps)


def dp_sgd_value_and_grad(loss_fn, clip_norm: float, noise_multiplier: float):
  """The engine's LossFn (fed/rounds.py) -> its DP-SGD value_and_grad for one local step.

  Returns f(params, model_state, batch, key) -> ((loss, (model_state, aux)), grads): the
  loss_fn of each example alone (a batch of one) with its own key, its gradient clipped to
  L2 norm C, summed, plus N(0, (z C)^2) (add_noise's, one key per leaf), divided by B. From the step's
  key: example_key, noise_key = split(key); example i gets split(example_key, B)[i]. loss and
  aux are the means over the examples. The B per-example gradients are held at once (B x the
  model's size in memory). Model state (BatchNorm statistics of a batch) would leak the batch
  unclipped and unnoised, so a non-empty one is refused.
  """
  grad_one = jax.value_and_grad(loss_fn, has_aux=True)

  def value_and_grad(params, model_state, batch, key):
    if jax.tree.leaves(model_state):
      raise ValueError(
        "dp_sgd: the model has state besides its parameters (BatchNorm statistics?), which "
        "example-level DP-SGD cannot protect; use a model without it (GroupNorm/LayerNorm)"
      )
    size = jax.tree.leaves(batch)[0].shape[0]
    example_key, noise_key = jax.random.split(key)

    def one(example, k):
      return grad_one(params, model_state, jax.tree.map(lambda x: x[None], example), k)

    (losses, (_, aux)), grads = jax.vmap(one)(batch, jax.random.split(example_key, size))
    aux = None if aux is None else jax.tree.map(lambda a: a.mean(axis=0), aux)
    clipped, _ = clip_updates(grads, clip_norm)
    total = jax.tree.map(lambda g: g.sum(axis=0), clipped)
    noisy = add_noise(total, noise_multiplier * clip_norm, noise_key)
    grads = jax.tree.map(lambda g: g / size, noisy)
    return (losses.mean(), (model_state, aux)), grads

  return value_and_grad
