"""Every federated strategy on the lane engine against an independent numpy float64 round, plus
client sampling, dropouts and the split-learning driver."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ultrajax.fed import aggregate, local, participation, rounds, strategies

LR = 0.1
C, S, B, D = 3, 4, 5, 3
STEPS = np.array([4, 2, 3])
EXAMPLES = np.array([40, 10, 30])
K = 2  # chunk steps


def _loss(params, model_state, batch, key):
  """Least squares on a linear model; model_state counts steps (a stand-in for BN stats)."""
  del key
  pred = batch["x"] @ params["dense"]["w"] + params["bn"]["b"]
  loss = jnp.mean((pred - batch["y"]) ** 2)
  return loss, ({"bn": {"count": model_state["bn"]["count"] + 1.0}}, {"pred_mean": pred.mean()})


def _grad_np(w, b, x, y):
  r = x @ w + b - y
  return 2 * x.T @ r / len(y), 2 * r.mean()


@functools.cache
def _data():
  rng = np.random.default_rng(0)
  batches = {
    "x": rng.normal(size=(C, S, B, D)).astype(np.float32),
    "y": rng.normal(size=(C, S, B)).astype(np.float32),
  }
  params = {"dense": {"w": rng.normal(size=(D,)).astype(np.float32)}, "bn": {"b": np.float32(0.3)}}
  return batches, params


@functools.cache
def _programs(strategy, num_lanes):
  """(start, chunk, finish, client models) of a strategy on num_lanes lanes. Run eagerly
  (jax.disable_jit in _run): on these tiny shapes that is far cheaper than compiling each."""
  return (
    lambda *a: rounds.start_round(strategy, *a, C, num_lanes),
    rounds.make_chunk(_loss, optax.sgd(LR), strategy),
    functools.partial(rounds.finish_round, strategy),
    lambda s, x: rounds.client_models(strategy, s, x, C),
  )


def _run(strategy, num_lanes, participants, num_rounds=2):
  """num_rounds planned rounds on the engine; participants: [R][C] bool."""
  batches, params = _data()
  server = strategies.Server(params, {"bn": {"count": jnp.zeros(())}})
  sstate = strategy.init(server.params, C, server.model_state)
  opt = jax.vmap(optax.sgd(LR).init)(aggregate.broadcast(params, C))
  weights = strategy.client_weights(EXAMPLES)
  start, chunk, finish, models = _programs(strategy, num_lanes)
  with jax.disable_jit():
    return _rounds(
      start,
      chunk,
      finish,
      models,
      server,
      opt,
      sstate,
      weights,
      num_lanes,
      participants,
      num_rounds,
    )


def _rounds(
  start, chunk, finish, models, server, opt, sstate, weights, num_lanes, participants, num_rounds
):
  batches, _ = _data()
  for r in range(num_rounds):
    plan = rounds.plan_round(STEPS * participants[r], num_lanes, K)
    state = start(server, opt, sstate)
    for j in range(plan.client_ids.shape[1] // K):
      p = plan.chunk(j, K)
      c = np.maximum(p.client_ids, 0)
      batch = jax.tree.map(lambda a: a[c, p.step_ids], batches)
      state, metrics = chunk(
        server, state, batch, p, STEPS.astype(np.float32), weights, r, jax.random.key(r)
      )
      assert set(metrics) == {"loss", "grad_norm", "pred_mean"}
    server, opt, sstate = finish(state, server, jax.random.key(r))
  return server, sstate, models(sstate, server)


def _numpy_rounds(
  name, participants, mu=0.0, alpha=0.5, server_lr=1e-2, b1=0.9, b2=0.99, tau=1e-3, kept=False
):
  """The same rounds in numpy float64: local SGD (+ FedProx / SCAFFOLD terms) from what each
  client starts with, then the strategy's server step over the clients that took part.
  Returns the server (w, b, count) and every client's next-round model [(w, b, count)]."""
  batches, params = _data()
  uniform = name == "fedavg_uniform"
  pop = np.full(C, 1 / C) if uniform else EXAMPLES / EXAMPLES.sum()
  x = [np.array(params["dense"]["w"], np.float64), float(params["bn"]["b"]), 0.0]
  own = [list(x) for _ in range(C)]  # each client's own model (personalized, local, kept 'bn')
  c, ci = np.zeros(D + 1), np.zeros((C, D + 1))  # SCAFFOLD controls over (w, b)
  m, v = np.zeros(D + 1), np.full(D + 1, tau**2)
  for part in participants:
    ys = {}
    for k in np.flatnonzero(part):
      if name in ("personalized", "local"):
        start = list(own[k])
      elif kept:
        start = [x[0], own[k][1], own[k][2]]
      else:
        start = list(x)
      w, b = start[0].copy(), start[1]
      for s in range(STEPS[k]):
        gw, gb = _grad_np(w, b, batches["x"][k, s].astype(np.float64), batches["y"][k, s])
        g = np.append(gw, gb) + mu * (np.append(w, b) - np.append(start[0], start[1]))
        g = g + (c - ci[k] if name == "scaffold" else 0.0)
        w, b = w - LR * g[:D], b - LR * g[D]
      ys[k] = [w, b, start[2] + STEPS[k]]
    done = sorted(ys)
    wsum = pop[done].sum()
    mean = [sum(pop[k] * ys[k][i] for k in done) / wsum for i in range(3)]
    flat = lambda t: np.append(t[0], t[1])
    if name == "scaffold":
      delta_c = 0.0
      for k in done:
        new = ci[k] - c + (flat(x) - flat(ys[k])) / (STEPS[k] * LR)
        delta_c, ci[k] = delta_c + pop[k] * (new - ci[k]), new
      c = c + delta_c
      step = flat(x) + 1.0 * (flat(mean) - flat(x))
      x = [step[:D], step[D], mean[2]]
    elif name in ("fedadam", "fedyogi", "fedadagrad"):
      delta = flat(mean) - flat(x)
      m = b1 * m + (1 - b1) * delta
      v = {
        "fedadam": lambda: b2 * v + (1 - b2) * delta**2,
        "fedyogi": lambda: v - (1 - b2) * delta**2 * np.sign(v - delta**2),
        "fedadagrad": lambda: v + delta**2,
      }[name]()
      step = flat(x) + server_lr * m / (np.sqrt(v) + tau)
      x = [step[:D], step[D], mean[2]]
    else:
      x = mean
    if name in ("personalized", "local"):
      a = 1.0 if name == "local" else alpha
      for k in done:
        others = [ys[j] for j in done if j != k]
        own[k] = [
          a * ys[k][i] + (1 - a) * sum(o[i] for o in others) / len(others) if others else ys[k][i]
          for i in range(3)
        ]
    elif kept:
      for k in done:
        own[k] = [None, ys[k][1], ys[k][2]]
  if name in ("personalized", "local"):
    models = own
  elif kept:
    models = [[x[0], own[k][1], own[k][2]] for k in range(C)]
  else:
    models = [x] * C
  return x, models


