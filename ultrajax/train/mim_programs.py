"""The compiled programs of a pretraining round on the federated engine (fed/rounds.py).

Used by the pretraining job, the benchmarks (bench/) and the Flower site (fl/site.py): init,
start a round, run a K-step chunk, finish the round, preview, with explicit shardings.
"""

from __future__ import annotations

import functools
import time

import jax
import optax
from absl import logging
from flax import nnx

from ultrajax import pretrain_checks
from ultrajax.fed import aggregate, rounds
from ultrajax.fed.strategies import Server
from ultrajax.models import mae
from ultrajax.train import loop, mim_objectives, optimizer, perf, sharding


class Programs:
  """The compiled pieces of a round, with explicit shardings and donated round state.

  C clients train on L lanes (rounds.py): lane trees have a leading [L] axis, the clients'
  optimizer states a leading [C] axis; both are sharded over the mesh's 'clients' axis.
  """

  def __init__(
    self, config, mesh, num_clients, num_lanes, teacher=None, cached=False, strategy=None
  ):
    """For the config's MAE (graphdef, abstract pure-dict params) and the clients' AdamW (tx).

    teacher: (graphdef, pure-dict params) of the frozen teacher for config.target='teacher'
    (its params become a replicated, non-donated input of the chunk); cached: batches are
    {'images', 'teacher'} dicts from a teacher cache; strategy: the federated strategy
    (default: config.fed.strategy). Pretraining has no model state: Server(params, {})."""
    abstract_model = nnx.eval_shape(lambda: mae.mae_from_config(config.model, nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    abstract_params = nnx.to_pure_dict(abstract_params)
    tx = optimizer.adamw(config.optim, abstract_params)
    self.graphdef, self.abstract_params, self.tx = graphdef, abstract_params, tx
    self.strategy = strategy = strategy or pretrain_checks.make_strategy(config)
    rules = [tuple(r) for r in config.sharding_rules]
    stacked = lambda n: jax.eval_shape(
      functools.partial(aggregate.broadcast, num_clients=n), abstract_params
    )
    self.server_sharding = sharding.tree_shardings(abstract_params, mesh, rules, False)
    self.abstract_opt = jax.eval_shape(jax.vmap(tx.init), stacked(num_clients))
    self.opt_sharding = sharding.tree_shardings(self.abstract_opt, mesh, rules, True)
    self.abstract_strategy = jax.eval_shape(
      lambda p: strategy.init(p, num_clients, {}), abstract_params
    )
    self.strategy_sharding = rounds.state_shardings(self.abstract_strategy, mesh, rules)
    abstract_lanes = jax.eval_shape(
      lambda p, o, s: rounds.start_round(strategy, Server(p, {}), o, s, num_clients, num_lanes),
      abstract_params,
      self.abstract_opt,
      self.abstract_strategy,
    )
    lanes = lambda tree: sharding.tree_shardings(tree, mesh, rules + [(".*", "replicated")], True)
    self.state_sharding = rounds.LaneState(
      params=lanes(abstract_lanes.params),
      model_state={},
      opt_state=lanes(abstract_lanes.opt_state),
      ctx=lanes(abstract_lanes.ctx),
      client_opt_state=self.opt_sharding,
      strategy_state=self.strategy_sharding,
      acc=rounds.state_shardings(abstract_lanes.acc, mesh, rules),
    )
    self.vector = sharding.client_vector_sharding(mesh)  # [L, ...] plan arrays
    self.replicated = rep = sharding.replicated(mesh)
    server = Server(self.server_sharding, {})

    m = config.model
    self.init_params = jax.jit(
      lambda key: nnx.to_pure_dict(nnx.state(mae.mae_from_config(m, nnx.Rngs(key)), nnx.Param)),
      out_shardings=self.server_sharding,
    )
    self.init_opt = jax.jit(
      lambda server: jax.vmap(tx.init)(aggregate.broadcast(server, num_clients)),
      in_shardings=(self.server_sharding,),
      out_shardings=self.opt_sharding,
    )
    self.init_strategy = jax.jit(
      lambda p: strategy.init(p, num_clients, {}),
      in_shardings=(self.server_sharding,),
      out_shardings=self.strategy_sharding,
    )
    self._start_round = jax.jit(
      lambda p, o, s: rounds.start_round(strategy, Server(p, {}), o, s, num_clients, num_lanes),
      in_shardings=(self.server_sharding, self.opt_sharding, self.strategy_sharding),
      out_shardings=self.state_sharding,
      donate_argnums=(1, 2),
    )
    self._finish_round = jax.jit(
      lambda state, p, key: rounds.finish_round(strategy, state, Server(p, {}), key),
      in_shardings=(self.state_sharding, self.server_sharding, rep),
      out_shardings=(server, self.opt_sharding, self.strategy_sharding),
      donate_argnums=(0,),
    )

    o = config.optim
    self.lr_fn = functools.partial(
      optimizer.warmup_cosine,
      peak_lr=optimizer.peak_lr(o, config.data.batch_size),
      min_lr=o.min_lr,
      warmup=o.warmup_rounds,
      total=config.fed.num_rounds,
    )
    self.batch_sharding = sharding.batch_sharding(mesh, 6)
    if cached:
      self.batch_sharding = dict(
        images=self.batch_sharding, teacher=sharding.batch_sharding(mesh, 5)
      )
    plan_sharding = rounds.RoundPlan(*[self.vector] * 4)
    # Frozen inputs: the teacher's params (an empty dict for pixel targets), replicated.
    teacher_graphdef, teacher_params = teacher or (None, {})
    self.frozen = loop.put_global(teacher_params, rep)

    def jit_chunk(graphdef):
      def chunk(frozen, params, *args):
        loss_fn = rounds.without_model_state(
          mim_objectives.make_loss_fn(graphdef, config, teacher_graphdef, frozen)
        )
        make = rounds.make_chunk(loss_fn, tx, strategy, self.lr_fn, config.on_nonfinite)
        state, metrics = make(Server(params, {}), *args)
        return state, metrics["loss"], metrics["grad_norm"]

      # (frozen, params, lane state, batches, plan; steps per client, weights, round, key)
      in_shardings = (rep, self.server_sharding, self.state_sharding, self.batch_sharding)
      return jax.jit(
        chunk,
        in_shardings=(*in_shardings, plan_sharding, rep, rep, rep, rep),
        out_shardings=(self.state_sharding, self.vector, self.vector),
        donate_argnums=(2,),
      )

    self.chunk = jit_chunk(graphdef)
    # MFU counts each layer's work once, and every product: a rematerialised model's FLOPs, or
    # a GPU's whose attention is cuDNN's (one opaque call, no products in the trace), come
    # from the same chunk traced without remat and with explicit attention products (same
    # parameters and math; `trace_chunk`).
    self._counting_chunk = None
    impl = config.model.get("attention_impl", "dot_product")
    fused = impl == "dot_product" and sharding.compute_platform(mesh) == "gpu"
    if abstract_model.remat != "none" or fused:
      plain = {**config.model.to_dict(), "remat": "none", "attention_impl": "einsum"}
      plain_model = nnx.eval_shape(lambda: mae.mae_from_config(plain, nnx.Rngs(0)))
      self._counting_chunk = jit_chunk(nnx.split(plain_model, nnx.Param)[0])
    self.num_devices = mesh.size
    self.param_norm = jax.jit(optax.global_norm, out_shardings=rep)
    # Replicated output: process 0 writes the PNG even when params are sharded across hosts.
    if teacher is None:
      self.preview = jax.jit(mim_objectives.make_preview_fn(graphdef, config), out_shardings=rep)
    else:
      preview = mim_objectives.make_feature_preview_fn(graphdef, teacher_graphdef, config)
      self.preview = functools.partial(jax.jit(preview, out_shardings=rep), self.frozen)
    self._compiled_chunk = None
    self.chunk_flops_by_dtype = {}  # set by compile_chunk

  def start_round(self, params, opt_state, strategy_state=None):
    """Lane state for a round from the server params, the clients' optimizer states and the
    strategy state (a fresh one when None, as benchmarks start); donates the last two."""
    if strategy_state is None:
      strategy_state = self.init_strategy(params)
    return self._start_round(params, opt_state, strategy_state)

  def finish_round(self, state, params, round_key=None):
    """(server params, clients' optimizer states, strategy state) after the round's last chunk."""
    key = jax.random.key(0) if round_key is None else round_key
    server, opt_state, strategy_state = self._finish_round(state, params, key)
    return server.params, opt_state, strategy_state

  def trace_chunk(self, *args):
    """(the chunk traced for these real or abstract arguments after `frozen`, its model FLOPs
    per device and call by the products' operand dtype): the matrix products of the trace
    (perf.matmul_flops_by_dtype: every layer of a scanned model; a remat'd model counted
    without remat, cuDNN's attention as its products) over the mesh's devices. XLA's cost
    analysis counts a loop body once, and recomputation and work repeated on every device too,
    so its figure is not the one MFU divides by."""
    traced = self.chunk.trace(self.frozen, *args)
    counted = traced
    if self._counting_chunk is not None:
      counted = self._counting_chunk.trace(self.frozen, *args)
    by_dtype = perf.matmul_flops_by_dtype(counted.jaxpr)
    return traced, {key: flops / self.num_devices for key, flops in by_dtype.items()}

  def compile_chunk(self, *args):
    """The chunk compiled for these arguments (after `frozen`); sets chunk_flops_by_dtype."""
    traced, self.chunk_flops_by_dtype = self.trace_chunk(*args)
    return traced.lower().compile()

  @property
  def chunk_flops(self) -> float | None:
    """Model FLOPs per device and chunk call (trace_chunk's, all dtypes); None before the chunk
    is compiled."""
    return sum(self.chunk_flops_by_dtype.values()) if self.chunk_flops_by_dtype else None

  def chunk_hlo(self) -> str:
    """The compiled chunk's optimized HLO text, once run_chunk has compiled it."""
    return self._compiled_chunk.as_text()

  def run_chunk(self, *args):
    """Compiles on first use (keeping the model FLOPs for MFU), then runs asynchronously."""
    if self._compiled_chunk is None:
      t0 = time.perf_counter()
      self._compiled_chunk = self.compile_chunk(*args)
      logging.info(
        "Compiled the round chunk in %.1f s (%.1f GFLOP per call per device).",
        time.perf_counter() - t0,
        self.chunk_flops / 1e9,
      )
    return self._compiled_chunk(self.frozen, *args)
