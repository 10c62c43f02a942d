"""Cross-silo deployment on Flower (ultrajax/fl): the ServerApp and ClientApp on an in-process
Grid (fl/local.py) against the in-process simulation (jobs/pretrain.run) of the same clients,
seeds and plan; a site killed mid-round, a site gone for good, a killed and restarted server,
SecAgg+, and the wire format's checks."""

import json

import jax
import numpy as np
import pytest

pytest.importorskip("flwr")  # the [fl] extra

from ultrajax import configlib  # noqa: E402
from ultrajax.data import sources  # noqa: E402
from ultrajax.fl import client, local, params as params_lib, server, site  # noqa: E402
from ultrajax.jobs import pretrain  # noqa: E402

SPEC = "configs/pretrain_fed.py:smoke"
# Three phantom sites (16 images each with their SMAT partners: 4 local steps a round).
# One encoder block and no MIC keep the compiles short; TGM masks and SMAT partners stay on.
BASE = (
  "fed.num_rounds=3 data.num_clients=3 mesh.clients=1 mesh.data=1 data.phantom_min_images=8 "
  "model.depth=1 ultramim.mic=False evals.linear_probe.every_rounds=0 "
  "evals.knn.every_rounds=0"
)
PROX = " fed.strategy=fedprox fed.strategy_options=mu=0.5"
TOL = 1e-5  # float32 sums in another order (the simulation sums on device, the server in float64)


def node_configs(root, overrides):
  names = [sources.DEFAULT_CLIENTS[k][0] for k in range(3)]
  return [
    dict(
      config=SPEC,
      workdir=str(root / f"site{k}"),
      overrides=f"{overrides} fl.site_id={k} data.clients={names[k]}",
    )
    for k in range(3)
  ]


def max_diff(a, b):
  return max(
    jax.tree.leaves(
      jax.tree.map(
        lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y)))), a, b
      )
    )
  )


def deploy(root, overrides, **failures):
  """server.run over three in-process sites; failures: LocalGrid's down / lose_reply."""
  grid = local.LocalGrid(client.app, node_configs(root, overrides))
  for name, value in failures.items():
    setattr(grid, name, value)
  return grid, site.load_config(SPEC, overrides)


@pytest.fixture(scope="module")
def fedavg(tmp_path_factory):
  """The simulation, and the deployment with site 1 killed in the middle of round 2 (its reply
  is lost; fl.retries sends the round again) and the server killed after round 2 and
  restarted."""
  root = tmp_path_factory.mktemp("fl_fedavg")
  grid, config = deploy(root, BASE, lose_reply={2: {1}})
  simulated = pretrain.run(config, root / "sim")
  server.run(grid, config, root / "server", stop_after_rounds=2)
  deployed = server.run(grid, config, root / "server")
  return dict(root=root, sim=simulated, deployed=deployed)


@pytest.mark.slow
def test_fedavg_deployment_equals_simulation_through_a_lost_reply_and_a_server_restart(fedavg):
  root = fedavg["root"]
  assert max_diff(fedavg["deployed"], fedavg["sim"]) < TOL
  metrics = [json.loads(line) for line in (root / "server" / "metrics.jsonl").open()]
  assert [m["round"] for m in metrics] == [1, 2, 3]  # round 2 logged once, after its retry
  assert all(m["clients"] == 3 and m["dropped"] == 0 for m in metrics)
  sim = {m["round"]: m for m in map(json.loads, (root / "sim" / "metrics.jsonl").open())}
  for m in metrics:  # the same mean loss per round and per client
    assert m["loss"] == pytest.approx(sim[m["round"]]["loss"], rel=1e-4)
    assert m["loss/client_01"] == pytest.approx(sim[m["round"]]["loss/client_01"], rel=1e-4)
  assert (root / "server" / "images" / "round_00003.png").is_file()
  assert (root / "server" / "checkpoints" / "3").is_dir()
  assert list((root / "server").glob("events.out.tfevents.*"))
  # Each site kept its optimizer and data state on its own disk, the last keep_site_states.
  for k in range(3):
    assert sorted(p.name for p in (root / f"site{k}" / site.STATE_DIR).iterdir()) == [
      "1.npz",
      "2.npz",
      "3.npz",
    ]


@pytest.mark.slow
def test_fedprox_deployment_equals_simulation(fedavg, tmp_path):
  grid, config = deploy(tmp_path, BASE + PROX)
  simulated = pretrain.run(config, tmp_path / "sim")
  deployed = server.run(grid, config, tmp_path / "server")
  error = max_diff(deployed, simulated)
  assert error < TOL
  # Closer to the FedProx simulation than to FedAvg: the sites applied the proximal term.
  assert max_diff(deployed, fedavg["deployed"]) > error


