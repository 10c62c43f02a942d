"""Federated strategies: what a client adds to a round and how the server moves, as hooks.

fed/ knows nothing of models: params and model state are any pytrees. Build a strategy by
name, `make_strategy(name, **options)` (the keys of `STRATEGIES`, with fed/protected.py's
privacy and robust ones; math, options and defaults in docs/federated.md). Strategies are frozen
dataclasses (hashable), so they can be closed over or passed as static arguments to `jax.jit`.

The engine (fed/rounds.py) drives a round through these hooks (the table in docs/federated.md
says what each strategy does in them); `server` is `Server(params, model_state)` at the round's
start, `c` a client index (int32 scalar):

  weights = strategy.client_weights(num_examples)     # np [C], sums to 1 ('weighting' option)
  state = strategy.init(server_params, num_clients, model_state)
      # the strategy's pytree (server optimizer, controls, kept leaves, ...); a top-level
      # entry whose key ends in 'clients' holds per-client leaves [C, ...] (sharded so).
  params, model_state, ctx = strategy.client_start(state, server, c)
      # what client c trains from, and its context for local_grad_transform (one client).
  (loss, (model_state, aux)), grads = strategy.local_value_and_grad(loss_fn)(...)
  grads = strategy.local_grad_transform(grads, params, ctx)   # every local gradient
  acc = strategy.accumulator(state, server, num_clients)    # the round's running sums
  acc, state = strategy.on_client_done(acc, state, server, done: Finished)
      # called once per finishing client (one client); may write that client's own slots of
      # `state` (its controls, kept leaves): no other client reads them this round.
  server, state = strategy.server_update(acc, state, server, key)

Model state (BatchNorm statistics) is averaged like the params, never moved by a server
optimizer or a control variate. 'splitavg' needs a split model, so it has its own driver,
`local.make_splitavg_round`.
"""

from __future__ import annotations

import ast
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
FEDBN_PATTERNS = (
  r"(^|/)(([^/]*_)?(bn|norm|ln|batch_?norm|layer_?norm)[^/]*/|"
  r"(batch_stats|running_mean|running_var|num_batches_tracked)(/|$))",
)


class Server(NamedTuple):
  """The server's side of a round: what every client starts from (leaves without client axis)."""

  params: Any
  model_state: Any


class Finished(NamedTuple):
  """One client at the end of its local training (no client axis)."""

  index: jax.Array  # int32 scalar: the client
  weight: jax.Array  # float32 scalar: its population weight (client_weights)
  params: Any  # the params its local training produced
  model_state: Any
  num_steps: jax.Array  # float32 scalar: local steps taken this round


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
      raise ValueError(
        f"keep_local pattern {pattern!r} matches no parameter or state path; "
        f"paths look like {paths[:6]}"
      )


def _is_local(patterns):
  regexes = [re.compile(p) for p in patterns]
  return lambda kp: any(r.search(tree_lib.path_str(kp)) for r in regexes)


def kept_leaves(patterns, tree) -> list:
  """The leaves of `tree` whose path matches a pattern, in tree order."""
  is_local = _is_local(patterns)
  return [x for kp, x in jax.tree_util.tree_leaves_with_path(tree) if is_local(kp)]


def with_kept(patterns, tree, leaves):
  """`tree` with its matching leaves replaced, in order, by `leaves` (kept_leaves' inverse)."""
  is_local, it = _is_local(patterns), iter(leaves)
  return jax.tree_util.tree_map_with_path(lambda kp, x: next(it) if is_local(kp) else x, tree)


def _f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _zeros(tree):
  return jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), tree)


def _add_weighted(total, w, tree):
  return jax.tree.map(lambda s, x: s + w * x.astype(jnp.float32), total, tree)


def _store(stack, c, value):
  """stack [C, ...] with row c set to value (both pytrees)."""
  return jax.tree.map(lambda s, v: s.at[c].set(v.astype(s.dtype)), stack, value)


