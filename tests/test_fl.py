"""Cross-silo deployment on Flower (ultrajax/fl): the ServerApp and ClientApp on an in-process
Grid (fl/local.py) against the in-process simulation (jobs/pretrain.run) of the same clients,
seeds and plan; a site killed mid-round, a site gone for good, a killed and restarted server,
SecAgg+, and the wire format's checks."""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

pytest.importorskip("flwr")  # the [fl] extra

from ultrajax import configlib  # noqa: E402
from ultrajax.data import sources  # noqa: E402
from ultrajax.fl import client, guard, local, params as params_lib, server, site  # noqa: E402
from ultrajax.jobs import pretrain  # noqa: E402
from ultrajax.train import checkpoint  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]

SPEC = "configs/pretrain_fed.py:smoke"
# Three phantom sites (16 images each with their SMAT partners: 4 local steps a round).
# One encoder block and no MIC keep the compiles short; TGM masks and SMAT partners stay on.
# Reconstruction PNGs at the last round only (each costs a matplotlib figure).
BASE = (
  "fed.num_rounds=3 data.num_clients=3 mesh.clients=1 mesh.data=1 data.phantom_min_images=8 "
  "model.depth=1 ultramim.mic=False evals.linear_probe.every_rounds=0 "
  "evals.knn.every_rounds=0 image_every_rounds=100"
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


@pytest.fixture(scope="module")
def fedprox_sim(tmp_path_factory):
  """The FedProx simulation. Site 0 also trains one FedProx round here: that compiles the
  sites' FedProx local epoch once, into the session's XLA cache, where the real-process test's
  three site processes find it (else each compiles it, all three at once)."""
  root = tmp_path_factory.mktemp("fl_fedprox")
  params = pretrain.run(site.load_config(SPEC, BASE + PROX), root / "sim")
  site0 = client._site(SPEC, node_configs(root, BASE + PROX)[0]["overrides"], str(root / "site0"))
  site0.train_round(params_lib.to_arrays(params), 0)
  return params


@pytest.mark.slow
def test_a_site_gone_for_good_leaves_the_rounds_renormalised_or_stops_the_run(fedavg, tmp_path):
  grid, config = deploy(tmp_path, BASE + " fl.min_clients=2", lose_reply={3: {1, 2, 3}})
  server.run(grid, config, tmp_path / "server")
  metrics = [json.loads(line) for line in (tmp_path / "server" / "metrics.jsonl").open()]
  assert [(m["clients"], m["dropped"]) for m in metrics] == [(3, 0), (2, 1), (2, 1)]
  assert "loss/client_02" not in metrics[1]
  # Round 1 is the simulation's; later rounds average the two sites that answered.
  # With min_clients=3 each attempt first waits (up to round_timeout_s) for a third site.
  overrides = BASE + " fl.retries=1 fl.min_clients=3 fl.round_timeout_s=1.0"
  grid, config = deploy(tmp_path / "strict", overrides)
  grid.down = {2}
  t0 = time.monotonic()
  with pytest.raises(RuntimeError, match="fewer than 3 sites answered after 1 retries"):
    server.run(grid, config, tmp_path / "strict" / "server")
  assert time.monotonic() - t0 >= 2.0


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
  with pytest.raises(configlib.ConfigError, match="'personalized' is not supported in deployment"):
    site.validate(site.load_config(SPEC, BASE + " fed.strategy=personalized"))
  attacked = site.load_config(SPEC, BASE + " fed.attack=scale:1e6")
  attacked.fed.attack_clients = "0"
  with pytest.raises(configlib.ConfigError, match="simulation-only fault"):
    site.validate(attacked)
  with pytest.raises(configlib.ConfigError, match="dp_sgd.noise_multiplier > 0"):
    site.validate(site.load_config(SPEC, BASE + " dp_sgd.noise_multiplier=1.0"))
  with pytest.raises(configlib.ConfigError, match="config field 'fl.site' is missing"):
    site.load_config(SPEC, "fl.site=1")


def test_the_server_and_site_command_lines_share_one_parser(tmp_path):
  argv = ["--config=c.py:cpu", "--workdir=w", "--config.a.b=1", "test", "--config.c='x'"]
  config, workdir, overrides, rest = site.command_line(argv, "prog")
  assert (config, workdir) == ("c.py:cpu", os.path.join(os.getcwd(), "w"))
  assert (overrides, rest) == ("a.b=1 c='x'", ["test"])
  for bad in ("--config.a.b", "--config.=1", "--config.data.root=/my data", "--workdir="):
    with pytest.raises(configlib.ConfigError, match=f"prog: {re.escape(repr(bad))}"):
      site.command_line([*argv, bad], "prog")
  with pytest.raises(configlib.ConfigError, match="needs --config=FILE.* and --workdir=DIR"):
    site.command_line(argv[:1], "prog")
  # The server's submission through it: the Flower app carries the spec, workdir and overrides.
  import tomllib

  argv = [f"--config={SPEC}", f"--workdir={tmp_path}", "--config.fed.num_rounds=2", "test"]
  folder = tmp_path / "flower_app"
  assert server.submission(argv) == ["flwr", "run", str(folder), "test"]
  app = tomllib.loads((folder / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
  assert app["config"] == {
    "config": str(REPO / SPEC.partition(":")[0]) + ":smoke",
    "workdir": str(tmp_path),
    "overrides": "fed.num_rounds=2",
  }
  with pytest.raises(configlib.ConfigError, match=r"ultrajax.fl.server: '--config.fed.num_rounds'"):
    server.submission([*argv, "--config.fed.num_rounds"])


def test_the_site_command_starts_a_supernode_with_the_site_as_node_config():
  argv = [
    "--config=configs/pretrain_fed.py:cpu",
    "--workdir=/var/site",
    "--superlink=h:9092",
    "--root-certificates=ca.crt",
    "--port",
    "9095",
    "--config.fl.site_id=2",
    "--config.data.root=/data/us",
  ]
  command, address = client.site_command(argv)
  assert command == [
    "flower-supernode",
    "--superlink=h:9092",
    "--root-certificates=ca.crt",
    "--port",
    "9095",
    "--isolation",
    "process",
    "--node-config",
    'config="configs/pretrain_fed.py:cpu" workdir="/var/site" '
    'overrides="fl.site_id=2 data.root=/data/us"',
  ]
  assert address == "127.0.0.1:9095"  # the SuperNode's Runtime API, where this process serves
  assert client.site_command(argv[:4])[1] == "127.0.0.1:9094"  # Flower's default
  with pytest.raises(configlib.ConfigError, match="drop --isolation"):
    client.site_command(argv + ["--isolation=subprocess"])


# A stand-in for Flower's SuperNode: its first SIGTERM starts a graceful exit (which takes a
# moment, as telling the SuperLink does) and restores the default action, as Flower does.
GRACEFUL_CHILD = """
import signal, sys, time
def leave(*_):
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  time.sleep(0.5)
  open(sys.argv[1], "w").write("left")
  sys.exit(0)
signal.signal(signal.SIGTERM, leave)
print("ready", flush=True)
time.sleep(60)
"""
# A site process: many threads, the SuperNode started under its guard.
THREADED_PARENT = """
import sys, threading, time
from ultrajax.fl import guard
for _ in range(16):
  threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
guard.start([sys.executable, "-c", sys.argv[1], sys.argv[2]])
time.sleep(60)
"""


def test_a_sigkilled_site_stops_its_supernode_once_through_the_guard(tmp_path):
  """Linux sends the parent-death signal once per exiting thread of the parent; under the guard
  the SuperNode gets one SIGTERM and finishes its graceful exit."""
  marker = tmp_path / "left"
  parent = subprocess.Popen(
    [sys.executable, "-c", THREADED_PARENT, GRACEFUL_CHILD, str(marker)],
    cwd=REPO,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert parent.stdout.readline().strip() == "ready"
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
      time.sleep(0.1)
    assert marker.read_text() == "left"
  finally:
    parent.kill()


def test_a_site_whose_supernode_exits_stops_with_its_status():
  """The guard passes the SuperNode's exit status on; the site's worker raises once the
  SuperNode has exited instead of polling its Runtime API forever; a SuperNode command not on
  PATH fails at once, naming it."""
  from ultrajax.fl import worker

  assert guard.start([sys.executable, "-c", "import sys; sys.exit(3)"]).wait(timeout=60) == 3
  killed = guard.start([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), 9)"])
  assert killed.wait(timeout=60) == 128 + 9
  with pytest.raises(FileNotFoundError, match="'no-such-supernode' is not on PATH"):
    guard.start(["no-such-supernode", "--insecure"])
  with pytest.raises(RuntimeError, match="SuperNode exited with status 3"):
    worker.serve(f"127.0.0.1:{free_port()}", client.app, supernode_exit=lambda: 3)


def test_a_site_applies_the_runs_shared_fields_then_its_own_and_keeps_each_jobs_state_apart(
  tmp_path, monkeypatch
):
  from flwr.app import Context, RecordDict

  made = []
  monkeypatch.setattr(client, "_site", lambda *args: made.append(args))
  node = dict(config=SPEC, workdir=str(tmp_path), overrides="fl.site_id=1 fed.local_epochs=2")
  for server_workdir in ("/srv/a", "/srv/a", "/srv/b"):
    run = dict(config="/c.py", workdir=server_workdir, overrides="fed.local_epochs=5 model.depth=1")
    client.site_of(
      Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=run)
    )
  (spec, overrides, workdir_a), again, (_, _, workdir_b) = made
  assert spec == SPEC  # the site's own config file, not the server's path
  assert overrides == "fed.local_epochs=5 model.depth=1 fl.site_id=1 fed.local_epochs=2"
  assert site.load_config(spec, overrides).fed.local_epochs == 2  # the site's own field wins
  assert again[2] == workdir_a != workdir_b
  assert pathlib.Path(workdir_a).parent == tmp_path
  run["overrides"] += " data.root=/elsewhere"
  with pytest.raises(configlib.ConfigError, match=r"the run sets \['data.root=/elsewhere'\]"):
    client.site_of(
      Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=run)
    )


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


# ----------------------------------------------------------------------------- real processes
def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Consortium:
  """A SuperLink and three sites on 127.0.0.1, each a process group of its own (a site: the
  `python -m ultrajax.fl.client` process, which serves the ClientApp, and its SuperNode under
  its guard, in a session of their own)."""

  def __init__(self, root: pathlib.Path):
    self.root, self.port = root, free_port()
    bin_dir = str(pathlib.Path(sys.executable).parent)  # flower-superlink, flwr, ...
    # The test session's XLA cache (conftest) is inherited: the sites' compiled local epoch is
    # the in-process tests'. Every compile of these processes is written to it, not only those
    # over JAX's default 1 s, so a restarted site or ServerApp compiles nothing again.
    self.env = dict(
      os.environ,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      PATH=f"{bin_dir}:{os.environ['PATH']}",
      FLWR_HOME=str(root / "flwr"),
      FLWR_TELEMETRY_ENABLED="0",
      FLWR_DISABLE_UPDATE_CHECK="1",
    )
    (root / "flwr").mkdir(parents=True)
    (root / "flwr" / "config.toml").write_text(
      f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
      f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
    )
    self.procs: dict[str, subprocess.Popen] = {}

  def _start(self, name: str, command: list[str]) -> None:
    log = (self.root / f"{name}.log").open("a")
    self.procs[name] = subprocess.Popen(
      command,
      env=self.env,
      cwd=REPO,
      stdout=log,
      stderr=subprocess.STDOUT,
      start_new_session=True,
      # Killed with this test process too, even when a CI timeout kills it before `finally`.
      preexec_fn=lambda: guard.die_with_parent(signal.SIGKILL),
    )

  def log(self, name: str) -> str:
    return (self.root / f"{name}.log").read_text(errors="replace")

  def start(self) -> None:
    link = ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port)]
    self._start("superlink", link + ["--disable-runtime-dependency-installation"])
    for k in range(3):
      self.start_site(k)

  def start_site(self, k: int) -> None:
    self._start(
      f"site{k}",
      [
        sys.executable,
        "-m",
        "ultrajax.fl.client",
        f"--config={SPEC}",
        f"--workdir={self.root / f'site{k}'}",
        f"--superlink=127.0.0.1:{self.port}",
        "--insecure",
        f"--port={free_port()}",  # its SuperNode's Runtime API
        f"--config.fl.site_id={k}",
        f"--config.data.clients={sources.DEFAULT_CLIENTS[k][0]}",
      ],
    )

  def crash_site_mid_round(self, k: int, round_index: int) -> None:
    """SIGKILLs site k's ClientApp process after its SuperNode received round `round_index`
    and before the site replied. Its SuperNode follows: it gets one SIGTERM through its guard
    (ultrajax/fl/guard.py) and tells the SuperLink it leaves, so the SuperLink answers the
    server for it at once.

    The process is stopped (SIGSTOP) as soon as the SuperNode logs the round, so it cannot take
    the task, and killed once the SuperNode holds the whole message."""
    proc, name, tag = self.procs[f"site{k}"], f"site{k}", f"ROUND {round_index}]"
    self.wait(lambda: tag in self.log(name), 600, f"site {k} to receive round {round_index}", 0.05)
    os.kill(proc.pid, signal.SIGSTOP)
    begin = self.log(name).index(tag)
    self.wait(lambda: "Received successfully" in self.log(name)[begin:], 60, "the message")
    assert "Sending" not in self.log(name)[begin:], f"site {k} answered before it was stopped"
    guarded = self._tree(proc.pid)[1:]  # the guard and the SuperNode
    proc.kill()
    proc.wait()
    self.wait(lambda: not set(guarded) & set(self._processes()), 30, f"site {k}'s SuperNode")
    assert '"POST /v1/fleet/deactivate-node HTTP/1.1" 200' in self.log("superlink")

  def flwr(self, *args: str) -> str:
    out = subprocess.run(
      ["flwr", *args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout

  def submit(
    self, workdir: pathlib.Path, overrides: str, *, command: bool = True
  ) -> subprocess.Popen:
    """Submits a job without waiting (`run_id` waits): through `python -m ultrajax.fl.server`
    (it writes the Flower app and runs `flwr run`), or with command=False through its
    `server.submission` called here and `flwr run` (the same code, without a process that
    imports JAX again)."""
    argv = [f"--config={SPEC}", f"--workdir={workdir}"]
    argv += [f"--config.{o}" for o in overrides.split()] + ["test"]
    if command:
      argv = [sys.executable, "-m", "ultrajax.fl.server", *argv]
    else:
      argv = server.submission(argv)
    return subprocess.Popen(
      argv, env=self.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

  @staticmethod
  def run_id(submitted: subprocess.Popen) -> str:
    out = submitted.communicate(timeout=120)[0]
    assert submitted.returncode == 0, out
    return re.search(r"started run (\d+)", out).group(1)

  @staticmethod
  def _processes() -> dict[int, tuple[int, int]]:
    """{pid: (parent pid, process group)} of the live processes (zombies excluded)."""
    table = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
      try:
        state, ppid, pgid = stat.read_text().rsplit(")", 1)[1].split()[:3]
      except (OSError, ValueError):
        continue
      if state != "Z":
        table[int(stat.parent.name)] = (int(ppid), int(pgid))
    return table

  def _group(self, pgid: int) -> list[int]:
    return [p for p, (_, g) in self._processes().items() if g == pgid]

  def _tree(self, pid: int) -> list[int]:
    """pid and its live descendants (the SuperLink's SuperExec runs in a session of its own)."""
    table, tree = self._processes(), [pid]
    for p in tree:
      tree += [c for c, (parent, _) in table.items() if parent == p]
    return tree

  def kill_serverapp(self) -> None:
    """SIGKILLs the ServerApp process the SuperLink started for the run."""
    pids = []
    for p in self._tree(self.procs["superlink"].pid):
      try:
        if b"flwr-serverapp" in pathlib.Path(f"/proc/{p}/cmdline").read_bytes():
          pids.append(p)
      except OSError:
        pass
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)

  def wait(self, done, timeout: float, what: str, poll_s: float = 0.5) -> None:
    """Polls `done()`; fails the test with the logs' tails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
      if time.monotonic() > deadline:
        tails = "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in self.procs)
        pytest.fail(f"timed out after {timeout} s waiting for {what}\n{tails}")
      time.sleep(poll_s)

  def close(self) -> None:
    """SIGKILLs every process this consortium started, with their descendants."""
    pids = [p for proc in self.procs.values() for p in self._tree(proc.pid)]
    pids += [p for proc in self.procs.values() for p in self._group(proc.pid)]
    for pid in set(pids):
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    for proc in self.procs.values():
      proc.wait()


# FedAvg checkpoints every round (the server is killed once round 2's exists); FedProx only
# its last.
FEDAVG_JOB = " fl.min_clients=3 fl.retries=2"


def checkpoint_diff(workdir: pathlib.Path, params) -> float:
  """max |checkpointed - params|, leaf by leaf named by path (Orbax restores list indices of
  the pytree as string keys)."""
  saved, want = params_lib.to_arrays(checkpoint.load_params(workdir)), params_lib.to_arrays(params)
  assert sorted(saved) == sorted(want)
  return max(float(np.max(np.abs(np.asarray(saved[k], np.float64) - want[k]))) for k in want)


def logged_rounds(workdir: pathlib.Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  return [json.loads(line) for line in path.open()] if path.exists() else []


def finished(workdir: pathlib.Path, rounds: int = 3):
  return lambda: (
    len(logged_rounds(workdir)) == rounds and (workdir / "checkpoints" / str(rounds)).is_dir()
  )


@pytest.mark.slow
def test_real_superlink_and_sites_equal_the_simulation_through_a_site_and_a_server_crash(
  fedavg, fedprox_sim, tmp_path
):
  """A real SuperLink and three site processes on 127.0.0.1. FedAvg: site 1's process is
  SIGKILLed in the middle of round 2 and started again (fl.min_clients=3: the round waits for it
  and is sent again), the ServerApp process is SIGKILLed after round 2 and the job submitted
  again (it resumes from its checkpoint); FedProx on the same processes, submitted with the
  resumed FedAvg job. Both end equal to the in-process simulation."""
  net = Consortium(tmp_path)
  try:
    net.start()
    job = tmp_path / "fedavg"
    first_run = net.run_id(net.submit(job, BASE + FEDAVG_JOB))
    net.crash_site_mid_round(1, 2)
    net.start_site(1)
    net.wait(lambda: (job / "checkpoints" / "2").is_dir(), 600, "round 2's checkpoint")
    net.kill_serverapp()
    # The operator ends the dead run: else the SuperNodes keep pulling its round 3 message
    # until the SuperLink expires the ServerApp's task (2 missed 30 s heartbeats).
    net.flwr("stop", first_run, "test")
    # FedProx on the same sites, submitted with it: the two jobs' ServerApps run at once (each
    # site keeps the two jobs' states apart).
    prox = tmp_path / "fedprox"
    resubmitted = net.submit(job, BASE + FEDAVG_JOB, command=False)
    net.run_id(net.submit(prox, BASE + PROX + " ckpt_every_rounds=3", command=False))
    run = net.run_id(resubmitted)
    net.wait(finished(job), 600, "the resubmitted FedAvg job")
    assert checkpoint_diff(job, fedavg["sim"]) < TOL
    metrics = logged_rounds(job)
    assert [(m["round"], m["clients"], m["dropped"]) for m in metrics] == [
      (1, 3, 0),
      (2, 3, 0),
      (3, 3, 0),
    ]
    first_run_log = net.flwr("log", first_run, "test", "--show")
    assert "round 2: 2 of 3 sites answered (need 3); sending it again" in first_run_log
    # The resubmitted run started at round 3: no site received its rounds 1 or 2.
    sites = "".join(net.log(f"site{k}") for k in range(3))
    assert f"[RUN {run}, ROUND 3]" in sites and f"[RUN {run}, ROUND 2]" not in sites

    net.wait(finished(prox), 600, "the FedProx job")
    error = checkpoint_diff(prox, fedprox_sim)
    assert error < TOL
    # Closer to the FedProx simulation than to FedAvg: the sites applied the proximal term.
    assert checkpoint_diff(prox, fedavg["deployed"]) > error
  finally:
    net.close()
