"""One hospital's half of a federated round, with only its own data (no Flower in here).

A site is client `config.fl.site_id` of the consortium. Given the round's global parameters it
runs its local epoch through the engine's compiled chunk (`fed/rounds.make_chunk`, the function
the in-process simulation runs, with the strategy's local hooks, here with one lane and one
client) and returns its update y_k - x, its image count n_k and a few scalars. Every random
draw is the simulation's draw for client site_id: the step keys fold_in(fold_in(round key,
site_id), step) travel with the batch, and the data stream is `pipeline.client_dataset(source,
site_id, ...)`. So a consortium with the same config, seed and sites reproduces the simulation.

Between rounds the site keeps, on its own disk only, its optimizer state, its data-iterator
position and SCAFFOLD's c_i: `workdir/site_state/<rounds done>.npz`, written atomically; the
last few are kept, so a server that restarts from an older checkpoint and asks for a round
again gets the same answer.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import time
from typing import NamedTuple

import grain
import jax
import numpy as np
from absl import logging

from ultrajax import configlib, pretrain_checks
from ultrajax.data import clients as clients_lib, pipeline
from ultrajax.fed import rounds, strategies
from ultrajax.fl import params as params_lib
from ultrajax.train import divergence, loop, mim_objectives, mim_programs, sharding

STATE_DIR = "site_state"
CONTROL_KEY = "scaffold_c_i/"  # SCAFFOLD's c_i in the site state, after the optimizer state


def validate(config) -> None:
  """The pretraining job's checks plus what deployment supports."""
  pretrain_checks.validate(config)
  configlib.check(
    config.target == "pixels",
    f"config.target={config.target!r}: federated deployment runs pixel targets only (a "
    "teacher would have to be shipped to every site)",
  )
  name = config.fed.strategy
  configlib.check(
    name in SUPPORTED,
    f"config.fed.strategy={name!r} is not supported in deployment; choose one of {SUPPORTED}",
  )
  f = config.fed
  # Both run in the engine's local step but are accounted or staged by the simulation's host
  # hooks, which a site never calls: refused rather than run unaccounted.
  configlib.check(
    not f.get("attack", ""),
    f"config.fed.attack={f.attack!r} is a simulation-only fault; deployment refuses it",
  )
  configlib.check(
    config.get("dp_sgd") is None or config.dp_sgd.noise_multiplier == 0,
    "config.dp_sgd.noise_multiplier > 0: example-level DP-SGD is not accounted in deployment "
    "(the per-site accountant runs only in the simulation); set it to 0",
  )
  configlib.check(
    f.clients_per_round == 0 and f.dropout == 0,
    "deployment: every connected site trains every round; set config.fed.clients_per_round=0 "
    "and config.fed.dropout=0 (sites that do not answer are left out and logged)",
  )
  for field in ("min_clients", "retries", "keep_site_states", "num_sites"):
    configlib.check_range(config, f"fl.{field}", 0)
  configlib.check_range(config, "fl.round_timeout_s", 0.0)
  configlib.check(
    not (config.fl.secagg and name in PER_SITE + CONTROL),
    f"config.fed.strategy={name!r} with config.fl.secagg=True: "
    + (
      "its server step needs every site's own update (to rank, screen or clip it), and "
      "SecAgg+ shows the server only their sum"
      if name in PER_SITE
      else "its control variates do not travel through SecAgg+ here"
    )
    + f"; set config.fl.secagg=False or choose one of {MEAN}",
  )
  configlib.check(
    name not in PER_SITE or config.fl.num_sites > 0,
    f"config.fl.num_sites=0: strategy {name!r} needs the consortium's size (the simulation's "
    "C: DP-FedAvg's denominator and accountant, the robust rules' per-site slots); set it to "
    "the number of sites",
  )
  server_strategy(config)  # the strategy's own checks for this consortium (Krum's C > 2f + 2)