def _like(tree, ref):
  return jax.tree.map(lambda x, r: jnp.asarray(x).astype(jnp.asarray(r).dtype), tree, ref)


def _accumulate(acc, done: Finished):
  """FedAvg's running sums: w_k y_k of params and model state, and w_k."""
  return dict(
    acc,
    params=_add_weighted(acc["params"], done.weight, done.params),
    model_state=_add_weighted(acc["model_state"], done.weight, done.model_state),
    weight=acc["weight"] + done.weight,
  )


@dataclasses.dataclass(frozen=True)
class FedAvg:
  """Weighted mean of the finished clients' params (and model state); the base every strategy
  specialises.

  weighting: 'volume' (n_k / n, n_k = training examples of node k) or 'uniform' (1 / C); the
  mean divides by the finished clients' weights, which renormalises it over the participants.
  keep_local (FedBN, local heads): regexes searched in each leaf's `train.tree.path_str` (e.g.
  'encoder/layer1/0/bn1/scale'); matching leaves, params and model state alike, are never
  averaged: each client keeps what its own last local training produced (stored per client).
  A pattern that matches no path raises ValueError at `init`.
  """

  name: str = "fedavg"
  weighting: str = "volume"
  keep_local: tuple[str, ...] = ()

  def client_weights(self, num_examples) -> np.ndarray:
    return agg.client_weights(num_examples, self.weighting)

  # ---------------------------------------------------------------- hooks (fed/rounds.py)
  def init(self, server_params, num_clients: int, model_state=None):
    model_state = {} if model_state is None else model_state
    check_patterns(self.keep_local, server_params, model_state)
    state = self._init(server_params, num_clients)
    if self.keep_local:
      kept = lambda t: agg.broadcast(kept_leaves(self.keep_local, t), num_clients)
      state["kept_clients"] = dict(params=kept(server_params), model_state=kept(model_state))
    return state

  def _init(self, server_params, num_clients):
    del server_params, num_clients
    return {}

  def client_start(self, state, server: Server, c):
    params, model_state = server.params, server.model_state
    if self.keep_local:
      own = jax.tree.map(lambda x: x[c], state["kept_clients"])
      params = with_kept(self.keep_local, params, own["params"])
      model_state = with_kept(self.keep_local, model_state, own["model_state"])
    return params, model_state, self.context(state, params, c)

  def context(self, state, start_params, c):
    """The per-client input of local_grad_transform (None: no transform)."""
    del state, start_params, c
    return None

  def local_grad_transform(self, grads, params, ctx):
    del params, ctx
    return grads

  def local_value_and_grad(self, loss_fn):
    """The local step's gradient of the engine's LossFn: ((loss, (model_state, aux)), grads).
    Example-level DP-SGD (protected.DPSGD) replaces it with clipped, noised per-example ones."""
    return jax.value_and_grad(loss_fn, has_aux=True)

  def accumulator(self, state, server: Server, num_clients: int):
    del state, num_clients
    return dict(
      params=_zeros(server.params),
      model_state=_zeros(server.model_state),
      weight=jnp.zeros((), jnp.float32),
    )

  def on_client_done(self, acc, state, server: Server, done: Finished):
    del server
    acc = _accumulate(acc, done)
    if self.keep_local:
      own = dict(
        params=kept_leaves(self.keep_local, done.params),
        model_state=kept_leaves(self.keep_local, done.model_state),
      )
      state = dict(state, kept_clients=_store(state["kept_clients"], done.index, own))
    return acc, state

  def mean(self, acc, server: Server) -> Server:
    """The weighted mean over the clients that finished (float32); the old server when none did."""
    some = acc["weight"] > 0
    mean = lambda s, x: jnp.where(
      some, s / jnp.where(some, acc["weight"], 1.0), jnp.asarray(x, jnp.float32)
    )
    return Server(
      jax.tree.map(mean, acc["params"], server.params),
      jax.tree.map(mean, acc["model_state"], server.model_state),
    )

  def server_update(self, acc, state, server: Server, key=None):
    del key
    mean = self.mean(acc, server)
    params, state = self.server_step(server.params, mean.params, state)
    return Server(_like(params, server.params), _like(mean.model_state, server.model_state)), state

  def server_step(self, x, mean, state):
    """Server params from the round-start params x and the clients' mean (float32)."""
    del x
    return mean, state

  # ---------------------------------------------------------------- host-side, per run / round
  def for_run(self, num_clients: int, clients_per_round, sampling: str):
    """The strategy a job runs, once the federation's size and sampling are known (DP's
    accountant needs them); raises ValueError on a combination it cannot run."""
    del num_clients, clients_per_round, sampling
    return self

  def for_data(self, batch_size: int, num_examples, steps_per_round):
    """The strategy once the clients' data is known (DP-SGD's per-client sampling rates
    batch_size / n_k and steps per round); jobs call it after `for_run`."""
    del batch_size, num_examples, steps_per_round
    return self

  def stop_reason(self, rounds_done: int, state=None) -> str | None:
    """Why the run must stop before another round (e.g. a spent privacy budget), or None.
    state: the strategy state after `rounds_done` rounds (when the job passes it)."""
    del rounds_done, state
    return None

  def report(self, state, rounds_done: int) -> dict:
    """Host floats to log after a round (e.g. epsilon spent), from the strategy state."""
    del state, rounds_done
    return {}


