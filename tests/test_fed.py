"""Federated machinery on a toy model: weights, round planning, and the lane engine's local
steps against plain optax (strategies against numpy: tests/test_strategies.py)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ultrajax.fed import aggregate, rounds, strategies
from ultrajax.train import optimizer, sharding


def test_client_weights_by_hand():
  np.testing.assert_allclose(aggregate.client_weights([10, 30, 60], "volume"), [0.1, 0.3, 0.6])
  np.testing.assert_allclose(aggregate.client_weights([10, 30, 60], "uniform"), [1 / 3] * 3)
  with pytest.raises(ValueError, match="'median'"):
    aggregate.client_weights([1, 2], "median")
  with pytest.raises(ValueError, match="empty"):
    aggregate.client_weights([0, 0], "volume")


def test_broadcast_copies_the_server_tree_to_every_client():
  tree = {"a": np.arange(6.0).reshape(2, 3), "b": {"c": np.float32(2.0)}}
  back = aggregate.broadcast(tree, 4)
  assert back["a"].shape == (4, 2, 3) and back["b"]["c"].shape == (4,)
  np.testing.assert_array_equal(back["a"][3], tree["a"])


def _toy_problem():
  """Linear regression whose loss uses the key (a random half of the batch), so keys matter."""

  def loss_fn(params, batch, key):
    x, y = batch
    keep = jax.random.bernoulli(key, 0.5, (x.shape[0],)).astype(jnp.float32)
    err = (x @ params["w"] + params["b"] - y) ** 2
    return (keep * err.mean(-1)).sum() / jnp.maximum(keep.sum(), 1.0), None

  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros((2,))}
  config = ml_collections.ConfigDict(
    dict(b1=0.9, b2=0.95, weight_decay=0.05, weight_decay_on="mae", grad_clip_norm=0.0)
  )
  lr_fn = lambda epoch: optimizer.warmup_cosine(
    epoch, peak_lr=0.1, min_lr=0.01, warmup=1.0, total=5.0
  )
  return loss_fn, params, config, lr_fn


def _adam_moments(state):
  """The ScaleByAdamState inside a (nested) optax state."""
  if hasattr(state, "mu"):
    return state
  children = state.inner_state if hasattr(state, "inner_state") else state
  for child in children if isinstance(children, tuple) else ():
    found = _adam_moments(child)
    if found is not None:
      return found
  return None


def _train_lanes(
  loss_fn,
  tx,
  lr_fn,
  params,
  xs,
  ys,
  steps_per_client,
  weights,
  num_lanes,
  chunk_steps,
  round_index,
  key,
):
  """One planned round, chunk by chunk, as the pretraining job runs it."""
  num_clients = len(steps_per_client)
  plan = rounds.plan_round(steps_per_client, num_lanes, chunk_steps)
  opt = jax.vmap(tx.init)(aggregate.broadcast(params, num_clients))
  fedavg, server = strategies.make_strategy("fedavg"), strategies.Server(params, {})
  state = rounds.start_round(
    fedavg, server, opt, fedavg.init(params, num_clients), num_clients, num_lanes
  )
  chunk = jax.jit(rounds.make_chunk(rounds.without_model_state(loss_fn), tx, fedavg, lr_fn))
  losses = []
  for j in range(plan.client_ids.shape[1] // chunk_steps):
    p = plan.chunk(j, chunk_steps)
    c, s = np.maximum(p.client_ids, 0), p.step_ids
    batch = (
      np.where((p.client_ids >= 0)[..., None, None], xs[c, s], 0),
      np.where((p.client_ids >= 0)[..., None, None], ys[c, s], 0),
    )
    state, metrics = chunk(
      server, state, batch, p, steps_per_client.astype(np.float32), weights, round_index, key
    )
    losses.append(metrics["loss"])
  server, client_opt, _ = rounds.finish_round(fedavg, state, server, key)
  server = server.params
  return (
    server,
    client_opt,
    rounds.client_losses(np.concatenate(losses, 1), plan.client_ids, num_clients),
  )


@pytest.mark.parametrize("num_lanes, chunk_steps", [(3, 4), (2, 2), (1, 3)])
def test_planned_round_equals_sequential_clients_then_fedavg(num_lanes, chunk_steps):
  """A round on L lanes == each client trained alone, step by step, with plain optax.adamw at
  the scheduled learning rate, then FedAvg by numpy (an independent re-implementation)."""
  loss_fn, params, config, lr_fn = _toy_problem()
  tx = optimizer.adamw(config, params)
  steps_per_client = np.array([4, 2, 3])
  weights = aggregate.client_weights([40, 20, 35], "volume")
  round_index = 2
  rng = np.random.default_rng(1)
  xs = rng.normal(size=(3, 4, 8, 3)).astype(np.float32)
  ys = rng.normal(size=(3, 4, 8, 2)).astype(np.float32)
  key = rounds.round_key(jax.random.key(0), round_index)
  server, client_opt, losses = _train_lanes(
    loss_fn,
    tx,
    lr_fn,
    params,
    xs,
    ys,
    steps_per_client,
    weights,
    num_lanes,
    chunk_steps,
    round_index,
    key,
  )

  expected = {name: 0.0 for name in params}
  for c in range(3):
    p = params
    mask = jax.tree.map(lambda x: x.ndim > 1, p)
    adam_state = optax.adamw(0.0, mask=mask).init(p)
    client_loss = []
    for s in range(steps_per_client[c]):
      step_key = jax.random.fold_in(jax.random.fold_in(key, c), s)
      loss, grads = jax.value_and_grad(lambda q: loss_fn(q, (xs[c, s], ys[c, s]), step_key)[0])(p)
      lr = lr_fn(round_index + s / steps_per_client[c])
      updates, adam_state = optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.05, mask=mask).update(
        grads, adam_state, p
      )
      p = optax.apply_updates(p, updates)
      client_loss.append(loss)
    np.testing.assert_allclose(losses[c], np.mean(client_loss), rtol=1e-5)
    for name in p:
      expected[name] = expected[name] + weights[c] * np.asarray(p[name])
    # The client's AdamW moments were stored back for the next round.
    stored, reference = _adam_moments(client_opt), _adam_moments(adam_state)
    np.testing.assert_allclose(stored.mu["w"][c], reference.mu["w"], rtol=1e-5, atol=1e-7)
    assert int(stored.count[c]) == steps_per_client[c]
  for name in params:
    np.testing.assert_allclose(server[name], expected[name], rtol=1e-5, atol=1e-6)


def test_the_chunk_traces_on_client_done_once_whatever_the_lanes():
  """The lanes that finish a client go through one loop body: the strategy's on_client_done is
  traced once for 1 and for 3 lanes (a Python loop over the lanes traced it once per lane,
  which multiplied the chunk's compile time)."""
  loss_fn, params, config, _ = _toy_problem()
  tx = optimizer.adamw(config, params)
  traced = []

  class Counting(strategies.FedAvg):
    def on_client_done(self, acc, state, server, done):
      traced.append(1)
      return super().on_client_done(acc, state, server, done)

  strategy, server = Counting(), strategies.Server(params, {})
  for num_lanes in (1, 3):
    traced.clear()
    plan = rounds.plan_round(np.array([2, 2, 2]), num_lanes, 2)
    state = rounds.start_round(
      strategy,
      server,
      jax.vmap(tx.init)(aggregate.broadcast(params, 3)),
      strategy.init(params, 3),
      3,
      num_lanes,
    )
    batch = (np.zeros((num_lanes, 2, 8, 3), np.float32), np.zeros((num_lanes, 2, 8, 2), np.float32))
    chunk = rounds.make_chunk(rounds.without_model_state(loss_fn), tx, strategy)
    args = (server, state, batch, plan.chunk(0, 2), np.full(3, 2.0, np.float32), np.ones(3) / 3)
    jax.make_jaxpr(chunk)(*args, 0, jax.random.key(0))
    assert len(traced) == 1, (num_lanes, len(traced))


def test_plan_round_packs_every_step_once_in_order():
  steps = np.array([7, 1, 3, 3, 2, 6])
  plan = rounds.plan_round(steps, num_lanes=3, chunk_steps=4)
  assert plan.client_ids.shape == (3, 8)  # LPT: {7, 1}, {6, 2}, {3, 3}: 8 steps, one chunk pad
  for c, n in enumerate(steps):
    lane, t = np.nonzero(plan.client_ids == c)
    assert len(set(lane)) == 1 and np.array_equal(t, np.arange(t[0], t[0] + n))
    np.testing.assert_array_equal(plan.step_ids[lane, t], np.arange(n))
    assert plan.first[lane[0], t[0]] and plan.last[lane[0], t[-1]]
  assert plan.first.sum() == plan.last.sum() == len(steps)
  assert rounds.auto_lanes(steps) == 4  # ceil(22 / 7) = 4 lanes and LPT fits in 7 steps
  assert rounds.auto_lanes(steps, multiple_of=4) == 4
  assert rounds.auto_lanes([5, 5, 5]) == 3 and rounds.auto_lanes([9, 1, 1, 1]) == 2
  # Clients with 0 steps (not sampled this round) are left out; an empty round has no steps.
  sampled = rounds.plan_round(steps * np.array([1, 0, 1, 0, 0, 1]), num_lanes=2, chunk_steps=4)
  assert sorted(set(sampled.client_ids[sampled.client_ids >= 0])) == [0, 2, 5]
  assert sampled.first.sum() == 3 and (sampled.client_ids >= 0).sum() == 16
  assert rounds.plan_round(np.zeros(3, int), 2, 4).client_ids.shape == (2, 0)


def test_idle_lane_steps_change_nothing():
  loss_fn, params, config, lr_fn = _toy_problem()
  tx = optimizer.adamw(config, params)
  opt = jax.vmap(tx.init)(aggregate.broadcast(params, 2))
  scaffold, server = strategies.make_strategy("scaffold"), strategies.Server(params, {})
  state = rounds.start_round(scaffold, server, opt, scaffold.init(params, 2), 2, 2)
  plan = rounds.RoundPlan(
    np.full((2, 2), -1, np.int32),
    np.zeros((2, 2), np.int32),
    np.zeros((2, 2), bool),
    np.zeros((2, 2), bool),
  )
  batch = (jnp.ones((2, 2, 4, 3)), jnp.ones((2, 2, 4, 2)))
  out, metrics = rounds.make_chunk(rounds.without_model_state(loss_fn), tx, scaffold, lr_fn)(
    server, state, batch, plan, jnp.ones((2,)), jnp.array([0.5, 0.5]), 0, jax.random.key(0)
  )
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(metrics["loss"], 0.0)
  # An empty round (every sampled client dropped) leaves the server where it was.
  new, _, _ = rounds.finish_round(scaffold, out, server, jax.random.key(0))
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(a, b)


def test_warmup_cosine_by_hand():
  kw = dict(peak_lr=1.0, min_lr=0.1, warmup=2.0, total=6.0)
  assert float(optimizer.warmup_cosine(1.0, **kw)) == pytest.approx(0.5)
  assert float(optimizer.warmup_cosine(2.0, **kw)) == pytest.approx(1.0)
  assert float(optimizer.warmup_cosine(4.0, **kw)) == pytest.approx(0.55)  # half way: mid value
  assert float(optimizer.warmup_cosine(6.0, **kw)) == pytest.approx(0.1)


def test_weight_decay_masks():
  params = {"kernel": np.zeros((2, 3)), "bias": np.zeros((3,)), "cls": np.zeros((1, 1, 3))}
  assert optimizer.weight_decay_mask(params, "mae") == {"kernel": True, "bias": False, "cls": True}
  assert all(optimizer.weight_decay_mask(params, "all").values())


def test_chunk_grad_norms_are_each_steps_global_gradient_norm():
  """grad_norms=True: each step's norm is the global L2 norm of the gradient at the params that
  step saw (SGD worked by hand in numpy); idle steps report 0."""
  loss_fn = lambda p, batch, key: (jnp.sum((p["w"] - batch) ** 2), None)  # noqa: E731
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  batches = jnp.asarray([[[1.0, 2.0], [3.0, -1.0]], [[2.0, 0.0], [0.0, 0.0]]])  # [L=2, K=2, 2]
  plan = rounds.RoundPlan(
    np.array([[0, 0], [1, -1]], np.int32),
    np.array([[0, 1], [0, 0]], np.int32),
    np.array([[True, False], [True, False]]),
    np.array([[False, True], [True, False]]),
  )
  server = {"w": jnp.zeros(2)}
  opt = jax.vmap(tx.init)({"w": jnp.zeros((2, 2))})
  fedavg = strategies.make_strategy("fedavg")
  chunk = rounds.make_chunk(rounds.without_model_state(loss_fn), tx, fedavg, lambda e: 0.1)
  server = strategies.Server(server, {})
  _, metrics = chunk(
    server,
    rounds.start_round(fedavg, server, opt, {}, 2, 2),
    batches,
    plan,
    jnp.asarray([2.0, 1.0]),
    jnp.asarray([0.5, 0.5]),
    jnp.asarray(0.0),
    jax.random.key(0),
  )
  losses, norms = metrics["loss"], metrics["grad_norm"]
  w0 = np.zeros(2)
  g0 = 2 * (w0 - np.array([1.0, 2.0]))
  w1 = w0 - 0.1 * g0
  g1 = 2 * (w1 - np.array([3.0, -1.0]))
  np.testing.assert_allclose(
    np.asarray(norms), [[np.linalg.norm(g0), np.linalg.norm(g1)], [4.0, 0.0]], rtol=1e-6
  )
  assert np.asarray(losses)[1, 1] == 0.0


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_apply_if_is_a_cond_or_a_loop_by_the_compiled_platform(platform):
  """rounds.apply_if(pred, fn, state) is fn(state) when pred holds, else state. Traced for a
  GPU (the abstract mesh's devices, as when compiling for one without it) it is a loop of
  int(pred) iterations, which XLA:GPU updates in place where a cond's identity branch copied
  the whole state; traced for the CPU it stays a cond (the loop was slower there)."""
  from jax._src import mesh as mesh_lib

  device = mesh_lib.AbstractDevice("fake", None, platform)
  mesh = jax.sharding.AbstractMesh((1,), ("data",), abstract_device=device)
  state = {"w": jnp.arange(6.0).reshape(2, 3), "n": jnp.int32(4)}
  fn = lambda s: {"w": s["w"] * 2 + 1, "n": s["n"] - 1}  # noqa: E731
  with jax.sharding.use_abstract_mesh(mesh):
    f = lambda pred, s: rounds.apply_if(pred, fn, s)  # noqa: E731
    assert sharding.compute_platform() == platform
    primitives = {e.primitive.name for e in jax.make_jaxpr(f)(True, state).eqns}
    for pred, want in ((True, fn(state)), (False, state)):  # run as traced, on the CPU
      jax.tree.map(np.testing.assert_array_equal, f(jnp.bool_(pred), state), want)
  assert ("while" if platform == "gpu" else "cond") in primitives
