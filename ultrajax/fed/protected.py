"""Privacy and robustness as strategies of the federated engine (issue 20; hooks: fed/strategies.py).

DP-FedAvg, the robust rules over screened updates (fed/robust.py), simulated secure aggregation
(fed/secagg.py) and DP through it are registered by name for `fed.strategy` at the end of this
file (options through `fed.strategy_options`; docs/privacy.md). `wrap` puts the job config's
wrappers around any of the engine's strategies: DPSGD (config.dp_sgd) and ScaledClients
(config.fed.attack, simulation only).

State that must survive a resume (the accountant's round count, the clip norm, the secure
aggregation round counter) lives in the strategy state, which the jobs checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.flatten_util import ravel_pytree

from ultrajax import configlib
from ultrajax.fed import aggregate, participation, privacy, robust, secagg, strategies
from ultrajax.fed.strategies import Finished, Server

RULES = ("mean", "median", "trimmed_mean", "krum", "norm_bound")


def _delta(done: Finished, server: Server):
  """(params, model state) of the client minus the server's, float32."""
  sub = lambda y, x: y.astype(jnp.float32) - jnp.asarray(x, jnp.float32)
  return (
    jax.tree.map(sub, done.params, server.params),
    jax.tree.map(sub, done.model_state, server.model_state),
  )


def _no_keep_local(strategy) -> None:
  # Their on_client_done replaces FedAvg's, which stores the kept leaves: refuse, not ignore.
  if strategy.keep_local:
    raise ValueError(f"{strategy.name}: keep_local is not supported (every leaf is aggregated)")


def _check_fields(strategy, *checks) -> None:
  """Raises ValueError naming the strategy and the first field of `checks`, (field, ok, want),
  that is not ok."""
  for field, ok, want in checks:
    if not ok:
      raise ValueError(f"{strategy.name}: {field}={getattr(strategy, field)!r} must be {want}")


def _plus(server_tree, delta):
  return jax.tree.map(
    lambda x, d: (jnp.asarray(x, jnp.float32) + d).astype(jnp.asarray(x).dtype), server_tree, delta
  )


