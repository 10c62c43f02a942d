"""The deployment's other strategies (ultrajax/fl): SCAFFOLD with each site's control variate
on its own disk, the robust rules and DP-FedAvg on the server. The ServerApp and ClientApps run
in-process (fl/local.py's Grid, Flower Message / RecordDict objects) against the in-process
simulation (jobs/pretrain.run) of the same clients, seeds and plan."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flwr")  # the [fl] extra

from ultrajax import configlib  # noqa: E402
from ultrajax.data import sources  # noqa: E402
from ultrajax.fed import aggregate, rounds, strategies  # noqa: E402
from ultrajax.fl import client, local, server, site  # noqa: E402
from ultrajax.jobs import pretrain  # noqa: E402

SPEC = "configs/pretrain_fed.py:smoke"
# test_fl.py's three phantom sites and model (16 images each with their SMAT partners: 4 local
# steps a round; one encoder block, no MIC), so the suite's XLA cache serves the compiles that
# do not depend on the strategy (init, preview, norms); 2 rounds, PNGs at the last only.
BASE = (
  "fed.num_rounds=2 data.num_clients=3 mesh.clients=1 mesh.data=1 data.phantom_min_images=8 "
  "model.depth=1 ultramim.mic=False evals.linear_probe.every_rounds=0 "
  "evals.knn.every_rounds=0 fl.num_sites=3 ckpt_every_rounds=2 image_every_rounds=100"
)
SCAFFOLD = BASE + " fed.strategy=scaffold fed.strategy_options=local_lr=0.05"
TOL = 1e-5  # float32 sums in another order


def site_overrides(overrides, k):
  return f"{overrides} fl.site_id={k} data.clients={sources.DEFAULT_CLIENTS[k][0]}"


def deploy_and_simulate(root, overrides):
  """(simulated params, deployed params, config): pretrain.run and server.run over three
  in-process sites with the same config."""
  nodes = [
    dict(config=SPEC, workdir=str(root / f"site{k}"), overrides=site_overrides(overrides, k))
    for k in range(3)
  ]
  config = site.load_config(SPEC, overrides)
  simulated = pretrain.run(config, root / "sim")
  deployed = server.run(local.LocalGrid(client.app, nodes), config, root / "server")
  return simulated, deployed, config


def without_key_bias(tree):
  """{path: array} with the attention key biases (the middle third of each qkv bias) zeroed.
  Their true gradient is 0 (softmax ignores a shift shared by all keys), so they move by float
  noise alone; SCAFFOLD's c - c_i scales that noise by 1 / (K local_lr) and AdamW normalises it
  to steps of the learning rate's size, whose signs differ between two compiled programs."""
  out = server.params_lib.to_arrays(tree)
  for key, value in out.items():
    if key.endswith("qkv/bias"):
      width = value.shape[0] // 3
      out[key] = np.concatenate([value[:width], 0 * value[width : 2 * width], value[2 * width :]])
  return out


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - b[k]))) for k in a)


@pytest.mark.slow
def test_scaffold_deployment_equals_simulation_with_each_c_i_on_its_site(
  tmp_path, closes_event_files
):
  simulated, deployed, config = deploy_and_simulate(tmp_path, SCAFFOLD)
  # Round 2's local gradients carry c - c_i from round 1: equal params check the controls too.
  assert max_diff(without_key_bias(deployed), without_key_bias(simulated)) < TOL
  # Each site stored its own c_i; the server's c is their weighted mean (equal n_k here), the
  # invariant of SCAFFOLD's c' = c + sum_k w_k (c_k' - c_k) from c = c_k = 0.
  kept = []
  for k in range(3):
    with np.load(tmp_path / f"site{k}" / site.STATE_DIR / "2.npz") as f:
      kept.append({n[len(site.CONTROL_KEY) :]: f[n] for n in f.files if site.CONTROL_KEY in n})
  coord = server.Coordinator(config, tmp_path / "server")  # resumes from the last checkpoint
  c = server.params_lib.to_arrays(coord.strategy_state["c"])
  coord.close()
  assert list(c) == list(kept[0]) == list(server.params_lib.to_arrays(deployed))  # wire order
  for key, value in c.items():
    np.testing.assert_allclose(value, np.mean([ci[key] for ci in kept], 0), atol=1e-6)
  # The controls moved: c ~ (x - y) / (K local_lr), about 3e-4 here.
  assert max(np.abs(v).max() for v in c.values()) > 3e-5
  # A site running SCAFFOLD refuses a round without the global control.
  own = client._site(SPEC, site_overrides(SCAFFOLD, 0), str(tmp_path / "site0"))
  with pytest.raises(configlib.ConfigError, match="did not send a control variate"):
    own.train_round(server.params_lib.to_arrays(deployed), 0, None)


