"""Federated strategies against hand-worked numpy rounds, optax, and each other."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ultrajax.fed import local, strategies

LR = 0.1
C, S, B, D = 3, 4, 5, 3


def _loss(params, model_state, batch, key):
  """Least squares on a linear model; model_state counts steps (a stand-in for BN stats)."""
  del key
  pred = batch["x"] @ params["w"] + params["b"]
  loss = jnp.mean((pred - batch["y"]) ** 2)
  return loss, ({"count": model_state["count"] + 1.0}, {"pred_mean": pred.mean()})


def _grad_np(w, b, x, y):
  r = x @ w + b - y
  return 2 * x.T @ r / len(y), 2 * r.mean()


def _data(seed=0):
  rng = np.random.default_rng(seed)
  batches = {"x": rng.normal(size=(C, S, B, D)).astype(np.float32),
             "y": rng.normal(size=(C, S, B)).astype(np.float32)}
  server = {"w": rng.normal(size=(D,)).astype(np.float32), "b": np.float32(0.3)}
  return batches, server


def _run(strategy, rounds=2, num_steps=(4, 2, 3), num_examples=(40, 10, 30), seed=0):
  batches, server = _data(seed)
  tx = optax.sgd(LR)
  state = local.init_state(strategy, tx, server, C, {"count": jnp.zeros(())})
  round_fn = jax.jit(local.make_round(_loss, tx, strategy))
  weights = strategy.client_weights(num_examples)
  for r in range(rounds):
    state, metrics = round_fn(state, batches, np.array(num_steps), weights, jax.random.key(r))
  return state, metrics, batches, server, weights


def _numpy_rounds(batches, server, weights, num_steps, rounds, mu=0.0, mix="mean", alpha=0.5):
  """Local SGD (with FedProx's proximal gradient) then the mixing rule, in numpy float64."""
  ws = [np.array(server["w"], np.float64)] * C
  bs = [float(server["b"])] * C
  for _ in range(rounds):
    new_w, new_b = [], []
    for c in range(C):
      w0, b0 = ws[c].copy(), bs[c]
      w, b = w0.copy(), b0
      for s in range(num_steps[c]):
        gw, gb = _grad_np(w, b, batches["x"][c, s].astype(np.float64), batches["y"][c, s])
        w, b = w - LR * (gw + mu * (w - w0)), b - LR * (gb + mu * (b - b0))
      new_w.append(w)
      new_b.append(b)
    new_w, new_b = np.stack(new_w), np.array(new_b)
    if mix == "mean":
      ws = [np.tensordot(weights, new_w, axes=1)] * C
      bs = [float(np.dot(weights, new_b))] * C
    elif mix == "personalized":
      ws = [alpha * new_w[c] + (1 - alpha) * (new_w.sum(0) - new_w[c]) / (C - 1) for c in range(C)]
      bs = [alpha * new_b[c] + (1 - alpha) * (new_b.sum() - new_b[c]) / (C - 1) for c in range(C)]
  return np.stack(ws), np.array(bs)


def test_weighted_aggregation_is_numpy_weighted_mean():
  rng = np.random.default_rng(1)
  tree = {"a": rng.normal(size=(C, 4, 2)).astype(np.float32), "b": rng.normal(size=(C,)).astype(np.float32)}
  strategy = strategies.make_strategy("fedavg")
  weights = strategy.client_weights([5, 1, 4])
  np.testing.assert_allclose(weights, [0.5, 0.1, 0.4], rtol=1e-6)
  new, _ = strategy.aggregate(tree, tree, jnp.asarray(weights), strategy.init(
      jax.tree.map(lambda x: x[0], tree), C))
  for k in tree:
    expect = np.average(tree[k], axis=0, weights=[5, 1, 4])
    for c in range(C):
      np.testing.assert_allclose(new[k][c], expect, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(strategies.make_strategy("fedavg_uniform").client_weights([5, 1, 4]),
                             [1 / 3] * 3, rtol=1e-6)


def test_fedavg_round_matches_numpy_with_masked_steps():
  state, metrics, batches, server, weights = _run(strategies.make_strategy("fedavg"))
  w, b = _numpy_rounds(batches, server, weights, (4, 2, 3), rounds=2)
  np.testing.assert_allclose(state.params["w"], w, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state.params["b"], b, rtol=1e-4, atol=1e-5)
  # model state: each client counted its own active steps; fedavg averages it with the weights
  np.testing.assert_allclose(state.model_state["count"], [2 * np.dot(weights, [4, 2, 3])] * C, rtol=1e-5)
  assert metrics["loss"].shape == (C,) and metrics["pred_mean"].shape == (C,)


def test_fedprox_mu0_is_fedavg_and_mu_matches_proximal_sgd():
  avg, *_ = _run(strategies.make_strategy("fedavg"))
  prox0, *_ = _run(strategies.make_strategy("fedprox", mu=0.0))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), avg.params, prox0.params)
  prox, _, batches, server, weights = _run(strategies.make_strategy("fedprox", mu=0.5))
  w, b = _numpy_rounds(batches, server, weights, (4, 2, 3), rounds=2, mu=0.5)
  np.testing.assert_allclose(prox.params["w"], w, rtol=1e-4, atol=1e-5)
  assert not np.allclose(prox.params["w"], avg.params["w"], atol=1e-4)