# ----------------------------------------------------------------------------- DP-FedAvg
@dataclasses.dataclass(frozen=True)
class DPFedAvg(strategies.FedAvg):
  """Client-level DP-FedAvg with fixed or adaptive clipping and an accountant.

  clip_norm: C (the initial C when adaptive). noise_multiplier: z, what the accountant charges
  per round; with adaptive clipping the update gets z_D = (z^-2 - (2 sigma_b)^-2)^-1/2 and the
  unclipped count sigma_b (Andrew et al. 2021, Thm. 1). clip_count_stddev: sigma_b (0: m / 20,
  the paper's choice). delta, accountant ('rdp' | 'pld'), epsilon_budget (0: none).
  Uniform weights only: the fixed denominator m bounds one client's influence to C / m.
  expected_participants, sampling, sampling_rate, population, sample_size: set by `for_run`
  from the job's participation fields, not by hand; without it, every client takes part every
  round (m = C, no subsampling in the accountant: conservative if the job samples).
  """

  name: str = "dp_fedavg"
  weighting: str = "uniform"
  clip_norm: float = 1.0
  noise_multiplier: float = 1.0
  adaptive: bool = False
  target_quantile: float = 0.5
  clip_lr: float = 0.2
  clip_count_stddev: float = 0.0
  delta: float = 1e-5
  accountant: str = "rdp"
  epsilon_budget: float = 0.0
  expected_participants: float = 0.0
  sampling: str = "poisson"
  sampling_rate: float = 1.0
  population: int = 0
  sample_size: int = 0

  def __post_init__(self):
    _no_keep_local(self)
    _check_fields(
      self,
      ("weighting", self.weighting == "uniform", "'uniform' (m bounds each client's influence)"),
      ("clip_norm", self.clip_norm > 0, "> 0"),
      ("noise_multiplier", self.noise_multiplier > 0, "> 0"),
      ("target_quantile", 0 < self.target_quantile < 1, "in (0, 1)"),
      ("clip_lr", self.clip_lr > 0, "> 0"),
      ("clip_count_stddev", self.clip_count_stddev >= 0, ">= 0"),
      ("epsilon_budget", self.epsilon_budget >= 0, ">= 0 (0: none)"),
      ("accountant", self.accountant in privacy.ACCOUNTANTS, f"one of {privacy.ACCOUNTANTS}"),
      ("delta", 0 < self.delta < 1, "in (0, 1)"),
    )
    if self.adaptive and self.clip_count_stddev:  # sigma_b too small for z fails here
      privacy.adaptive_noise_multiplier(self.noise_multiplier, self.clip_count_stddev)

  def constants(self, num_clients: int) -> dict:
    """m (expected participants; all C before `for_run`), sigma_b (m / 20 when not given) and
    the update's noise multiplier z_D (z without adaptive clipping)."""
    m = self.expected_participants or float(num_clients)
    sigma_b = self.clip_count_stddev or m / 20.0
    z = (
      privacy.adaptive_noise_multiplier(self.noise_multiplier, sigma_b)
      if self.adaptive
      else self.noise_multiplier
    )
    return {"m": m, "sigma_b": sigma_b, "z_update": z}

  def for_run(self, num_clients: int, clients_per_round, sampling: str) -> DPFedAvg:
    """This strategy for the job's population and participation (config.fed)."""
    if sampling == "poisson":
      m = clients_per_round * num_clients
      fields = dict(sampling="poisson", sampling_rate=float(clients_per_round))
    elif sampling == "uniform":
      m = participation.count(clients_per_round, num_clients)
      fields = (
        dict(sampling="poisson", sampling_rate=1.0)
        if m == num_clients
        else dict(sampling="fixed", population=num_clients, sample_size=m)
      )
    else:
      raise configlib.ConfigError(
        f"config.fed.sampling={sampling!r}: dp_fedavg needs 'poisson' or 'uniform' sampling "
        "(the accountant has no model of volume-proportional draws)"
      )
    out = dataclasses.replace(self, expected_participants=float(m), **fields)
    out.privacy_accountant()  # a mechanism dp-accounting cannot account fails at start-up
    out.constants(num_clients)  # so does an adaptive sigma_b too small for z
    return out

  def privacy_accountant(self) -> privacy.Accountant:
    return privacy.Accountant(
      noise_multiplier=self.noise_multiplier,
      delta=self.delta,
      sampling=self.sampling,
      sampling_rate=self.sampling_rate,
      population=self.population,
      sample_size=self.sample_size,
      kind=self.accountant,
      epsilon_budget=self.epsilon_budget or math.inf,
    )

  def _init(self, server_params, num_clients):
    del server_params
    const = {k: jnp.asarray(v, jnp.float32) for k, v in self.constants(num_clients).items()}
    return {
      "dp": {
        "clip_norm": jnp.asarray(self.clip_norm, jnp.float32),
        "rounds": jnp.zeros((), jnp.int32),
        # The noisy unclipped fraction of the last round (adaptive clipping only; 0 before the
        # first round and without it: a NaN sentinel would make checkpoints refuse the state).
        "unclipped": jnp.zeros((), jnp.float32),
        **const,
      }
    }

  def accumulator(self, state, server: Server, num_clients: int):
    return dict(
      super().accumulator(state, server, num_clients), unclipped=jnp.zeros((), jnp.float32)
    )

  def on_client_done(self, acc, state, server: Server, done: Finished):
    """acc['params'] += clip(y_k - x, C) (unweighted); model state as FedAvg."""
    delta, _ = _delta(done, server)
    clip = state["dp"]["clip_norm"]
    clipped, norm = privacy.clip_update(delta, clip)
    acc = dict(
      acc,
      params=jax.tree.map(jnp.add, acc["params"], clipped),
      model_state=strategies._add_weighted(acc["model_state"], done.weight, done.model_state),
      weight=acc["weight"] + done.weight,
      unclipped=acc["unclipped"] + (norm <= clip).astype(jnp.float32),
    )
    return acc, state

  def server_update(self, acc, state, server: Server, key=None):
    dp = state["dp"]
    m, clip = dp["m"], dp["clip_norm"]
    noise_key, count_key = jax.random.split(key)
    std = dp["z_update"] * clip / m
    mean = privacy.add_noise(jax.tree.map(lambda s: s / m, acc["params"]), std, noise_key)
    params = _plus(server.params, mean)
    model_state = self.mean(acc, server).model_state
    new_clip, b_bar = clip, jnp.zeros((), jnp.float32)
    if self.adaptive:
      new_clip, b_bar = privacy.adaptive_clip_from_count(
        clip, acc["unclipped"], m, self.target_quantile, self.clip_lr, dp["sigma_b"], count_key
      )
    dp = dict(
      dp,
      clip_norm=new_clip.astype(jnp.float32),
      rounds=dp["rounds"] + 1,
      unclipped=b_bar.astype(jnp.float32),
    )
    return Server(params, strategies._like(model_state, server.model_state)), dict(state, dp=dp)

  # --------------------------------------------------------------- host side
  def stop_reason(self, rounds_done: int, state=None) -> str | None:
    del state  # the accountant counts rounds, which the job passes
    if not self.epsilon_budget:
      return None
    acct = self.privacy_accountant()
    if not acct.would_exceed(rounds_done):
      return None
    return (
      f"privacy budget: round {rounds_done + 1} would bring epsilon to "
      f"{acct.epsilon(rounds_done + 1):.4g} > epsilon_budget={self.epsilon_budget:g} at "
      f"delta={self.delta:g} ({self.accountant}); stopping after {rounds_done} rounds "
      f"(epsilon {acct.epsilon(rounds_done):.4g})"
    )

  def report(self, state, rounds_done: int) -> dict:
    del rounds_done  # the state's own count is the one checkpointed with it
    state = jax.device_get(state)
    rounds = int(state["dp"]["rounds"])
    out = {
      "dp/epsilon": self.privacy_accountant().epsilon(rounds),
      "dp/clip_norm": float(state["dp"]["clip_norm"]),
    }
    if self.adaptive:
      out["dp/unclipped_fraction"] = float(state["dp"]["unclipped"])
    return out


