"""Federated strategies: pure, jittable operations on client pytrees with a leading client axis.

fed/ knows nothing of models: a "client tree" is any pytree whose leaves are [C, ...] (one
slice per client/node). Build a strategy by name, `make_strategy(name, **options)`; the names
are the keys of `STRATEGIES` and an unknown name or option raises ValueError listing the valid
ones. Strategies are frozen dataclasses (hashable), so they can be closed over or passed as
static arguments to `jax.jit`.

Interface (`ultrajax/fed/local.py` drives it; a job only supplies a loss and data):

  weights = strategy.client_weights(num_examples)        # np [C], sums to 1 ('weighting' option)
  state = strategy.init(server_params, num_clients, model_state=None)
      # strategy state pytree: server optimizer state, control variates, ... ({} for most);
      # also checks every keep_local pattern against the parameter and model-state paths.
  ctx = strategy.local_context(state)                    # per-client pytree [C, ...] or None
  grads = strategy.local_grad_transform(grads, params, start_params, ctx_c)
      # ONE client (no client axis), applied to every local gradient before the optimizer:
      # FedProx adds mu * (w - w_start), SCAFFOLD adds c - c_i, identity otherwise. This is
      # the single mechanism for local-objective changes (a proximal loss term mu/2 ||w - w0||^2
      # has exactly this gradient), so the job's loss_fn never depends on the strategy.
  params, state = strategy.aggregate(client_params, start_params, weights, state, num_steps)
      # client_params: [C, ...] after local training; start_params: [C, ...] what each client
      # started the round with; num_steps: [C] local steps taken (SCAFFOLD needs it).
      # Returns what every client starts the next round with, [C, ...].
  model_state = strategy.aggregate_state(client_model_state, weights)
      # Non-trainable state (BatchNorm running statistics): mixed like the parameters (weighted
      # mean broadcast, personalized mix, or unchanged for 'local'), never by a server optimizer
      # or control variate; leaves matching keep_local stay each client's own.

Keep-local (FedBN, local heads): every strategy takes `keep_local`, a tuple of regular
expressions searched (`re.search`) in each leaf's slash-joined path (`train.tree.path_str`,
e.g. 'encoder/layer1/0/bn1/scale'). Matching leaves are never averaged: each client keeps the
value its own local training produced, for parameters and model state alike. A pattern that
matches no path raises ValueError at `init`, naming the pattern.

Names (options and defaults in `docs/federated.md`):
  local           no aggregation; each node trains alone.
  central         FedAvg's arithmetic; the job pools all nodes' data into one client.
  fedavg          x = sum_k n_k/n y_k (volume-weighted, McMahan et al. 2017).
  fedavg_uniform  x = 1/C sum_k y_k (HSL's full-parameter averaging).
  fedprox         FedAvg + mu * (w - w_start) on every local gradient (Li et al. 2020); mu=0.01.
  fedbn           FedAvg with normalisation layers (affine params and running stats) kept local.
  keep_local      FedAvg with user patterns kept local (required), e.g. task heads.
  personalized    y_k' = alpha y_k + (1 - alpha) mean_{j != k} y_j (unweighted), alpha=0.5.
  fedadam / fedyogi / fedadagrad
                  server optimizer on the pseudo-gradient g = x - sum_k w_k y_k (Reddi et al. 2021).
  scaffold        control variates, option II (Karimireddy et al. 2020).
  splitavg        split learning with feature concatenation at the server (Zhang et al. 2022);
                  needs a split model, so it has its own driver, `local.make_splitavg_round`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ultrajax.fed import aggregate as agg
from ultrajax.train import tree as tree_lib

# One pattern (each pattern must match something): normalisation layers by module name (bn1,
# downsample_bn, norm, ln_f, batch_norm...) or running-statistic leaves by name. torchvision's
# own layout names a downsample BN 'downsample/1': pass explicit patterns for such layouts.
FEDBN_PATTERNS = (r"(^|/)(([^/]*_)?(bn|norm|ln|batch_?norm|layer_?norm)[^/]*/|"
                  r"(batch_stats|running_mean|running_var|num_batches_tracked)(/|$))",)


def _paths(tree) -> list[str]:
  return [tree_lib.path_str(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(tree)]


def check_patterns(patterns, *trees) -> None:
  """Raises ValueError naming each pattern that matches no leaf path of any of `trees`."""
  paths = [p for t in trees if t is not None for p in _paths(t)]
  for pattern in patterns:
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"keep_local pattern {pattern!r} is not a regular expression: {e}") from e
    if not any(regex.search(p) for p in paths):
      raise ValueError(f"keep_local pattern {pattern!r} matches no parameter or state path; "
                       f"paths look like {paths[:6]}")


def keep_local_leaves(patterns, aggregated, client_tree):
  """Leaves of `aggregated` whose path matches a pattern are replaced by `client_tree`'s."""
  if not patterns:
    return aggregated
  regexes = [re.compile(p) for p in patterns]
  is_local = lambda path: any(r.search(path) for r in regexes)
  return jax.tree_util.tree_map_with_path(
      lambda kp, a, c: c if is_local(tree_lib.path_str(kp)) else a, aggregated, client_tree)