@pytest.mark.slow
def test_a_site_gone_for_good_leaves_the_rounds_renormalised_or_stops_the_run(fedavg, tmp_path):
  grid, config = deploy(tmp_path, BASE + " fl.min_clients=2", lose_reply={3: {1, 2, 3}})
  server.run(grid, config, tmp_path / "server")
  metrics = [json.loads(line) for line in (tmp_path / "server" / "metrics.jsonl").open()]
  assert [(m["clients"], m["dropped"]) for m in metrics] == [(3, 0), (2, 1), (2, 1)]
  assert "loss/client_02" not in metrics[1]
  # Round 1 is the simulation's; later rounds average the two sites that answered.
  grid, config = deploy(tmp_path / "strict", BASE + " fl.retries=1 fl.min_clients=3")
  grid.down = {2}
  with pytest.raises(RuntimeError, match="fewer than 3 sites answered after 1 retries"):
    server.run(grid, config, tmp_path / "strict" / "server")


@pytest.mark.slow
def test_secagg_gives_the_plain_result_within_quantisation(fedavg, tmp_path):
  # n_k = 16 per site: weights n_k / max_weight = 1; values quantised on 2^22 levels over +-1.
  grid, config = deploy(tmp_path, BASE + " fl.secagg=True fl.secagg_max_weight=16.0")
  deployed = server.run(grid, config, tmp_path / "server")
  assert max_diff(deployed, fedavg["sim"]) < 1e-4
  # A site that requires SecAgg+ refuses a plaintext round (its error reply drops it).
  grid, config = deploy(tmp_path / "plain", BASE + " fl.retries=0")
  grid.contexts[1].node_config["overrides"] += " fl.secagg=True"
  with pytest.raises(RuntimeError, match="fewer than 3 sites"):
    server.run(grid, config, tmp_path / "plain" / "server")


def test_weighted_mean_is_the_renormalised_volume_mean():
  rng = np.random.default_rng(0)
  updates = [
    {"a": rng.normal(size=(2, 3)).astype(np.float32), "b": rng.normal(size=4)} for _ in range(3)
  ]
  got = server.weighted_mean(updates[:2], [30, 10])
  np.testing.assert_allclose(got["a"], 0.75 * updates[0]["a"] + 0.25 * updates[1]["a"], rtol=1e-6)
  assert got["a"].dtype == np.float32 and got["b"].dtype == np.float64


def test_params_travel_in_path_order_and_are_checked_by_key():
  tree = {
    "decoder": {"w": np.ones((2, 3), np.float32)},
    "encoder": {"blocks": [{"b": np.zeros(4, np.float32)}, {"b": np.ones(4, np.float32)}]},
  }
  arrays = params_lib.to_arrays(tree)
  assert list(arrays) == ["decoder/w", "encoder/blocks/0/b", "encoder/blocks/1/b"]
  back = params_lib.from_arrays(arrays, tree)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  np.testing.assert_array_equal(back["encoder"]["blocks"][1]["b"], np.ones(4))
  with pytest.raises(configlib.DataError, match=r"'encoder/blocks/1/b' is float32\[5\]"):
    params_lib.from_arrays(dict(arrays, **{"encoder/blocks/1/b": np.ones(5, np.float32)}), tree)
  with pytest.raises(configlib.DataError, match="'decoder/w' is float64"):
    params_lib.from_arrays(dict(arrays, **{"decoder/w": np.ones((2, 3))}), tree)
  with pytest.raises(configlib.DataError, match=r"missing \['decoder/w'\]"):
    params_lib.from_arrays({k: v for k, v in arrays.items() if k != "decoder/w"}, tree)
  with pytest.raises(configlib.DataError, match="2 arrays, this model has 3"):
    params_lib.from_list(list(arrays.values())[:2], tree)


def test_a_site_must_hold_one_client_and_the_strategy_must_be_deployable(tmp_path):
  config = site.load_config(SPEC, BASE + " fl.site_id=0")
  with pytest.raises(configlib.ConfigError, match="a site trains one client"):
    site.Site(config, tmp_path)
  with pytest.raises(configlib.ConfigError, match="'scaffold' is not supported in deployment"):
    site.validate(site.load_config(SPEC, BASE + " fed.strategy=scaffold"))
  with pytest.raises(configlib.ConfigError, match="config field 'fl.site' is missing"):
    site.load_config(SPEC, "fl.site=1")


def test_the_site_command_starts_a_supernode_with_the_site_as_node_config():
  command = client.supernode_command(
    [
      "--config=configs/pretrain_fed.py:cpu",
      "--workdir=/var/site",
      "--superlink=h:9092",
      "--root-certificates=ca.crt",
      "--config.fl.site_id=2",
      "--config.data.root=/data/us",
    ]
  )
  assert command == [
    "flower-supernode",
    "--superlink=h:9092",
    "--root-certificates=ca.crt",
    "--node-config",
    'config="configs/pretrain_fed.py:cpu" workdir="/var/site" '
    'overrides="fl.site_id=2 data.root=/data/us"',
  ]


def test_the_server_command_writes_a_flower_app_with_both_components():
  import tomllib

  text = server.flower_app("/c/pretrain_fed.py:cpu", "fed.num_rounds=5 fl.min_clients=2", "/w")
  app = tomllib.loads(text)["tool"]["flwr"]["app"]
  assert app["components"] == {
    "serverapp": "ultrajax.fl.server:app",
    "clientapp": "ultrajax.fl.client:app",
  }
  assert app["config"] == {
    "config": "/c/pretrain_fed.py:cpu",
    "workdir": "/w",
    "overrides": "fed.num_rounds=5 fl.min_clients=2",
  }
