"""Federated machinery on a toy model: aggregation and the vmapped, masked client rounds."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ultrajax.fed import aggregate, rounds
from ultrajax.train import optimizer


def test_client_weights_by_hand():
  np.testing.assert_allclose(aggregate.client_weights([10, 30, 60], "volume"), [0.1, 0.3, 0.6])
  np.testing.assert_allclose(aggregate.client_weights([10, 30, 60], "uniform"), [1 / 3] * 3)
  with pytest.raises(ValueError, match="'median'"):
    aggregate.client_weights([1, 2], "median")
  with pytest.raises(ValueError, match="empty"):
    aggregate.client_weights([0, 0], "volume")


def test_weighted_mean_equals_numpy():
  rng = np.random.default_rng(0)
  tree = {"a": rng.normal(size=(4, 3, 5)).astype(np.float32),
          "b": {"c": rng.normal(size=(4, 7)).astype(np.float32)}}
  w = aggregate.client_weights([5, 1, 2, 8], "volume")
  got = aggregate.weighted_mean(jax.tree.map(jnp.asarray, tree), jnp.asarray(w))
  np.testing.assert_allclose(got["a"], np.einsum("k,kij->ij", w, tree["a"]), rtol=1e-6)
  np.testing.assert_allclose(got["b"]["c"], (w[:, None] * tree["b"]["c"]).sum(0), rtol=1e-6)
  back = aggregate.broadcast(got, 4)
  assert back["a"].shape == (4, 3, 5)
  np.testing.assert_array_equal(back["a"][2], got["a"])


def _toy_problem():
  """Linear regression whose loss uses the key (a random half of the batch), so keys matter."""
  def loss_fn(params, batch, key):
    x, y = batch
    keep = jax.random.bernoulli(key, 0.5, (x.shape[0],)).astype(jnp.float32)
    err = (x @ params["w"] + params["b"] - y) ** 2
    return (keep * err.mean(-1)).sum() / jnp.maximum(keep.sum(), 1.0), None
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros((2,))}
  config = ml_collections.ConfigDict(dict(b1=0.9, b2=0.95, weight_decay=0.05, weight_decay_on="mae",
                                          grad_clip_norm=0.0))
  lr_fn = lambda epoch: optimizer.warmup_cosine(epoch, peak_lr=0.1, min_lr=0.01, warmup=1.0,
                                                total=5.0)
  return loss_fn, params, config, lr_fn


def test_vmapped_masked_round_equals_sequential_clients():
  """One compiled round over C clients == each client trained alone, step by step, with plain
  optax.adamw at the scheduled learning rate (an independent re-implementation of the loop)."""
  loss_fn, params, config, lr_fn = _toy_problem()
  tx = optimizer.adamw(config, params)
  num_clients, num_steps, round_index = 3, 4, 2
  steps_per_epoch = np.array([4, 2, 3])
  rng = np.random.default_rng(1)
  xs = rng.normal(size=(num_clients, num_steps, 8, 3)).astype(np.float32)
  ys = rng.normal(size=(num_clients, num_steps, 8, 2)).astype(np.float32)
  key = rounds.round_key(jax.random.key(0), round_index)

  client_params = aggregate.broadcast(params, num_clients)
  opt_state = jax.vmap(tx.init)(client_params)
  chunk = jax.jit(rounds.make_round_chunk(rounds.make_client_steps(loss_fn, tx, lr_fn)))
  new_params, _, losses = chunk(client_params, opt_state, (xs, ys),
                                rounds.active_steps(steps_per_epoch, 0, num_steps),
                                jnp.arange(num_steps), steps_per_epoch.astype(np.float32),
                                round_index, key)

  for c in range(num_clients):
    p = params
    mask = jax.tree.map(lambda x: x.ndim > 1, p)
    adam_state = optax.adamw(0.0, mask=mask).init(p)
    for s in range(steps_per_epoch[c]):
      step_key = jax.random.fold_in(jax.random.fold_in(key, c), s)
      loss, grads = jax.value_and_grad(lambda q: loss_fn(q, (xs[c, s], ys[c, s]), step_key)[0])(p)
      lr = lr_fn(round_index + s / steps_per_epoch[c])
      updates, adam_state = optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.05,
                                        mask=mask).update(grads, adam_state, p)
      p = optax.apply_updates(p, updates)
      np.testing.assert_allclose(losses[c, s], loss, rtol=1e-5)
    np.testing.assert_array_equal(losses[c, steps_per_epoch[c]:], 0.0)
    for name in p:
      np.testing.assert_allclose(new_params[name][c], p[name], rtol=1e-5, atol=1e-6)


def test_inactive_steps_change_nothing():
  loss_fn, params, config, lr_fn = _toy_problem()
  tx = optimizer.adamw(config, params)
  client_params = aggregate.broadcast(params, 1)
  opt_state = jax.vmap(tx.init)(client_params)
  chunk = rounds.make_round_chunk(rounds.make_client_steps(loss_fn, tx, lr_fn))
  batch = (jnp.ones((1, 2, 4, 3)), jnp.ones((1, 2, 4, 2)))
  out_params, out_state, _ = chunk(client_params, opt_state, batch, np.zeros((1, 2), bool),
                                   jnp.arange(2), jnp.ones((1,)), 0, jax.random.key(0))
  for a, b in zip(jax.tree.leaves((out_params, out_state)), jax.tree.leaves((client_params, opt_state))):
    np.testing.assert_array_equal(a, b)


def test_active_steps():
  np.testing.assert_array_equal(rounds.active_steps([3, 1], 2, 2), [[True, False], [False, False]])


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