# Strategies whose server step needs only the weighted mean of the sites' parameters
# (`server_step(x, mean, state)`; all that SecAgg+ reveals).
MEAN = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad")
# SCAFFOLD: the mean, plus the weighted mean of the sites' control-variate changes; each site
# keeps its own control variate c_i in its site state.
CONTROL = ("scaffold",)
# The server runs the simulation's aggregation hooks over each site's own update.
PER_SITE = (
  "fedavg_screened",
  "median",
  "trimmed_mean",
  "krum",
  "multi_krum",
  "norm_bound",
  "dp_fedavg",
)
# Personalised / kept-local models, SecAgg-in-JAX (Flower's SecAgg+ replaces it) and SplitAVG
# are refused: their state or arithmetic is per client on the server.
SUPPORTED = MEAN + CONTROL + PER_SITE


def server_strategy(config):
  """The strategy the server runs: config.fed.strategy set up for config.fl.num_sites sites
  that all take part every round (what the simulation's `for_run` does for C clients)."""
  f = config.fed
  num = max(config.fl.num_sites, 1)
  try:
    strategy = pretrain_checks.make_strategy(config).for_run(num, f.clients_per_round, f.sampling)
    jax.eval_shape(lambda: strategy.init({"w": jax.numpy.zeros(1)}, num, {}))
  except ValueError as e:  # ConfigError included
    raise configlib.ConfigError(
      f"config.fed.strategy={f.strategy!r} with config.fl.num_sites={config.fl.num_sites}: {e}"
    ) from None
  return strategy


def local_strategy(config):
  """The hooks a site runs in its local epoch. The robust and DP rules act only on the server:
  their clients train as FedAvg's (no context, no gradient transform)."""
  if config.fed.strategy in PER_SITE:
    return strategies.make_strategy("fedavg")
  return pretrain_checks.make_strategy(config)


def server_state(strategy, params, num_sites: int):
  """The strategy state the server keeps: strategy.init's, less SCAFFOLD's per-client
  controls (each site keeps its own c_i)."""
  state = strategy.init(params, max(num_sites, 1), {})
  return {k: v for k, v in state.items() if k != "c_clients"}


def secagg_weight(strategy, num_images: int) -> int:
  """The weight a site feeds SecAgg+ (Flower's num_examples): n_k, or 1 for uniform weighting."""
  return num_images if getattr(strategy, "weighting", "volume") == "volume" else 1


def round_scalars(metrics) -> dict:
  """A site's reply scalars (a Flower MetricRecord or dict) with their types."""
  types = dict(site_id=int, num_images=int, steps=int, loss=float, grad_norm=float)
  return {name: kind(metrics[name]) for name, kind in types.items()}


def training_keys(config):
  """(model init key, training key, preview key): the simulation's split of key(config.seed)."""
  return tuple(jax.random.split(jax.random.key(config.seed), 3))


class Compiled(NamedTuple):
  mesh: object
  programs: mim_programs.Programs
  chunk: object


_COMPILED: dict[str, Compiled] = {}


def compiled(config) -> Compiled:
  """The jitted local epoch for this config, shared by the sites of one process (a dry run or
  a test runs several; a deployment one). Keyed by what the compiled code depends on (the
  robust and DP rules share FedAvg's local epoch)."""
  strategy = local_strategy(config)
  fed = {k: v for k, v in config.fed.to_dict().items() if k not in ("strategy", "strategy_options")}
  key = json.dumps(
    [config[k].to_dict() for k in ("model", "optim", "ultramim")]
    + [fed, repr(strategy), config.data.batch_size, config.seed, config.on_nonfinite]
    + [list(config.sharding_rules)],
    sort_keys=True,
    default=str,
  )
  if key in _COMPILED:
    return _COMPILED[key]
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    programs = mim_programs.Programs(config, mesh, num_clients=1, num_lanes=1, strategy=strategy)
  base_loss = mim_objectives.make_loss_fn(programs.graphdef, config)

  def site_loss(params, batch, key):
    del key  # the site's own key(round, site_id, step) travels with the batch
    return base_loss(params, batch["images"], jax.random.wrap_key_data(batch["key"]))

  loss_fn = rounds.without_model_state(site_loss)
  engine_chunk = rounds.make_chunk(
    loss_fn, programs.tx, programs.strategy, programs.lr_fn, config.on_nonfinite
  )

  def chunk(server_params, state, *args):  # args: engine_chunk's after the state
    state, metrics = engine_chunk(strategies.Server(server_params, {}), state, *args)
    return state, metrics["loss"], metrics["grad_norm"]

  _COMPILED[key] = Compiled(mesh, programs, jax.jit(chunk, donate_argnums=(1,)))
  return _COMPILED[key]