@dataclasses.dataclass(frozen=True)
class Personalized(FedAvg):
  """y_k' = alpha * y_k + (1 - alpha) * mean of the other finished nodes' y_j (unweighted, as in
  the HSL repository's README, without its divide-by-0.5 bug); alpha = 1 is local training.
  Each client's own params and model state live in the state ('clients'); the server params
  are the FedAvg mean of the finished clients (what a job logs or evaluates as one model)."""

  name: str = "personalized"
  alpha: float = 0.5

  def __post_init__(self):
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"{self.name}: alpha={self.alpha} is outside [0, 1]")

  def init(self, server_params, num_clients: int, model_state=None):
    model_state = {} if model_state is None else model_state
    check_patterns(self.keep_local, server_params, model_state)
    own = dict(params=server_params, model_state=model_state)
    return {"clients": agg.broadcast(own, num_clients), "done": jnp.zeros((num_clients,), bool)}

  def client_start(self, state, server: Server, c):
    own = jax.tree.map(lambda x: x[c], state["clients"])
    return own["params"], own["model_state"], self.context(state, own["params"], c)

  def on_client_done(self, acc, state, server: Server, done: Finished):
    del server
    own = dict(params=done.params, model_state=done.model_state)
    return _accumulate(acc, done), dict(
      state,
      clients=_store(state["clients"], done.index, own),
      done=state["done"].at[done.index].set(True),
    )

  def server_update(self, acc, state, server: Server, key=None):
    """Mixes the finished clients' stored models among themselves; the others stay as they are."""
    new, state = super().server_update(acc, state, server, key)
    done = state["done"]
    count = done.sum().astype(jnp.float32)
    is_local = _is_local(self.keep_local)

    def one(kp, x):
      x32, d = x.astype(jnp.float32), done.reshape((-1,) + (1,) * (x.ndim - 1))
      others = (jnp.where(d, x32, 0.0).sum(0, keepdims=True) - x32) / jnp.maximum(count - 1, 1)
      mixed = self.alpha * x32 + (1.0 - self.alpha) * others
      keep = is_local(kp) | ~d | (count < 2)
      return jnp.where(keep, x32, mixed).astype(x.dtype)

    clients = {k: jax.tree_util.tree_map_with_path(one, v) for k, v in state["clients"].items()}
    return new, dict(state, clients=clients, done=jnp.zeros_like(done))


@dataclasses.dataclass(frozen=True)
class Local(Personalized):
  """No communication: every node keeps its own parameters and statistics (alpha = 1)."""

  name: str = "local"
  alpha: float = 1.0