CASES = {  # name: (make_strategy options, _numpy_rounds options)
  "fedavg": ({}, {}),
  "central": ({}, {}),
  "fedavg_uniform": ({}, {}),
  "fedprox": ({"mu": 0.5}, {"mu": 0.5}),
  "fedbn": ({}, {"kept": True}),
  "keep_local": ({"keep_local": ("^bn/",)}, {"kept": True}),
  "personalized": ({}, {}),
  "local": ({}, {}),
  "fedadam": ({"server_lr": 0.1}, {"server_lr": 0.1}),
  "fedyogi": ({"server_lr": 0.1}, {"server_lr": 0.1}),
  "fedadagrad": ({"server_lr": 0.1}, {"server_lr": 0.1}),
  "scaffold": ({"local_lr": LR}, {}),
}


def _check(got, want_server, want_models):
  server, _, (params, model_state) = got
  np.testing.assert_allclose(server.params["dense"]["w"], want_server[0], rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(server.params["bn"]["b"], want_server[1], rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(server.model_state["bn"]["count"], want_server[2], rtol=1e-6)
  for k, (w, b, count) in enumerate(want_models):
    np.testing.assert_allclose(params["dense"]["w"][k], w, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(params["bn"]["b"][k], b, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(model_state["bn"]["count"][k], count, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_planned_rounds_on_any_lanes_equal_numpy_sequential_clients(name):
  """Two rounds over C = 3 clients of 4, 2, 3 steps on L = 1, 2 and C lanes (chunks of 2) equal
  each client trained alone, then the strategy's server step, in numpy float64."""
  options, reference = CASES[name]
  strategy = strategies.make_strategy(name, **options)
  everyone = np.ones((2, C), bool)
  want = _numpy_rounds(name, everyone, **reference)
  for num_lanes in (1, 2, C):
    _check(_run(strategy, num_lanes, everyone), *want)


@pytest.mark.parametrize("name", ["fedavg", "scaffold", "personalized"])
def test_sampled_rounds_equal_numpy_over_the_participants(name):
  """Partial participation: the means are renormalised over the participants, SCAFFOLD's c moves
  by sum_S w_k dc_k, and only participants' personalised models change."""
  options, reference = CASES[name]
  participants = np.array([[True, False, True], [False, True, True]])
  want = _numpy_rounds(name, participants, **reference)
  _check(_run(strategies.make_strategy(name, **options), 2, participants), *want)


def test_fedavg_over_a_sampled_set_is_the_numpy_weighted_mean_and_a_dropout_only_removes_itself():
  """One round: FedAvg over the draw's participants equals np.average of their own one-client
  rounds with weights n_k; dropping a client gives the mean over the others."""
  fedavg = strategies.make_strategy("fedavg")
  alone = [_run(fedavg, 1, np.eye(C, dtype=bool)[[k]], num_rounds=1)[0].params for k in range(C)]
  drawn = participation.draw(EXAMPLES, 0, seed=3, clients_per_round=2)
  for mask in (drawn.participants, np.array([True, False, True]), np.array([True, True, True])):
    got = _run(fedavg, 2, mask[None], num_rounds=1)[0].params
    want = np.average(
      [alone[k]["dense"]["w"] for k in np.flatnonzero(mask)], axis=0, weights=EXAMPLES[mask]
    )
    np.testing.assert_allclose(got["dense"]["w"], want, rtol=1e-5)


def test_draws_are_reproducible_sized_and_proportional():
  n = np.array([1, 1, 1, 1, 96])
  a = [participation.draw(n, r, 7, 2).sampled for r in range(20)]
  assert all(np.array_equal(x, participation.draw(n, r, 7, 2).sampled) for r, x in enumerate(a))
  assert all(x.sum() == 2 for x in a) and len({x.tobytes() for x in a}) > 1
  assert participation.draw(n, 0, 7, 0.4).sampled.sum() == 2  # a fraction of C
  assert participation.draw(n, 0, 7).sampled.all()
  volume = np.mean([participation.draw(n, r, 7, 1, "volume").sampled[4] for r in range(200)])
  assert volume > 0.9  # ~96% of the data
  poisson = np.stack([participation.draw(n, r, 7, 0.3, "poisson").sampled for r in range(400)])
  assert abs(poisson.mean() - 0.3) < 0.04  # Bernoulli(q) per client
  # Dropouts come from their own stream: the sample does not depend on the dropout rate.
  d = participation.draw(n, 5, 7, 3, dropout=0.5)
  assert np.array_equal(d.sampled, participation.draw(n, 5, 7, 3).sampled)
  assert not (d.dropped & ~d.sampled).any() and np.array_equal(
    d.participants, d.sampled & ~d.dropped
  )


@pytest.mark.parametrize(
  "args, field",
  [
    ((0, "stratified", 0.0), "sampling"),
    ((0, "uniform", 1.0), "dropout"),
    ((-1, "uniform", 0.0), "clients_per_round"),
    ((2.5, "uniform", 0.0), "clients_per_round"),
    ((3, "poisson", 0.0), "clients_per_round"),
    ((9, "uniform", 0.0), "clients_per_round"),
  ],
)
def test_bad_participation_names_the_field(args, field):
  with pytest.raises(ValueError, match=f"^{field}="):
    participation.check(*args, num_clients=5)


def test_fedadam_bias_corrected_is_optax_adam_on_the_pseudo_gradient():
  rng = np.random.default_rng(3)
  x0 = {"w": rng.normal(size=(4,)).astype(np.float32)}
  strategy = strategies.make_strategy("fedadam", bias_correction=True, server_lr=0.05)
  state, server = strategy.init(x0, 1), strategies.Server(x0, {})
  ref_tx = optax.adam(0.05, b1=0.9, b2=0.99, eps=1e-3)
  ref_opt, x_ref = ref_tx.init(x0), x0
  for _ in range(3):
    y = jax.tree.map(lambda a: a + rng.normal(size=a.shape).astype(np.float32), server.params)
    acc, state = strategy.on_client_done(
      strategy.accumulator(state, server, 1), state, server, strategies.Finished(0, 1.0, y, {}, 1.0)
    )
    server, state = strategy.server_update(acc, state, server)
    upd, ref_opt = ref_tx.update(jax.tree.map(jnp.subtract, x_ref, y), ref_opt, x_ref)
    x_ref = optax.apply_updates(x_ref, upd)
    np.testing.assert_allclose(server.params["w"], x_ref["w"], rtol=1e-5, atol=1e-6)


def test_options_parse_and_bad_names_and_patterns_raise():
  assert strategies.parse_options("mu=0.1, keep_local=('^a/',)") == {
    "mu": 0.1,
    "keep_local": ("^a/",),
  }
  assert strategies.parse_options("  ") == {}
  with pytest.raises(ValueError, match="name=value"):
    strategies.parse_options("0.1")
  with pytest.raises(ValueError, match="unknown federated strategy 'fedavgg'.*fedavg"):
    strategies.make_strategy("fedavgg")
  with pytest.raises(ValueError, match="takes no option"):
    strategies.make_strategy("fedavg", mu=0.1)
  with pytest.raises(ValueError, match="takes no option"):
    strategies.make_strategy("local", alpha=0.5)
  with pytest.raises(ValueError, match="needs keep_local"):
    strategies.make_strategy("keep_local")
  with pytest.raises(ValueError, match="alpha=1.5 is outside"):
    strategies.make_strategy("personalized", alpha=1.5)
  with pytest.raises(ValueError, match="local_lr=0"):
    strategies.make_strategy("scaffold", local_lr=0)
  _, params = _data()
  with pytest.raises(ValueError, match="'classifier' matches no"):
    strategies.make_strategy("keep_local", keep_local=("classifier",)).init(params, C)
  with pytest.raises(ValueError, match="matches no"):  # a tree without any norm layer
    strategies.make_strategy("fedbn").init({"dense": {"kernel": np.ones((2, 2))}}, C)


@pytest.mark.parametrize("cut_grad", ["average", "own"])
def test_splitavg_step_matches_numpy(cut_grad):
  """Clients h_k = x_k A_k, server pred = h v on the concatenated batch, MSE; one SGD step."""
  rng = np.random.default_rng(6)
  H = 2
  x = rng.normal(size=(2, 1, B, D)).astype(np.float32)  # [C=2, S=1, B, D]
  y = rng.normal(size=(2, 1, B)).astype(np.float32)
  a0, v0 = rng.normal(size=(D, H)).astype(np.float32), rng.normal(size=(H,)).astype(np.float32)
  client_fn = lambda p, ms, batch, key: (batch["x"] @ p["a"], ms)
  server_loss = lambda p, ms, h, batch, key: (jnp.mean((h @ p["v"] - batch["y"]) ** 2), (ms, {}))
  tx = optax.sgd(LR)
  strategy = strategies.make_strategy("splitavg", cut_grad=cut_grad)
  state = local.init_split_state(tx, tx, {"a": a0}, {"v": v0}, 2)
  round_fn = jax.jit(local.make_splitavg_round(client_fn, server_loss, tx, tx, strategy.cut_grad))
  state, metrics = round_fn(state, {"x": x, "y": y}, jax.random.key(0))
  h = np.einsum("cbd,dh->cbh", x[:, 0].astype(np.float64), a0)
  r = h @ v0 - y[:, 0]  # [C, B]
  g_h = 2 * r[..., None] * v0 / (2 * B)  # d loss / d h over the concatenated 2B batch
  if cut_grad == "average":
    g_h = np.broadcast_to(g_h.mean(0), g_h.shape)
  g_a = np.einsum("cbd,cbh->cdh", x[:, 0], g_h)
  g_v = np.einsum("cbh,cb->h", h, r) * 2 / (2 * B)
  np.testing.assert_allclose(state.client_params["a"], a0 - LR * g_a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.server_params["v"], v0 - LR * g_v, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["loss"], [np.mean(r**2)], rtol=1e-5)