# ----------------------------------------------------------------------------- robust rules
@dataclasses.dataclass(frozen=True)
class Robust(strategies.FedAvg):
  """A robust rule over the screened updates of the clients that finished the round.

  rule: 'mean' (weighted FedAvg), 'median', 'trimmed_mean' (beta), 'krum' (num_byzantine f,
  num_selected m; 0 = C - f, Multi-Krum's usual choice), 'norm_bound' (max_norm, weighted).
  screen_factor: exclude updates with a NaN/inf or a norm > screen_factor x the median norm
  of the finite ones; 0 turns the whole screen off (the rule alone must then cope).
  """

  name: str = "median"
  rule: str = "median"
  beta: float = 0.1
  num_byzantine: int = 1
  num_selected: int = 0
  max_norm: float = 1.0
  screen_factor: float = 100.0

  def __post_init__(self):
    _no_keep_local(self)
    robust.check_beta(self.beta)
    _check_fields(
      self,
      ("rule", self.rule in RULES, f"one of {RULES}"),
      ("num_byzantine", self.num_byzantine >= 0, ">= 0"),
      ("num_selected", self.num_selected >= 0, ">= 0"),
      ("max_norm", self.max_norm > 0, "> 0"),
      ("screen_factor", self.screen_factor >= 0, ">= 0"),
    )

  def _selected(self, num_clients: int) -> int:
    return self.num_selected or num_clients - self.num_byzantine

  def _init(self, server_params, num_clients):
    del server_params
    if self.rule == "krum":
      robust.check_krum(num_clients, self.num_byzantine, self._selected(num_clients))
    zero = jnp.zeros((), jnp.int32)
    return {
      "screen": {
        "nonfinite": zero,
        "too_large": zero,
        "excluded_total": zero,
        "excluded": jnp.zeros((num_clients,), bool),
      }
    }

  def accumulator(self, state, server: Server, num_clients: int):
    del state
    stack = lambda t: aggregate.broadcast(strategies._zeros(t), num_clients)
    return {
      "clients": {"params": stack(server.params), "model_state": stack(server.model_state)},
      "done": jnp.zeros((num_clients,), bool),
      "weights": jnp.zeros((num_clients,)),
    }

  def on_client_done(self, acc, state, server: Server, done: Finished):
    delta, _ = _delta(done, server)
    row = {"params": delta, "model_state": done.model_state}
    return {
      "clients": strategies._store(acc["clients"], done.index, row),
      "done": acc["done"].at[done.index].set(True),
      "weights": acc["weights"].at[done.index].set(done.weight),
    }, state

  def server_update(self, acc, state, server: Server, key=None):
    del key
    updates, finished = acc["clients"]["params"], acc["done"]
    if self.screen_factor > 0:
      ok, w, report = robust.screen(updates, acc["weights"], self.screen_factor, finished)
    else:
      ok, w = finished, robust._renormalise(acc["weights"], finished)
      report = {"nonfinite": jnp.zeros_like(finished), "too_large": jnp.zeros_like(finished)}
    num = finished.shape[0]
    wmean = lambda x: jnp.tensordot(w, jnp.where(robust._column(ok, x), x, 0.0), axes=(0, 0))
    if self.rule == "median":
      agg = robust.coordinate_median(updates, ok)
    elif self.rule == "trimmed_mean":
      agg = robust.trimmed_mean(updates, self.beta, ok)
    elif self.rule == "krum":
      agg, _ = robust.krum(updates, self.num_byzantine, self._selected(num), w, ok)
    elif self.rule == "norm_bound":
      agg = robust.norm_bounded_mean(updates, w, self.max_norm, ok)
    else:
      agg = jax.tree.map(wmean, updates)
    some = ok.any()
    params = _plus(server.params, jax.tree.map(lambda d: jnp.where(some, d, 0.0), agg))
    model_state = jax.tree.map(
      lambda x, s: jnp.where(some, wmean(x), jnp.asarray(s, jnp.float32)),
      acc["clients"]["model_state"],
      server.model_state,
    )
    excluded = finished & ~ok
    screen = {
      "nonfinite": report["nonfinite"].sum().astype(jnp.int32),
      "too_large": report["too_large"].sum().astype(jnp.int32),
      "excluded_total": state["screen"]["excluded_total"] + excluded.sum().astype(jnp.int32),
      "excluded": excluded,
    }
    return (
      Server(params, strategies._like(model_state, server.model_state)),
      dict(state, screen=screen),
    )

  def report(self, state, rounds_done: int) -> dict:
    del rounds_done
    s = jax.device_get(state)["screen"]
    ids = np.flatnonzero(np.asarray(s["excluded"]))
    if ids.size:
      logging.warning(
        "%s: clients %s excluded from the round (non-finite update: %d, norm above "
        "%g x the median: %d)",
        self.name,
        ids.tolist(),
        int(s["nonfinite"]),
        self.screen_factor,
        int(s["too_large"]),
      )
    return {
      "screen/nonfinite": int(s["nonfinite"]),
      "screen/too_large": int(s["too_large"]),
      "screen/excluded": int(ids.size),
      "screen/excluded_total": int(s["excluded_total"]),
    }