# ----------------------------------------------------------------------------- server-side rules
RULES = [
  ("fedavg_screened", dict(screen_factor=2.0)),
  ("median", {}),
  ("trimmed_mean", dict(beta=0.34)),
  ("krum", dict(num_byzantine=0)),
  ("multi_krum", dict(num_byzantine=0, num_selected=2)),
  ("norm_bound", dict(max_norm=1.0)),
  ("dp_fedavg", dict(clip_norm=1.0, noise_multiplier=0.3)),
]


def toy_round(strategy, x, targets, num_images, key):
  """The simulation's round (fed/rounds.py) on a toy problem: client k takes 3 SGD steps on
  |w - t_k|^2 / 2 from x. Returns (next server params, strategy state, each client's y_k)."""
  num, steps = len(num_images), 3
  tx = optax.sgd(0.3)
  plan = rounds.plan_round([steps] * num, num, steps)
  lane_client = plan.client_ids[:, 0]
  weights = jnp.asarray(strategy.client_weights(num_images))

  def loss_fn(params, model_state, batch, key):
    del key
    sq = jax.tree.map(lambda w, t: jnp.sum((w - t) ** 2), params, batch)
    return 0.5 * sum(jax.tree.leaves(sq)), (model_state, None)

  @jax.jit  # one program: eager engine calls would compile op by op
  def run(x, targets, key):
    batches = jax.tree.map(lambda t: jnp.repeat(t[lane_client][:, None], steps, 1), targets)
    server_ = strategies.Server(x, {})
    opt = jax.vmap(tx.init)(aggregate.broadcast(x, num))
    lanes = rounds.start_round(strategy, server_, opt, strategy.init(x, num, {}), num, num)
    lanes, _ = rounds.make_chunk(loss_fn, tx, strategy)(
      server_, lanes, batches, plan, jnp.full(num, steps, jnp.float32), weights, 0, key
    )
    new, _, state = rounds.finish_round(strategy, lanes, server_, key)
    ys = jax.tree.map(lambda a: a[np.argsort(lane_client)], lanes.params)
    return new.params, state, ys

  return run(x, targets, key)


@pytest.mark.parametrize("name, options", RULES, ids=[r[0] for r in RULES])
def test_the_servers_per_site_rules_equal_the_simulations_round(name, options):
  rng = np.random.default_rng(0)
  x = {"a": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32), "b": jnp.zeros(4, jnp.float32)}
  targets = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=(3, *v.shape)), jnp.float32), x)
  targets = jax.tree.map(lambda t: t.at[2].add(4.0), targets)  # site 2 is far off
  num_images = [10, 20, 30]
  strategy = strategies.make_strategy(name, **options).for_run(3, 0, "uniform")
  key = jax.random.key(7)
  simulated, sim_state, ys = toy_round(strategy, x, targets, num_images, key)
  # The server's path: each site's update y_k - x in the order the replies came, the server's
  # weights and key.
  order = np.array([2, 0, 1])
  deltas = jax.tree.map(lambda y, a: (y - a)[order], ys, x)
  weights = strategy.client_weights(np.asarray(num_images)[order])
  update = jax.jit(server.per_site_update(strategy, 3))
  deployed, state = update(
    x,
    site.server_state(strategy, x, 3),
    deltas,
    order.astype(np.int32),
    weights,
    np.full(3, 3, np.float32),
    jax.random.fold_in(key, rounds.SERVER_KEY),
  )
  for got, want in zip(jax.tree.leaves(deployed), jax.tree.leaves(simulated), strict=True):
    np.testing.assert_allclose(got, want, atol=1e-6)
  assert strategy.report(state, 1) == pytest.approx(strategy.report(sim_state, 1))
  if name == "median":  # and the rule itself, by numpy
    for got, y, a in zip(jax.tree.leaves(deployed), jax.tree.leaves(ys), jax.tree.leaves(x)):
      np.testing.assert_allclose(got, a + np.median(np.asarray(y) - a, 0), atol=1e-6)
  if name == "fedavg_screened":  # the far site was screened out on both sides
    assert strategy.report(state, 1)["screen/excluded"] == 1


def test_the_deployment_refuses_what_it_cannot_run():
  base = site.load_config(SPEC, BASE)
  for name in ("median", "dp_fedavg", "scaffold"):
    config = site.load_config(SPEC, BASE + f" fed.strategy={name} fl.secagg=True")
    with pytest.raises(configlib.ConfigError, match=f"'{name}' with config.fl.secagg=True"):
      site.validate(config)
  with pytest.raises(configlib.ConfigError, match="config.fl.num_sites=0: strategy 'median'"):
    site.validate(site.load_config(SPEC, BASE + " fed.strategy=median fl.num_sites=0"))
  # Krum with f = 1 needs more than 2f + 2 = 4 sites.
  with pytest.raises(configlib.ConfigError, match="krum needs C > 2f"):
    site.validate(site.load_config(SPEC, BASE + " fed.strategy=krum"))
  assert site.local_strategy(site.load_config(SPEC, BASE + " fed.strategy=median")) == (
    site.local_strategy(base)
  )  # the robust and DP rules train locally as FedAvg