class Site:
  """One site's data, compiled local epoch and on-disk state.  train_round(x, r) -> result."""

  def __init__(self, config, workdir):
    validate(config)
    configlib.check_range(config, "fl.site_id", 0)
    self.config, self.workdir = config, pathlib.Path(workdir)
    clients = clients_lib.client_sources(config)
    configlib.check(
      len(clients) == 1,
      f"a site trains one client, its own data; the config gives {len(clients)} "
      f"({[c.name for c in clients][:4]}): point config.data at this site's images only, or "
      "set config.data.clients=NAME or config.data.pool_clients=True",
    )
    self.source = clients[0]
    self.site_id = config.fl.site_id
    d = config.data
    self.num_images = len(self.source)
    configlib.check(
      self.num_images >= d.batch_size,
      f"site {self.source.name!r} has "
      f"{self.num_images} images, fewer than config.data.batch_size={d.batch_size}",
    )
    self.steps = self.num_images // d.batch_size * config.fed.local_epochs
    # The simulation's chunking rule, for this client alone.
    self.plan, self.chunk_steps = rounds.plan_chunked([self.steps], 1, config.fed.chunk_steps)

    pieces = compiled(config)
    self.mesh, self.abstract_params = pieces.mesh, pieces.programs.abstract_params
    self.programs, self._chunk = pieces.programs, pieces.chunk
    # SCAFFOLD's control variates c and c_i are float32 trees shaped like the params.
    self.scaffold = isinstance(self.programs.strategy, strategies.Scaffold)
    self.abstract_control = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, np.float32), self.abstract_params
    )
    _, self._train_key, _ = training_keys(config)
    self._step_keys = jax.jit(
      lambda rk, steps: jax.vmap(
        lambda s: jax.random.key_data(jax.random.fold_in(jax.random.fold_in(rk, self.site_id), s))
      )(steps)
    )
    logging.info(
      "Site %d (%s): %d images, %d local steps per round in chunks of %d.",
      self.site_id,
      self.source.name,
      self.num_images,
      self.steps,
      self.chunk_steps,
    )

  # --------------------------------------------------------------------------- data
  def _stream(self, state: dict | None):
    d = self.config.data
    ds = pipeline.client_dataset(
      self.source,
      self.site_id,
      d.batch_size,
      self.config.model.image_size,
      seed=self.config.seed,
      crop_scale=tuple(d.crop_scale),
      hflip=d.hflip,
    )
    it = iter(
      ds.to_iter_dataset(
        grain.ReadOptions(num_threads=d.num_threads, prefetch_buffer_size=d.num_threads)
      )
    )
    if state is not None:
      it.set_state(state)
    return it

  # --------------------------------------------------------------------------- state on disk
  def _state_path(self, rounds_done: int) -> pathlib.Path:
    return self.workdir / STATE_DIR / f"{rounds_done}.npz"

  def stored_rounds(self) -> list[int]:
    folder = self.workdir / STATE_DIR
    return sorted(int(p.stem) for p in folder.glob("*.npz")) if folder.exists() else []

  def _load(self, rounds_done: int, server_params):
    """(optimizer state [1, ...], data-iterator state or None, SCAFFOLD's c_i or None) after
    `rounds_done` rounds."""
    if rounds_done == 0:
      zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), self.abstract_control)
      return self.programs.init_opt(server_params), None, zeros if self.scaffold else None
    path = self._state_path(rounds_done)
    if not path.exists():
      raise configlib.DataError(
        f"site {self.site_id}: the server asks for round {rounds_done + 1} but {path} does not "
        f"exist (stored: {self.stored_rounds()}); this site's optimizer state and data "
        "position for that round are lost"
      )
    with np.load(path, allow_pickle=False) as f:
      meta = json.loads(str(f["__meta__"]))
      arrays = {k: f[k] for k in f.files if k != "__meta__"}
    control = {k[len(CONTROL_KEY) :]: v for k, v in arrays.items() if k.startswith(CONTROL_KEY)}
    arrays = {k: v for k, v in arrays.items() if not k.startswith(CONTROL_KEY)}
    opt = params_lib.from_arrays(arrays, self.programs.abstract_opt, where=str(path))
    if self.config.fed.reset_client_optimizer:
      opt = self.programs.init_opt(server_params)
    if self.scaffold:
      control = params_lib.from_arrays(control, self.abstract_control, where=f"{path} (c_i)")
    return jax.device_put(opt), meta["data"], control if self.scaffold else None

  def _save(self, rounds_done: int, opt_state, data_state, control=None) -> None:
    arrays = params_lib.to_arrays(opt_state)
    if control is not None:
      arrays.update({CONTROL_KEY + k: v for k, v in params_lib.to_arrays(control).items()})
    arrays["__meta__"] = np.array(
      json.dumps(dict(data=data_state, site_id=self.site_id, rounds_done=rounds_done))
    )
    loop.atomic_write(self._state_path(rounds_done), arrays)
    keep = self.config.fl.keep_site_states
    for old in self.stored_rounds()[:-keep] if keep else []:
      self._state_path(old).unlink(missing_ok=True)

  # --------------------------------------------------------------------------- a round
  def train_round(self, global_arrays: dict, round_index: int, control: dict | None = None) -> dict:
    """One local epoch from the global parameters of round `round_index` (0-based).

    control: SCAFFOLD's global control variate c ({key: float32 array}); required with
    SCAFFOLD and refused otherwise.
    Returns dict(update={key: y_k - x}, num_images=n_k, steps, loss (mean over the round's
    steps), grad_norm (mean global gradient norm)) and, with SCAFFOLD, control_delta={key:
    c_i' - c_i}. Raises DivergenceError on a non-finite step with config.on_nonfinite='stop'."""
    t0 = time.perf_counter()
    where = f"site {self.site_id}: round {round_index + 1}"
    x = params_lib.from_arrays(global_arrays, self.abstract_params, where=f"{where} parameters")
    configlib.check(
      (control is not None) == self.scaffold,
      f"{where}: config.fed.strategy={self.config.fed.strategy!r} and the server "
      f"{'sent' if control is not None else 'did not send'} a control variate; the server and "
      "this site run different strategies",
    )
    if self.scaffold:
      c = params_lib.from_arrays(control, self.abstract_control, where=f"{where} control c")
    with jax.set_mesh(self.mesh):
      x = jax.device_put(x)
      opt_state, data_state, c_i = self._load(round_index, x)
      stream = self._stream(data_state)
      # One client (index 0 on the lane): a fresh strategy state, with SCAFFOLD's c and this
      # site's own c_i where the simulation keeps client k's row.
      strategy_state = None
      if self.scaffold:
        strategy_state = dict(c=c, c_clients=jax.tree.map(lambda a: a[None], c_i))
      state = self.programs.start_round(x, opt_state, strategy_state)
      round_key = rounds.round_key(self._train_key, round_index)
      # The chunk's last arguments, the same in every chunk: steps per client, client weights
      # (one client), the round and its key.
      round_args = (
        np.asarray([self.steps], np.float32),
        np.ones(1, np.float32),
        np.int32(round_index),
        round_key,
      )
      image_size, batch_size = self.config.model.image_size, self.config.data.batch_size
      metrics = []  # (losses, grad norms) [1, K] of each chunk
      for j in range(self.plan.client_ids.shape[1] // self.chunk_steps):
        p = self.plan.chunk(j, self.chunk_steps)
        images = np.zeros((1, self.chunk_steps, batch_size, image_size, image_size, 3), np.uint8)
        for t in np.flatnonzero(p.client_ids[0] >= 0):
          images[0, t] = next(stream)
        keys = np.asarray(self._step_keys(round_key, p.step_ids[0]))[None]
        state, *chunk_metrics = self._chunk(x, state, dict(images=images, key=keys), p, *round_args)
        metrics.append(jax.device_get(chunk_metrics))
      # Lane 0 holds the client's last parameters; its optimizer state was stored back.
      # (Indexed on the host: an eager a[0] would compile once per leaf shape.)
      row = lambda tree: jax.tree.map(lambda a: np.asarray(a)[0], jax.device_get(tree))
      y, opt_state = row(state.params), state.client_opt_state
      new_c_i = None
      if self.scaffold:  # on_client_done wrote c_i' into the client's row
        new_c_i = row(state.strategy_state["c_clients"])
      losses, norms = (np.concatenate(m, 1) for m in zip(*metrics))
      valid = divergence.screen(
        losses,
        self.plan.client_ids >= 0,
        where=f"site {self.site_id} round {round_index + 1}",
        mode=self.config.on_nonfinite,
        describe=lambda i: f"local step {self.plan.step_ids[i]}",
      )
      update = jax.tree.map(
        lambda a, b: np.asarray(a, np.float32) - np.asarray(b, np.float32), y, jax.device_get(x)
      )
      self._save(round_index + 1, opt_state, stream.get_state(), new_c_i)
    loss = float(np.where(valid, losses, 0).sum() / max(valid.sum(), 1))
    logging.info(
      "site %d round %d: loss %.4f, %d steps, %.1f s",
      self.site_id,
      round_index + 1,
      loss,
      self.steps,
      time.perf_counter() - t0,
    )
    result = dict(
      update=params_lib.to_arrays(update),
      num_images=int(self.num_images),
      steps=int(valid.sum()),
      loss=loss,
      grad_norm=float(np.where(valid, norms, 0).sum() / max(valid.sum(), 1)),
    )
    if self.scaffold:
      delta = jax.tree.map(lambda a, b: np.asarray(a - b, np.float32), new_c_i, c_i)
      result["control_delta"] = params_lib.to_arrays(delta)
    return result


def load_config(spec: str, overrides: str = ""):
  """The config of `spec` ('configs/pretrain_fed.py:smoke', as --config takes it) with
  space-separated `field=value` overrides (Python literals, else strings), as Flower's
  run-config and node-config strings carry them."""
  path, _, arg = spec.partition(":")
  found = configlib.find_config_file(path)
  configlib.check(found is not None, f"config file {path!r} not found")
  config = configlib.load_config_module(str(found)).get_config(arg or None)
  for item in overrides.split():
    field, sep, text = item.partition("=")
    configlib.check(bool(sep), f"override {item!r} is not field=value")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    configlib.get_field(config, field)  # names an unknown field
    parent, _, leaf = field.rpartition(".")
    target = configlib.get_field(config, parent) if parent else config
    target[leaf] = type(target[leaf])(value) if isinstance(target[leaf], float) else value
  return config


def command_line(argv: list[str], program: str) -> tuple[str, str, str, list[str]]:
  """(config spec, absolute workdir, overrides, other args) of a `python -m ultrajax.fl.server`
  or `.client` command line: --config=FILE[:preset], --workdir=DIR, --config.<field>=<value>
  (joined space-separated, as load_config takes them); the other args pass through in order.
  ConfigError naming the argument at fault."""
  found, overrides, rest = {}, [], []
  for arg in argv:
    flag, eq, value = arg.partition("=")
    if flag in ("--config", "--workdir"):
      configlib.check(bool(value), f"{program}: {arg!r} needs a value: {flag}=...")
      found[flag] = value
    elif flag.startswith("--config."):
      configlib.check(
        bool(eq) and len(flag) > len("--config.") and not any(c.isspace() for c in value),
        f"{program}: {arg!r} is not --config.<field>=<value> (a value without spaces)",
      )
      overrides.append(arg[len("--config.") :])
    else:
      rest.append(arg)
  configlib.check(
    len(found) == 2, f"python -m {program} needs --config=FILE[:preset] and --workdir=DIR"
  )
  workdir = os.path.abspath(found["--workdir"])
  return found["--config"], workdir, " ".join(overrides), rest