# ----------------------------------------------------------------------------- secure aggregation
def _pair_mask(secrets, u, v, round_index, size: int, ring_mask):
  """The mask client u adds for client v, uint32 [size] in Z_R: PRG(s_uv) when v > u, -PRG(s_uv)
  when v < u, so a pair's masks cancel in the sum. The pair's key hashes both clients' secrets
  (in id order, so u and v derive the same stream) and the round, like a per-round DH-derived
  seed."""
  lo, hi = jnp.minimum(u, v), jnp.maximum(u, v)
  key = jax.random.fold_in(jax.random.key(0x5EC), round_index)
  key = jax.random.fold_in(jax.random.fold_in(key, secrets[lo]), secrets[hi])
  m = jax.random.bits(key, (size,), jnp.uint32) & ring_mask
  return jnp.where(v > u, m, (jnp.uint32(0) - m) & ring_mask)


@dataclasses.dataclass(frozen=True)
class SecureAvg(strategies.FedAvg):
  """FedAvg through pairwise-masked secure aggregation (fed/secagg.py's protocol, in JAX).

  bits (<= 32), clip_range (bound on w_k D_k values), max_clients (headroom: the sum of that
  many uploads never wraps); secret_seed draws the clients' secrets. The masks of every pair
  cost C^2 PRG streams of the update's size per round: a simulation, not a fast path.
  """

  name: str = "secagg"
  bits: int = 32
  clip_range: float = 8.0
  max_clients: int = 16
  secret_seed: int = 0

  def __post_init__(self):
    _no_keep_local(self)
    self.ring()  # ConfigError (a ValueError) naming the bad field

  def ring(self) -> secagg.SecAggConfig:
    return secagg.SecAggConfig(self.bits, self.clip_range, self.max_clients)

  def _ring_mask(self):
    return jnp.asarray((1 << self.bits) - 1 if self.bits < 32 else 0xFFFFFFFF, jnp.uint32)

  def _init(self, server_params, num_clients):
    del server_params
    if num_clients > self.max_clients:
      raise ValueError(f"secagg: {num_clients} clients exceed max_clients={self.max_clients}")
    secrets = (
      np.random.default_rng([self.secret_seed, 0x5EC])
      .integers(0, 2**32, num_clients, dtype=np.uint64)
      .astype(np.uint32)
    )
    return {"secagg": {"secrets": jnp.asarray(secrets), "round": jnp.zeros((), jnp.int32)}}

  def accumulator(self, state, server: Server, num_clients: int):
    size = 1 + ravel_pytree((server.params, server.model_state))[0].size
    return {"masked": jnp.zeros((size,), jnp.uint32), "done": jnp.zeros((num_clients,), bool)}

  def encode(self, vec):
    """float32 [D] -> uint32 [D] in Z_R: round(clip(x) * scale), two's complement mod R."""
    cfg = self.ring()
    q = jnp.round(jnp.clip(vec, -cfg.clip_range, cfg.clip_range) * cfg.scale).astype(jnp.int32)
    return jax.lax.bitcast_convert_type(q, jnp.uint32) & self._ring_mask()

  def decode(self, total):
    """uint32 [D] in Z_R -> float32: values >= R/2 are negative."""
    cfg = self.ring()
    if self.bits == 32:
      signed = jax.lax.bitcast_convert_type(total, jnp.int32).astype(jnp.float32)
    else:
      t = total.astype(jnp.int32)
      signed = jnp.where(t >= cfg.modulus // 2, t - cfg.modulus, t).astype(jnp.float32)
    return signed / cfg.scale

  def message(self, state, server: Server, done: Finished):
    """What client done.index wants summed, float32 [D]: [w, w D] (params, model state)."""
    del state
    delta, ms_delta = _delta(done, server)
    flat = ravel_pytree((delta, ms_delta))[0]
    return jnp.concatenate([done.weight[None], done.weight * flat])

  def upload(self, state, server: Server, done: Finished, num_clients: int):
    """What client done.index sends: encode(message) + sum_{v > u} PRG - sum_{v < u} PRG."""
    y = self.encode(self.message(state, server, done))
    s = state["secagg"]
    u, ring_mask = done.index, self._ring_mask()

    def add_pair(v, y):
      term = _pair_mask(s["secrets"], u, v, s["round"], y.size, ring_mask)
      return jnp.where(v == u, y, (y + term) & ring_mask)

    return jax.lax.fori_loop(0, num_clients, add_pair, y)

  def on_client_done(self, acc, state, server: Server, done: Finished):
    up = self.upload(state, server, done, acc["done"].shape[0])
    return {
      "masked": (acc["masked"] + up) & self._ring_mask(),
      "done": acc["done"].at[done.index].set(True),
    }, state

  def unmask(self, acc, state):
    """The sum of the uploads minus every mask a survivor u shares with a client d that never
    uploaded (what d's revealed pair seeds let the server compute)."""
    s, done, ring_mask = state["secagg"], acc["done"], self._ring_mask()
    num = done.shape[0]

    def fix(i, total):
      u, d = i // num, i % num
      term = _pair_mask(s["secrets"], u, d, s["round"], total.size, ring_mask)
      dangling = done[u] & ~done[d] & (u != d)
      return jnp.where(dangling, (total - term) & ring_mask, total)

    return jax.lax.fori_loop(0, num * num, fix, acc["masked"])

  def server_update(self, acc, state, server: Server, key=None):
    del key
    total = self.decode(self.unmask(acc, state))
    weight = total[0]
    some = weight > 0
    _, unravel = ravel_pytree((server.params, server.model_state))
    delta, ms_delta = unravel(jnp.where(some, total[1:] / jnp.where(some, weight, 1.0), 0.0))
    new = Server(_plus(server.params, delta), _plus(server.model_state, ms_delta))
    s = state["secagg"]
    return new, dict(state, secagg=dict(s, round=s["round"] + 1))


# ----------------------------------------------------------------------------- DP + SecAgg
@dataclasses.dataclass(frozen=True)
class DPSecureAvg(DPFedAvg, SecureAvg):
  """DP-FedAvg whose sum goes through secure aggregation (distributed DP; docs/privacy.md).

  The server never sees one client's update, so each client clips D_k to C and adds its own
  share N(0, (z C)^2 / m) before quantising and masking: the m expected participants' shares
  sum to N(0, (z C)^2), DP-FedAvg's noise on the sum, and the server divides the unmasked sum by
  m. Fewer uploads than m leave less noise than accounted, so Poisson sampling (a random
  cohort size) is refused; fixed clipping only (the adaptive clip's count would need its own
  secure sum). Each client's noise key comes from its own secret and the round.
  """

  name: str = "dp_secagg"

  def __post_init__(self):
    DPFedAvg.__post_init__(self)
    SecureAvg.__post_init__(self)
    if self.adaptive:
      raise ValueError("dp_secagg: adaptive=True is not supported (fixed clip_norm only)")

  def for_run(self, num_clients: int, clients_per_round, sampling: str) -> DPSecureAvg:
    if sampling == "poisson":
      raise configlib.ConfigError(
        "config.fed.sampling='poisson': dp_secagg's clients add noise shares for a cohort of "
        "known size; use 'uniform' sampling"
      )
    return DPFedAvg.for_run(self, num_clients, clients_per_round, sampling)

  def _init(self, server_params, num_clients):
    return {
      **DPFedAvg._init(self, server_params, num_clients),
      **SecureAvg._init(self, server_params, num_clients),
    }

  def accumulator(self, state, server: Server, num_clients: int):
    return SecureAvg.accumulator(self, state, server, num_clients)

  def on_client_done(self, acc, state, server: Server, done: Finished):
    return SecureAvg.on_client_done(self, acc, state, server, done)

  def noise_key(self, state, client):
    """Client `client`'s key for this round's noise share."""
    s = state["secagg"]
    key = jax.random.fold_in(jax.random.key(0xD95EC), s["secrets"][client])
    return jax.random.fold_in(key, s["round"])

  def message(self, state, server: Server, done: Finished):
    """[w, clip(D, C) + N(0, (z C)^2 / m), w D_state]."""
    delta, ms_delta = _delta(done, server)
    dp = state["dp"]
    clipped, _ = privacy.clip_update(delta, dp["clip_norm"])
    std = dp["z_update"] * dp["clip_norm"] / jnp.sqrt(dp["m"])
    noisy = privacy.add_noise(clipped, std, self.noise_key(state, done.index))
    weighted_ms = jax.tree.map(lambda x: done.weight * x, ms_delta)
    return jnp.concatenate([done.weight[None], ravel_pytree((noisy, weighted_ms))[0]])

  def server_update(self, acc, state, server: Server, key=None):
    del key
    total = self.decode(self.unmask(acc, state))
    weight, dp = total[0], state["dp"]
    some = weight > 0
    _, unravel = ravel_pytree((server.params, server.model_state))
    noisy_sum, ms_sum = unravel(total[1:])
    params = _plus(server.params, jax.tree.map(lambda d: d / dp["m"], noisy_sum))
    ms_mean = jax.tree.map(lambda d: jnp.where(some, d / jnp.where(some, weight, 1.0), 0.0), ms_sum)
    s = state["secagg"]
    return Server(params, _plus(server.model_state, ms_mean)), dict(
      state, dp=dict(dp, rounds=dp["rounds"] + 1), secagg=dict(s, round=s["round"] + 1)
    )


# ----------------------------------------------------------------------------- wrappers
@dataclasses.dataclass(frozen=True)
class Wrapped:
  """A strategy around `inner`: every hook and field it does not define is the inner one's, so
  it composes with any strategy (and with another wrapper)."""

  inner: Any

  def __getattr__(self, name):
    if name == "inner":  # not set yet (copy, unpickling): no recursion
      raise AttributeError(name)
    return getattr(self.inner, name)

  def for_run(self, num_clients: int, clients_per_round, sampling: str):
    inner = self.inner.for_run(num_clients, clients_per_round, sampling)
    return dataclasses.replace(self, inner=inner)

  def for_data(self, batch_size: int, num_examples, steps_per_round):
    inner = self.inner.for_data(batch_size, num_examples, steps_per_round)
    return dataclasses.replace(self, inner=inner)


@dataclasses.dataclass(frozen=True)
class DPSGD(Wrapped):
  """Example-level DP-SGD (Abadi et al. 2016) in every client's local steps, any strategy
  (docs/privacy.md): privacy.dp_sgd_value_and_grad's clipped, noised per-example gradients.
  Accounting per client k: a Poisson-sampled Gaussian at rate q_k = B / n_k per step, over the
  local steps k has taken so far (the state's 'dp_sgd_clients'); epsilon_budget > 0 stops the
  run before a round that would take any client past it. batch_size, num_examples,
  steps_per_round: set by `for_data` from the job's data. `wrap` builds it from config.dp_sgd.
  Bad fields raise ConfigError naming the field.
  """

  noise_multiplier: float = 1.0
  clip_norm: float = 1.0
  delta: float = 1e-5
  epsilon_budget: float = 0.0
  accountant: str = "rdp"
  batch_size: int = 0
  num_examples: tuple = ()
  steps_per_round: tuple = ()

  def __post_init__(self):
    for field, ok, want in (
      ("noise_multiplier", self.noise_multiplier > 0, "> 0 (0 turns DP-SGD off)"),
      ("clip_norm", self.clip_norm > 0, "> 0"),
      ("delta", 0 < self.delta < 1, "in (0, 1)"),
      ("epsilon_budget", self.epsilon_budget >= 0, ">= 0 (0: none)"),
      ("accountant", self.accountant in privacy.ACCOUNTANTS, f"one of {privacy.ACCOUNTANTS}"),
    ):
      if not ok:
        raise configlib.ConfigError(f"dp_sgd.{field}={getattr(self, field)!r} must be {want}")

  def local_value_and_grad(self, loss_fn):
    return privacy.dp_sgd_value_and_grad(loss_fn, self.clip_norm, self.noise_multiplier)

  def for_data(self, batch_size: int, num_examples, steps_per_round):
    num_examples = tuple(int(n) for n in num_examples)
    for c, n in enumerate(num_examples):
      if not 0 < batch_size <= n:
        raise configlib.ConfigError(
          f"dp_sgd: client {c} has {n} examples, fewer than the batch size {batch_size} "
          "(the sampling rate B / n_k must be <= 1)"
        )
    return dataclasses.replace(
      super().for_data(batch_size, num_examples, steps_per_round),
      batch_size=int(batch_size),
      num_examples=num_examples,
      steps_per_round=tuple(int(s) for s in steps_per_round),
    )

  def init(self, server_params, num_clients: int, model_state=None):
    state = self.inner.init(server_params, num_clients, model_state)
    return dict(state, dp_sgd_clients={"steps": jnp.zeros((num_clients,), jnp.int32)})

  def on_client_done(self, acc, state, server: Server, done: Finished):
    acc, state = self.inner.on_client_done(acc, state, server, done)
    steps = state["dp_sgd_clients"]["steps"]
    steps = steps.at[done.index].add(done.num_steps.astype(jnp.int32))
    return acc, dict(state, dp_sgd_clients={"steps": steps})

  def epsilons(self, steps) -> np.ndarray:
    """epsilon at delta of each client after `steps` [C] local DP-SGD steps."""
    if not self.num_examples:
      raise ValueError("dp_sgd: the job did not call for_data (no sampling rates)")
    return np.array(
      [
        privacy.dp_sgd_epsilon(
          self.batch_size, n, self.noise_multiplier, self.delta, self.accountant, int(s)
        )
        for n, s in zip(self.num_examples, np.asarray(steps))
      ]
    )

  def _steps(self, state, rounds_done: int) -> np.ndarray:
    if state is not None:
      return np.asarray(jax.device_get(state["dp_sgd_clients"]["steps"]))
    # No state: every client took part in every round (an upper bound under sampling).
    return rounds_done * np.asarray(self.steps_per_round)

  def stop_reason(self, rounds_done: int, state=None) -> str | None:
    why = self.inner.stop_reason(rounds_done, state)
    if why or not self.epsilon_budget:
      return why
    steps = self._steps(state, rounds_done)
    after = self.epsilons(steps + np.asarray(self.steps_per_round))
    if after.max() <= self.epsilon_budget:
      return None
    c = int(after.argmax())
    return (
      f"privacy budget (DP-SGD): round {rounds_done + 1} would bring client {c}'s epsilon to "
      f"{after[c]:.4g} > epsilon_budget={self.epsilon_budget:g} at delta={self.delta:g} "
      f"({self.accountant}); stopping after {rounds_done} rounds "
      f"(epsilon {self.epsilons(steps).max():.4g})"
    )

  def report(self, state, rounds_done: int) -> dict:
    out = dict(self.inner.report(state, rounds_done))
    eps = self.epsilons(self._steps(state, rounds_done))
    out["dp_sgd/epsilon"] = float(eps.max())
    out.update({f"dp_sgd/epsilon_client_{c:02d}": float(e) for c, e in enumerate(eps)})
    return out


@dataclasses.dataclass(frozen=True)
class ScaledClients(Wrapped):
  """SIMULATION ONLY (fault injection, config.fed.attack): the listed clients send their update
  scaled, x + scale * (y_k - x), as a faulty or hostile hospital would; the strategy sees
  that. For robustness checks (docs/privacy.md), never for a real deployment."""

  scale: float = 1.0
  clients: tuple = ()

  def for_run(self, num_clients: int, clients_per_round, sampling: str):
    if max(self.clients) >= num_clients:
      raise configlib.ConfigError(
        f"config.fed.attack_clients={','.join(map(str, self.clients))!r}: the federation has "
        f"clients 0..{num_clients - 1}"
      )
    return super().for_run(num_clients, clients_per_round, sampling)

  def on_client_done(self, acc, state, server: Server, done: Finished):
    hit = jnp.isin(done.index, jnp.asarray(self.clients, jnp.int32))
    s = jnp.where(hit, jnp.float32(self.scale), 1.0)
    params = jax.tree.map(
      lambda y, x: (x + s * (y.astype(jnp.float32) - x)).astype(y.dtype),
      done.params,
      strategies._f32(server.params),
    )
    return self.inner.on_client_done(acc, state, server, done._replace(params=params))


def parse_attack(attack: str, attack_clients: str) -> tuple[float, tuple[int, ...]]:
  """config.fed.attack ('' | 'scale:<factor>') and attack_clients ('3' or '1,3') -> (scale,
  client ids); ConfigError naming the field otherwise. '' -> (1.0, ())."""
  if not attack:
    return 1.0, ()
  kind, _, value = attack.partition(":")
  try:
    scale = float(value)
  except ValueError:
    scale = math.nan
  if kind != "scale" or not math.isfinite(scale):
    raise configlib.ConfigError(
      f"config.fed.attack={attack!r} is not '' or 'scale:<finite factor>' (e.g. 'scale:1e6')"
    )
  try:
    ids = tuple(int(x) for x in attack_clients.split(",") if x.strip())
  except ValueError:
    ids = ()
  if not ids or min(ids) < 0:
    raise configlib.ConfigError(
      f"config.fed.attack_clients={attack_clients!r} must list client indices >= 0, e.g. '3'"
    )
  return scale, ids


def wrap(strategy, config):
  """`strategy` with the job config's engine options around it: config.fed.attack (simulation
  only) and config.dp_sgd (noise_multiplier 0: off). Fields a config lacks are off; bad values
  raise ConfigError naming the field."""
  f = config.fed
  scale, ids = parse_attack(f.get("attack", ""), str(f.get("attack_clients", "")))
  if ids:
    strategy = ScaledClients(strategy, scale=scale, clients=ids)
  d = config.get("dp_sgd")
  if d is None:
    return strategy
  options = {k: d[k] for k in ("clip_norm", "delta", "epsilon_budget", "accountant")}
  try:  # DPSGD checks the fields; with noise_multiplier 0 (DP-SGD off) as well
    dp_sgd = DPSGD(strategy, noise_multiplier=d.noise_multiplier or 1.0, **options)
  except configlib.ConfigError as e:
    raise configlib.ConfigError(f"config.{e}") from None
  return dp_sgd if d.noise_multiplier else strategy


# ----------------------------------------------------------------------------- registry, host hooks
strategies.STRATEGIES.update(
  {
    "dp_fedavg": strategies._Entry(DPFedAvg, {}),
    "fedavg_screened": strategies._Entry(Robust, {"name": "fedavg_screened", "rule": "mean"}),
    "median": strategies._Entry(Robust, {"name": "median", "rule": "median"}),
    "trimmed_mean": strategies._Entry(Robust, {"name": "trimmed_mean", "rule": "trimmed_mean"}),
    "krum": strategies._Entry(Robust, {"name": "krum", "rule": "krum", "num_selected": 1}),
    "multi_krum": strategies._Entry(Robust, {"name": "multi_krum", "rule": "krum"}),
    "norm_bound": strategies._Entry(Robust, {"name": "norm_bound", "rule": "norm_bound"}),
    "secagg": strategies._Entry(SecureAvg, {}),
    "dp_secagg": strategies._Entry(DPSecureAvg, {}),
  }
)