def _first(client_tree):
  """The server tree: at a round start every client holds the same shared leaves."""
  return jax.tree.map(lambda x: x[0], client_tree)


@dataclasses.dataclass(frozen=True)
class FedAvg:
  """Weighted mean broadcast to every client; the base every strategy specialises.

  weighting: 'volume' (n_k / n, n_k = training examples of node k) or 'uniform' (1 / C).
  keep_local: path regexes of leaves that are never averaged.
  """
  name: str = "fedavg"
  weighting: str = "volume"
  keep_local: tuple[str, ...] = ()

  def client_weights(self, num_examples) -> np.ndarray:
    return agg.client_weights(num_examples, self.weighting)

  def init(self, server_params, num_clients: int, model_state=None):
    check_patterns(self.keep_local, server_params, model_state)
    return self._init(server_params, num_clients)

  def _init(self, server_params, num_clients):
    del server_params, num_clients
    return {}

  def local_context(self, state):
    del state
    return None

  def local_grad_transform(self, grads, params, start_params, ctx):
    del params, start_params, ctx
    return grads

  def mix(self, client_tree, weights):
    """The linear mixing rule applied to a client tree [C, ...] (no server optimizer)."""
    return agg.broadcast(agg.weighted_mean(client_tree, weights), weights.shape[0])

  def aggregate(self, client_params, start_params, weights, state, num_steps=None):
    new, state = self._aggregate(client_params, start_params, weights, state, num_steps)
    return keep_local_leaves(self.keep_local, new, client_params), state

  def _aggregate(self, client_params, start_params, weights, state, num_steps):
    del start_params, num_steps
    return self.mix(client_params, weights), state

  def aggregate_state(self, client_model_state, weights):
    return keep_local_leaves(self.keep_local, self.mix(client_model_state, weights),
                             client_model_state)


@dataclasses.dataclass(frozen=True)
class Local(FedAvg):
  """No communication: every node keeps its own parameters and statistics."""
  name: str = "local"

  def mix(self, client_tree, weights):
    del weights
    return client_tree


@dataclasses.dataclass(frozen=True)
class Personalized(FedAvg):
  """y_k' = alpha * y_k + (1 - alpha) * mean of the other nodes' y_j (unweighted, as in the
  HSL repository's README, without its divide-by-0.5 bug). alpha = 1 is local training."""
  name: str = "personalized"
  alpha: float = 0.5

  def __post_init__(self):
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"personalized: alpha={self.alpha} is outside [0, 1]")

  def mix(self, client_tree, weights):
    num_clients = weights.shape[0]
    if num_clients == 1:
      return client_tree

    def one(x):
      x32 = x.astype(jnp.float32)
      others = (x32.sum(0, keepdims=True) - x32) / (num_clients - 1)
      return (self.alpha * x32 + (1.0 - self.alpha) * others).astype(x.dtype)

    return jax.tree.map(one, client_tree)


@dataclasses.dataclass(frozen=True)
class FedProx(FedAvg):
  """FedAvg whose local gradients get the proximal term's gradient mu * (w - w_start)."""
  name: str = "fedprox"
  mu: float = 0.01

  def __post_init__(self):
    if self.mu < 0:
      raise ValueError(f"fedprox: mu={self.mu} must be >= 0")

  def local_grad_transform(self, grads, params, start_params, ctx):
    del ctx
    return jax.tree.map(lambda g, w, w0: g + (self.mu * (w - w0)).astype(g.dtype),
                        grads, params, start_params)