@dataclasses.dataclass(frozen=True)
class FedProx(FedAvg):
  """FedAvg whose local gradients get the proximal term's gradient mu * (w - w_start)."""

  name: str = "fedprox"
  mu: float = 0.01

  def __post_init__(self):
    if self.mu < 0:
      raise ValueError(f"fedprox: mu={self.mu} must be >= 0")

  def context(self, state, start_params, c):
    del state, c
    return start_params

  def local_grad_transform(self, grads, params, ctx):
    return jax.tree.map(
      lambda g, w, w0: g + (self.mu * (w - w0)).astype(g.dtype), grads, params, ctx
    )


def scale_by_fedopt(kind: str, b1: float, b2: float, tau: float) -> optax.GradientTransformation:
  """Reddi et al. (2021) Algorithm 2 server step on the pseudo-gradient g, without bias
  correction: m = b1 m + (1 - b1) g; v from g^2 by adam / yogi / adagrad; update m / (sqrt(v) + tau);
  v starts at tau^2 (the paper's v_{-1} >= tau^2). Scale by -lr afterwards."""

  def init(params):
    v = jax.tree.map(lambda x: jnp.full(x.shape, tau * tau, jnp.float32), params)
    return {"m": _zeros(params), "v": v}

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
      return optax.chain(
        scale_by_fedopt(self.optimizer, self.b1, self.b2, self.tau), optax.scale(-self.server_lr)
      )
    if self.optimizer == "adam":
      return optax.adam(self.server_lr, b1=self.b1, b2=self.b2, eps=self.tau)
    if self.optimizer == "yogi":
      return optax.yogi(self.server_lr, b1=self.b1, b2=self.b2, eps=self.tau)
    return optax.adagrad(self.server_lr, eps=self.tau)

  def _init(self, server_params, num_clients):
    del num_clients
    return {"server_opt": self.server_tx().init(_f32(server_params))}

  def server_step(self, x, mean, state):
    x = _f32(x)
    updates, opt = self.server_tx().update(
      jax.tree.map(jnp.subtract, x, mean), state["server_opt"], x
    )
    return jax.tree.map(jnp.add, x, updates), dict(state, server_opt=opt)


@dataclasses.dataclass(frozen=True)
class Scaffold(FedAvg):
  """SCAFFOLD (Karimireddy et al. 2020), option II control update.

  Local step gradient: g + c - c_i. After K_i local steps of lr local_lr from x to y_i:
    c_i' = c_i - c + (x - y_i) / (K_i * local_lr)
    x'   = x + server_lr * (sum_S w_k y_k / sum_S w_k - x)
    c'   = c + sum_S w_k (c_k' - c_k)
  over the clients S that finished the round, w_k their population weights. The paper averages
  uniformly (1/N, and |S|/N for c under partial participation); the same weights w as the
  params are used here so that c stays the weighted mean of the c_i and the corrections
  c - c_i average to zero under that mean (uniform weighting gives the paper exactly). Option
  II assumes plain SGD locally; with another local optimizer local_lr is the effective step
  size you declare.
  """

  name: str = "scaffold"
  local_lr: float = 0.01
  server_lr: float = 1.0

  def __post_init__(self):
    if self.local_lr <= 0:
      raise ValueError(f"scaffold: local_lr={self.local_lr} must be > 0 (option II divides by it)")

  def _init(self, server_params, num_clients):
    zeros = _zeros(server_params)
    return {"c": zeros, "c_clients": agg.broadcast(zeros, num_clients)}

  def context(self, state, start_params, c):
    del start_params
    return jax.tree.map(lambda g, own: g - own[c], state["c"], state["c_clients"])

  def local_grad_transform(self, grads, params, ctx):
    del params
    return jax.tree.map(lambda g, d: g + d.astype(g.dtype), grads, ctx)

  def accumulator(self, state, server: Server, num_clients: int):
    return dict(super().accumulator(state, server, num_clients), delta_c=_zeros(server.params))

  def on_client_done(self, acc, state, server: Server, done: Finished):
    acc, state = super().on_client_done(acc, state, server, done)
    scale = 1.0 / (jnp.maximum(done.num_steps, 1.0) * self.local_lr)
    old = jax.tree.map(lambda own: own[done.index], state["c_clients"])
    new = jax.tree.map(
      lambda ci, g, x, y: ci - g + (x.astype(jnp.float32) - y) * scale,
      old,
      state["c"],
      server.params,
      done.params,
    )
    acc = dict(
      acc, delta_c=jax.tree.map(lambda s, a, b: s + done.weight * (a - b), acc["delta_c"], new, old)
    )
    return acc, dict(state, c_clients=_store(state["c_clients"], done.index, new))

  def server_step(self, x, mean, state):
    return jax.tree.map(lambda x, m: x + self.server_lr * (m - x), _f32(x), mean), state

  def server_update(self, acc, state, server: Server, key=None):
    new, state = super().server_update(acc, state, server, key)
    return new, dict(state, c=jax.tree.map(jnp.add, state["c"], acc["delta_c"]))