def test_personalized_alpha1_is_local_and_alpha_half_matches_numpy():
  loc, *_ = _run(strategies.make_strategy("local"))
  pers1, *_ = _run(strategies.make_strategy("personalized", alpha=1.0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), loc.params, pers1.params)
  # local: clients differ after training
  assert np.ptp(np.asarray(loc.params["w"]), axis=0).max() > 1e-3
  pers, _, batches, server, weights = _run(strategies.make_strategy("personalized"))
  w, b = _numpy_rounds(batches, server, weights, (4, 2, 3), rounds=2, mix="personalized")
  np.testing.assert_allclose(pers.params["w"], w, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(pers.params["b"], b, rtol=1e-4, atol=1e-5)


def _bn_trees(rng):
  params = {"conv": {"kernel": rng.normal(size=(C, 3, 2)).astype(np.float32)},
            "downsample_bn": {"scale": rng.normal(size=(C, 2)).astype(np.float32)},
            "bn1": {"scale": rng.normal(size=(C, 2)).astype(np.float32),
                    "bias": rng.normal(size=(C, 2)).astype(np.float32)},
            "head": {"kernel": rng.normal(size=(C, 2, 1)).astype(np.float32)}}
  stats = {"bn1": {"mean": rng.normal(size=(C, 2)).astype(np.float32),
                   "var": rng.uniform(size=(C, 2)).astype(np.float32)}}
  return params, stats


def test_fedbn_keeps_norm_local_and_averages_the_rest():
  params, stats = _bn_trees(np.random.default_rng(2))
  strategy = strategies.make_strategy("fedbn")
  server = jax.tree.map(lambda x: x[0], params)
  state = strategy.init(server, C, jax.tree.map(lambda x: x[0], stats))
  weights = jnp.asarray(strategy.client_weights([1, 2, 3]))
  new, _ = strategy.aggregate(params, params, weights, state)
  new_stats = strategy.aggregate_state(stats, weights)
  for leaf in ("scale", "bias"):
    np.testing.assert_array_equal(new["bn1"][leaf], params["bn1"][leaf])
  np.testing.assert_array_equal(new["downsample_bn"]["scale"], params["downsample_bn"]["scale"])
  for leaf in ("mean", "var"):
    np.testing.assert_array_equal(new_stats["bn1"][leaf], stats["bn1"][leaf])
  for part in ("conv", "head"):
    expect = np.average(params[part]["kernel"], axis=0, weights=[1, 2, 3])
    np.testing.assert_allclose(new[part]["kernel"], np.broadcast_to(expect, params[part]["kernel"].shape),
                               rtol=1e-5, atol=1e-6)
  # keep_local on the head only: norm layers are averaged, the head is not
  heads = strategies.make_strategy("keep_local", keep_local=["^head/"])
  new, _ = heads.aggregate(params, params, weights, heads.init(server, C))
  np.testing.assert_array_equal(new["head"]["kernel"], params["head"]["kernel"])
  np.testing.assert_allclose(new["bn1"]["scale"][1], np.average(params["bn1"]["scale"], 0, [1, 2, 3]),
                             rtol=1e-5)


def test_fedadam_one_client_is_optax_adam_on_the_delta():
  rng = np.random.default_rng(3)
  x0 = {"w": rng.normal(size=(4,)).astype(np.float32)}
  strategy = strategies.make_strategy("fedadam", bias_correction=True, server_lr=0.05, tau=1e-3)
  state = strategy.init(x0, 1)
  ref_tx = optax.adam(0.05, b1=0.9, b2=0.99, eps=1e-3)
  ref_opt, x_ref, x = ref_tx.init(x0), x0, jax.tree.map(lambda a: a[None], x0)
  for _ in range(3):
    y = jax.tree.map(lambda a: a + rng.normal(size=a.shape).astype(np.float32), x)
    x, state = strategy.aggregate(y, x, jnp.ones(1), state)
    delta = jax.tree.map(lambda a, b: a - b[0], x_ref, y)  # pseudo-gradient server - client
    upd, ref_opt = ref_tx.update(delta, ref_opt, x_ref)
    x_ref = optax.apply_updates(x_ref, upd)
    np.testing.assert_allclose(x["w"][0], x_ref["w"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_fedopt_reddi_matches_hand_worked_numpy(name):
  """Reddi et al. Algorithm 2, no bias correction, v starts at tau^2, two rounds, two clients."""
  rng = np.random.default_rng(4)
  b1, b2, tau, eta = 0.9, 0.99, 1e-3, 0.1
  strategy = strategies.make_strategy(name, server_lr=eta)
  x = rng.normal(size=(3,))
  state = strategy.init({"w": x.astype(np.float32)}, 2)
  m, v = np.zeros(3), np.full(3, tau ** 2)
  weights = np.array([0.25, 0.75])
  xs = {"w": np.stack([x, x]).astype(np.float32)}
  for _ in range(2):
    ys = np.asarray(xs["w"]) + rng.normal(size=(2, 3)).astype(np.float32)
    xs, state = strategy.aggregate({"w": ys}, xs, jnp.asarray(weights, jnp.float32), state)
    delta = weights @ ys.astype(np.float64) - x  # Reddi's Delta_t = mean(y) - x
    m = b1 * m + (1 - b1) * delta
    v = {"fedadam": lambda: b2 * v + (1 - b2) * delta ** 2,
         "fedyogi": lambda: v - (1 - b2) * delta ** 2 * np.sign(v - delta ** 2),
         "fedadagrad": lambda: v + delta ** 2}[name]()
    x = x + eta * m / (np.sqrt(v) + tau)
    np.testing.assert_allclose(xs["w"], np.stack([x, x]), rtol=1e-4, atol=1e-5)


def test_scaffold_zero_controls_one_step_is_fedavg_and_controls_hand_worked():
  kw = dict(num_steps=(1, 1, 1), rounds=1)
  avg, *_ = _run(strategies.make_strategy("fedavg"), **kw)
  sca, _, batches, server, weights = _run(strategies.make_strategy("scaffold", local_lr=LR), **kw)
  np.testing.assert_allclose(sca.params["w"], avg.params["w"], rtol=1e-6)
  # option II after one SGD step from zero controls: c_i = (x - y_i) / lr = grad_i; c = sum w_i c_i
  grads = np.stack([_grad_np(server["w"], server["b"], batches["x"][c, 0], batches["y"][c, 0])[0]
                    for c in range(C)])
  np.testing.assert_allclose(sca.strategy_state["c_clients"]["w"], grads, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(sca.strategy_state["c"]["w"], weights @ grads, rtol=1e-4, atol=1e-5)


def test_scaffold_two_rounds_match_hand_worked_controls():
  """Round 2's local step is y_i = x - lr (g_i + c - c_i), with round 1's controls."""
  sca, _, batches, server, weights = _run(strategies.make_strategy("scaffold", local_lr=LR),
                                          num_steps=(1, 1, 1), rounds=2)
  x = {"w": np.array(server["w"], np.float64), "b": np.float64(server["b"])}
  c = {k: np.zeros_like(v) for k, v in x.items()}
  ci = {k: np.zeros((C, *np.shape(v))) for k, v in x.items()}
  for _ in range(2):
    g = [dict(zip("wb", _grad_np(x["w"], x["b"], batches["x"][k, 0], batches["y"][k, 0])))
         for k in range(C)]
    for name in "wb":
      ys = np.stack([x[name] - LR * (g[k][name] + c[name] - ci[name][k]) for k in range(C)])
      new_ci = ci[name] - c[name] + (x[name] - ys) / LR
      c[name] = c[name] + np.tensordot(weights, new_ci - ci[name], axes=1)
      ci[name], x[name] = new_ci, np.tensordot(weights, ys, axes=1)
  np.testing.assert_allclose(sca.params["w"][0], x["w"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(sca.strategy_state["c_clients"]["w"], ci["w"], rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(sca.strategy_state["c"]["b"], c["b"], rtol=1e-3, atol=1e-4)


def test_bad_names_and_patterns_raise():
  with pytest.raises(ValueError, match="unknown federated strategy 'fedavgg'.*fedavg"):
    strategies.make_strategy("fedavgg")
  with pytest.raises(ValueError, match="takes no option"):
    strategies.make_strategy("fedavg", mu=0.1)
  with pytest.raises(ValueError, match="needs keep_local"):
    strategies.make_strategy("keep_local")
  with pytest.raises(ValueError, match="alpha=1.5 is outside"):
    strategies.make_strategy("personalized", alpha=1.5)
  with pytest.raises(ValueError, match="local_lr=0"):
    strategies.make_strategy("scaffold", local_lr=0)
  params, stats = _bn_trees(np.random.default_rng(5))
  server = jax.tree.map(lambda x: x[0], params)
  with pytest.raises(ValueError, match="'classifier' matches no"):
    strategies.make_strategy("keep_local", keep_local=("classifier",)).init(server, C)
  with pytest.raises(ValueError, match="matches no"):  # ViT-free tree without any norm layer
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
  np.testing.assert_allclose(metrics["loss"], [np.mean(r ** 2)], rtol=1e-5)