def scale_by_fedopt(kind: str, b1: float, b2: float, tau: float) -> optax.GradientTransformation:
  """Reddi et al. (2021) Algorithm 2 server step on the pseudo-gradient g, without bias
  correction: m = b1 m + (1 - b1) g; v from g^2 by adam / yogi / adagrad; update m / (sqrt(v) + tau);
  v starts at tau^2 (the paper's v_{-1} >= tau^2). Scale by -lr afterwards."""

  def init(params):
    m = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
    v = jax.tree.map(lambda x: jnp.full(x.shape, tau * tau, jnp.float32), params)
    return {"m": m, "v": v}

  def second_moment(v, g):
    g2 = g * g
    if kind == "adam":
      return b2 * v + (1 - b2) * g2
    if kind == "yogi":
      return v - (1 - b2) * g2 * jnp.sign(v - g2)
    return v + g2  # adagrad

  def update(updates, state, params=None):
    del params
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], updates)
    v = jax.tree.map(second_moment, state["v"], updates)
    out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + tau), m, v)
    return out, {"m": m, "v": v}

  return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
class FedOpt(FedAvg):
  """Server optimizer on the pseudo-gradient g = x - sum_k w_k y_k (x: round-start server params).

  optimizer: 'adam' | 'yogi' | 'adagrad'. bias_correction=False (default) is Reddi et al.'s
  Algorithm 2 (`scale_by_fedopt`); True uses optax.adam / optax.yogi / optax.adagrad with
  eps = tau (Kingma-style bias correction, as Flower's FedAdam does). Defaults b1 = 0.9,
  b2 = 0.99, tau = 1e-3 are Reddi et al.'s; they tune the server lr per task: 1e-2 here.
  """
  name: str = "fedadam"
  optimizer: str = "adam"
  server_lr: float = 1e-2
  b1: float = 0.9
  b2: float = 0.99
  tau: float = 1e-3
  bias_correction: bool = False

  def __post_init__(self):
    if self.server_lr <= 0 or self.tau <= 0:
      raise ValueError(f"{self.name}: server_lr={self.server_lr} and tau={self.tau} must be > 0")
    self.server_tx()  # fails here, not mid-run, on an unknown optimizer

  def server_tx(self) -> optax.GradientTransformation:
    if self.optimizer not in ("adam", "yogi", "adagrad"):
      raise ValueError(f"server optimizer {self.optimizer!r} is not 'adam', 'yogi' or 'adagrad'")
    if not self.bias_correction:
      return optax.chain(scale_by_fedopt(self.optimizer, self.b1, self.b2, self.tau),
                         optax.scale(-self.server_lr))
    if self.optimizer == "adam":
      return optax.adam(self.server_lr, b1=self.b1, b2=self.b2, eps=self.tau)
    if self.optimizer == "yogi":
      return optax.yogi(self.server_lr, b1=self.b1, b2=self.b2, eps=self.tau)
    return optax.adagrad(self.server_lr, eps=self.tau)

  def _init(self, server_params, num_clients):
    del num_clients
    return {"server_opt": self.server_tx().init(
        jax.tree.map(lambda x: x.astype(jnp.float32), server_params))}

  def _aggregate(self, client_params, start_params, weights, state, num_steps):
    del num_steps
    x = jax.tree.map(lambda a: a.astype(jnp.float32), _first(start_params))
    mean = jax.tree.map(lambda a: a.astype(jnp.float32), agg.weighted_mean(client_params, weights))
    pseudo_grad = jax.tree.map(jnp.subtract, x, mean)
    updates, opt = self.server_tx().update(pseudo_grad, state["server_opt"], x)
    new = jax.tree.map(lambda x, u, ref: (x + u).astype(ref.dtype), x, updates,
                       _first(client_params))
    return agg.broadcast(new, weights.shape[0]), {"server_opt": opt}