@dataclasses.dataclass(frozen=True)
class SplitAvg(Local):
  """SplitAVG's options for the job, which trains it with `local.make_splitavg_round` (a split
  model, not a parameter-mixing rule): client sub-networks stay per client, as with 'local'.
  cut_grad: 'average' (SplitAVG) or 'own' (plain split learning)."""

  name: str = "splitavg"
  cut_grad: str = "average"

  def __post_init__(self):
    if self.cut_grad not in ("average", "own"):
      raise ValueError(f"splitavg: cut_grad={self.cut_grad!r} is not 'average' or 'own'")


class _Entry(NamedTuple):
  cls: type
  fixed: dict[str, Any]


STRATEGIES: dict[str, _Entry] = {
  "local": _Entry(Local, {"alpha": 1.0}),
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
  "splitavg": _Entry(SplitAvg, {"alpha": 1.0}),
}


def parse_options(text: str) -> dict:
  """'mu=0.1, keep_local=("^head/",)' -> {'mu': 0.1, 'keep_local': ('^head/',)} (Python
  literals); '' -> {}. Raises ValueError naming what does not parse."""
  if not text.strip():
    return {}
  try:
    call = ast.parse(f"f({text})", mode="eval").body
    if call.args:
      raise ValueError("every option needs a name (name=value)")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords}
  except (SyntaxError, ValueError) as e:
    raise ValueError(
      f"options {text!r} are not 'name=value, ...' with Python literals: {e}"
    ) from None


def make_strategy(name: str, **options) -> FedAvg:
  """The strategy `name` with `options` overriding its defaults (see each class).

  Raises ValueError for an unknown name, an option the strategy does not take, or
  `keep_local` without patterns. Lists become tuples so the strategy stays hashable.
  """
  if name not in STRATEGIES:
    raise ValueError(f"unknown federated strategy {name!r}; choose one of {sorted(STRATEGIES)}")
  entry = STRATEGIES[name]
  fields = {f.name for f in dataclasses.fields(entry.cls)} - {"name"} - set(entry.fixed)
  unknown = sorted(set(options) - fields)
  if unknown:
    raise ValueError(f"strategy {name!r} takes no option(s) {unknown}; options: {sorted(fields)}")
  options = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in options.items()}
  strategy = entry.cls(**{**entry.fixed, **options})
  if strategy.weighting not in ("volume", "uniform"):
    raise ValueError(
      f"strategy {name!r}: weighting={strategy.weighting!r} is not 'volume' or 'uniform'"
    )
  if name == "keep_local" and not strategy.keep_local:
    raise ValueError("strategy 'keep_local' needs keep_local=(path regexes, ...)")
  return strategy


# Privacy and robustness strategies (dp_fedavg, fedavg_screened, median, trimmed_mean, krum,
# multi_krum, norm_bound, secagg) build on FedAvg above and register themselves here.
from ultrajax.fed import protected as _protected  # noqa: E402,F401