@dataclasses.dataclass(frozen=True)
class Scaffold(FedAvg):
  """SCAFFOLD (Karimireddy et al. 2020), full participation, option II control update.

  Local step gradient: g + c - c_i. After K_i local steps of lr local_lr from x to y_i:
    c_i' = c_i - c + (x - y_i) / (K_i * local_lr)
    x'   = x + server_lr * sum_k w_k (y_k - x)
    c'   = c + sum_k w_k (c_k' - c_k)
  The paper averages uniformly (1/N); the same weights w as the parameters are used here so
  that c stays the weighted mean of the c_i and the corrections c - c_i average to zero
  under that mean (uniform weighting gives the paper exactly). Option II assumes plain SGD
  locally; with another local optimizer local_lr is the effective step size you declare.
  """
  name: str = "scaffold"
  local_lr: float = 0.01
  server_lr: float = 1.0

  def __post_init__(self):
    if self.local_lr <= 0:
      raise ValueError(f"scaffold: local_lr={self.local_lr} must be > 0 (option II divides by it)")

  def _init(self, server_params, num_clients):
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), server_params)
    return {"c": zeros, "c_clients": agg.broadcast(zeros, num_clients)}

  def local_context(self, state):
    return jax.tree.map(lambda c, ci: c[None] - ci, state["c"], state["c_clients"])

  def local_grad_transform(self, grads, params, start_params, ctx):
    del params, start_params
    return jax.tree.map(lambda g, d: g + d.astype(g.dtype), grads, ctx)

  def _aggregate(self, client_params, start_params, weights, state, num_steps):
    if num_steps is None:
      raise ValueError("scaffold's aggregate needs num_steps [C] (local steps per client)")
    x = jax.tree.map(lambda a: a.astype(jnp.float32), _first(start_params))
    y = jax.tree.map(lambda a: a.astype(jnp.float32), client_params)
    scale = 1.0 / (jnp.maximum(jnp.asarray(num_steps, jnp.float32), 1.0) * self.local_lr)

    def control(c, ci, x, y):
      return ci - c[None] + (x[None] - y) * scale.reshape((-1,) + (1,) * x.ndim)

    c_clients = jax.tree.map(control, state["c"], state["c_clients"], x, y)
    delta_c = agg.weighted_mean(jax.tree.map(jnp.subtract, c_clients, state["c_clients"]), weights)
    c = jax.tree.map(jnp.add, state["c"], delta_c)
    mean_y = agg.weighted_mean(y, weights)
    new = jax.tree.map(lambda x, m, ref: (x + self.server_lr * (m - x)).astype(ref.dtype),
                       x, mean_y, _first(client_params))
    return agg.broadcast(new, weights.shape[0]), {"c": c, "c_clients": c_clients}


@dataclasses.dataclass(frozen=True)
class SplitAvg(Local):
  """SplitAVG's options for the job, which trains it with `local.make_splitavg_round` (a split
  model, not a parameter-mixing rule): client sub-networks stay per client, so aggregate is
  the identity. cut_grad: 'average' (SplitAVG) or 'own' (plain split learning)."""
  name: str = "splitavg"
  cut_grad: str = "average"

  def __post_init__(self):
    if self.cut_grad not in ("average", "own"):
      raise ValueError(f"splitavg: cut_grad={self.cut_grad!r} is not 'average' or 'own'")


class _Entry(NamedTuple):
  cls: type
  fixed: dict[str, Any]


STRATEGIES: dict[str, _Entry] = {
    "local": _Entry(Local, {}),
    "central": _Entry(FedAvg, {"name": "central"}),
    "fedavg": _Entry(FedAvg, {"name": "fedavg"}),
    "fedavg_uniform": _Entry(FedAvg, {"name": "fedavg_uniform", "weighting": "uniform"}),
    "fedprox": _Entry(FedProx, {}),
    "fedbn": _Entry(FedAvg, {"name": "fedbn", "keep_local": FEDBN_PATTERNS}),
    "keep_local": _Entry(FedAvg, {"name": "keep_local"}),
    "personalized": _Entry(Personalized, {}),
    "fedadam": _Entry(FedOpt, {"name": "fedadam", "optimizer": "adam"}),
    "fedyogi": _Entry(FedOpt, {"name": "fedyogi", "optimizer": "yogi"}),
    "fedadagrad": _Entry(FedOpt, {"name": "fedadagrad", "optimizer": "adagrad"}),
    "scaffold": _Entry(Scaffold, {}),
    "splitavg": _Entry(SplitAvg, {}),
}


def make_strategy(name: str, **options) -> FedAvg:
  """The strategy `name` with `options` overriding its defaults (see each class).

  Raises ValueError for an unknown name, an option the strategy does not take, or
  `keep_local` without patterns. Lists become tuples so the strategy stays hashable.
  """
  if name not in STRATEGIES:
    raise ValueError(f"unknown federated strategy {name!r}; choose one of {sorted(STRATEGIES)}")
  entry = STRATEGIES[name]
  fields = {f.name for f in dataclasses.fields(entry.cls)} - {"name"}
  unknown = sorted(set(options) - fields)
  if unknown:
    raise ValueError(f"strategy {name!r} takes no option(s) {unknown}; options: {sorted(fields)}")
  options = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in options.items()}
  strategy = entry.cls(**{**entry.fixed, **options})
  if strategy.weighting not in ("volume", "uniform"):
    raise ValueError(f"strategy {name!r}: weighting={strategy.weighting!r} is not "
                     "'volume' or 'uniform'")
  if name == "keep_local" and not strategy.keep_local:
    raise ValueError("strategy 'keep_local' needs keep_local=(path regexes, ...)")
  return strategy
