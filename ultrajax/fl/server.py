"""The consortium's server on Flower: a `ServerApp` that runs ultrajax's strategies.

Each round the server sends the global parameters (params.py's named arrays) to every
connected site, collects each site's update y_k - x with its n_k, and moves x as the
simulation's strategy does (site.py's MEAN / CONTROL / PER_SITE): the strategy's server step on
the weighted mean, SCAFFOLD's c also by the weighted mean of the sites' c_i' - c_i, and the
robust rules and DP-FedAvg through the simulation's aggregation hooks over each site's own
update (`per_site_update`, with the simulation's server key for DP's noise). It writes what the
simulation writes (Orbax checkpoints with the strategy state, metrics.jsonl, TensorBoard,
reconstruction PNGs drawn on phantom images: the server holds no patient data), and a
restarted server resumes from its last checkpoint.

A site that fails or does not answer in time is left out of the round (weights renormalised
over the sites that answered, `dropped` logged); too few answers send the round again
(config.fl: docs/deployment.md). With config.fl.secagg the round runs Flower's SecAgg+ workflow
instead (secure.py), so only the MEAN strategies run under it.
"""

from __future__ import annotations

import copy
import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from ultrajax import configlib
from ultrajax.data import clients as clients_lib
from ultrajax.fed import rounds, strategies
from ultrajax.fl import local, params as params_lib, site as site_lib
from ultrajax.train import checkpoint, loop, mim_objectives, resume, writers
from ultrajax.viz import reconstruction

TRAIN = MessageType.TRAIN


class Coordinator:
  """The server's state and outputs (no networking): global params, strategy state,
  checkpoints, metrics and PNGs."""

  def __init__(self, config, workdir):
    site_lib.validate(config)
    self.config, self.workdir = config, workdir
    # The site's compiled pieces (one client, one lane) hold what the server needs too, but
    # for the strategy: the server's is set up for the consortium's size.
    compiled = site_lib.compiled(config)
    self.mesh, self.abstract_params = compiled.mesh, compiled.programs.abstract_params
    self.programs = compiled.programs
    self.strategy = site_lib.server_strategy(config)
    self.num_sites = config.fl.num_sites
    self._server_step = jax.jit(functools.partial(mean_step, self.strategy))
    self._per_site = jax.jit(per_site_update(self.strategy, max(self.num_sites, 1)))
    model_key, self.train_key, self.preview_key = site_lib.training_keys(config)
    init_strategy = jax.jit(lambda p: site_lib.server_state(self.strategy, p, self.num_sites))
    self.ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)

    def init():
      params = self.programs.init_params(model_key)
      return params, dict(strategy=init_strategy(params), rounds=np.int32(0))

    like_params, like_train = jax.eval_shape(init)
    with jax.set_mesh(self.mesh):
      self.start, self.params, train = loop.resume_or_init(
        self.ckpt, like_params, like_train, init, config=config
      )
    self.strategy_state = train["strategy"]
    self.writer = writers.create_writer(workdir)
    writers.truncate_jsonl(workdir / "metrics.jsonl", self.start)
    if self.start == 0:
      self.writer.write_hparams(config.to_dict())
    # Synthetic images only: the server never sees a site's data.
    phantom = copy.deepcopy(config)
    phantom.data.update(source="phantom", clients="", pool_clients=False, fraction=1.0)
    phantom.ultramim.smat = False
    self.preview = clients_lib.preview_images(
      clients_lib.client_sources(phantom), config.model.image_size
    )

  def sent_arrays(self) -> dict[str, dict]:
    """What a plaintext round sends each site: {'arrays': x} and, with SCAFFOLD, {'control':
    the global control variate c} (named arrays in wire order)."""
    out = {"arrays": params_lib.to_arrays(self.params)}
    if "c" in self.strategy_state:
      out["control"] = params_lib.to_arrays(self.strategy_state["c"])
    return out

  def apply(
    self,
    mean_update: dict,
    results: list[dict],
    dropped: int,
    seconds: float,
    mean_control: dict | None = None,
  ) -> dict:
    """The strategy's server step on x + mean_update; logs, draws and checkpoints the round.

    mean_update: {key: sum_k w_k (y_k - x)}, w the strategy's client_weights over the sites
    that answered; mean_control: SCAFFOLD's sum_k w_k (c_k' - c_k), which moves c; results:
    per answering site dict(site_id, num_images, steps, loss, grad_norm). Returns the logged
    scalars."""
    x = jax.device_get(self.params)
    delta = params_lib.from_arrays(mean_update, self.abstract_params, where="aggregated update")
    mean = jax.tree.map(lambda a, d: (np.asarray(a, np.float64) + d).astype(np.float32), x, delta)
    dc = None
    if mean_control is not None:
      dc = params_lib.from_arrays(
        mean_control, self.strategy_state["c"], where="aggregated control change"
      )
    new, state = self._server_step(self.params, mean, self.strategy_state, dc)
    return self._finish(new, state, results, dropped, seconds)

  def apply_each(
    self, updates: list[dict], results: list[dict], dropped: int, seconds: float
  ) -> dict:
    """The robust and DP rules: the simulation's aggregation hooks over each answering site's
    own update y_k - x (updates[i] from results[i]); then as `apply`."""
    x = self.params
    deltas = [
      params_lib.from_arrays(u, self.abstract_params, where=f"site {r['site_id']}'s update")
      for u, r in zip(updates, results, strict=True)
    ]
    ids = np.asarray([r["site_id"] for r in results], np.int32)
    weights = self.strategy.client_weights([r["num_images"] for r in results])
    steps = np.asarray([r["steps"] for r in results], np.float32)
    # The simulation's server key: fold_in(round key, SERVER_KEY) (fed/rounds.finish_round).
    key = jax.random.fold_in(rounds.round_key(self.train_key, self.start), rounds.SERVER_KEY)
    stacked = jax.tree.map(lambda *d: np.stack(d), *deltas)
    new, state = self._per_site(x, self.strategy_state, stacked, ids, weights, steps, key)
    return self._finish(new, state, results, dropped, seconds)

  def _finish(self, new, state, results, dropped, seconds) -> dict:
    done = self.start = self.start + 1
    self.params = jax.tree.map(lambda a, ref: a.astype(ref.dtype), new, self.params)
    self.strategy_state = state
    c = self.config
    steps = np.asarray([r["steps"] for r in results], np.float64)
    scalars = dict(
      round=done,
      loss=float(np.dot([r["loss"] for r in results], steps) / steps.sum()),
      grad_norm=float(np.dot([r["grad_norm"] for r in results], steps) / steps.sum()),
      lr=float(self.programs.lr_fn(done)),
      s_per_round=seconds,
      param_norm=float(self.programs.param_norm(self.params)),
      clients=len(results),
      dropped=dropped,
    )
    scalars.update({f"loss/client_{r['site_id']:02d}": r["loss"] for r in results})
    scalars.update(self.strategy.report(self.strategy_state, done))  # dp/epsilon, screen/*
    if loop.itstime(done, c.log_every_rounds, c.fed.num_rounds):
      self.writer.write_scalars(done, scalars)
    if loop.itstime(done, c.image_every_rounds, c.fed.num_rounds):
      with jax.set_mesh(self.mesh):
        shown = self.programs.preview(self.params, self.preview, self.preview_key)
      png = self.workdir / "images" / f"round_{done:05d}.png"
      reconstruction.save_grid(
        png,
        *[np.asarray(a) for a in jax.device_get(shown)],
        patch_size=mim_objectives.patch_size_of(c.model),
        title=f"round {done}, loss {scalars['loss']:.4f}",
      )
      self.writer.write_images(done, {"reconstructions": writers.png_image(png)})
    if loop.itstime(done, c.ckpt_every_rounds, c.fed.num_rounds):
      self.checkpoint(sorted(r["site_id"] for r in results))
    self.writer.flush()
    return scalars

  def checkpoint(self, sites=None) -> None:
    """Saves the state after the rounds done so far (once per round)."""
    done = self.start
    if done == 0 or self.ckpt.latest_step() == done:
      return
    meta = dict(config=self.config.to_json_best_effort(), round=done)
    if sites is not None:
      meta["sites"] = sites
    self.ckpt.save(
      done, self.params, dict(strategy=self.strategy_state, rounds=np.int32(done)), None, meta
    )

  def close(self) -> None:
    self.writer.close()  # its event file's last events, and its thread
    self.ckpt.close()


def weighted_mean(updates: list[dict], weights) -> dict:
  """{key: sum_k w_k u_k / sum_k w_k} in float64, cast back to each array's dtype."""
  w = np.asarray(weights, np.float64)
  w = w / w.sum()
  return {
    k: sum(wk * np.asarray(u[k], np.float64) for wk, u in zip(w, updates)).astype(
      updates[0][k].dtype
    )
    for k in updates[0]
  }


def mean_step(strategy, x, mean, state, mean_control=None):
  """(x', state'): the strategy's server step on the sites' weighted mean; with SCAFFOLD's
  mean_control = sum_k w_k (c_k' - c_k) also its c' = c + mean_control (Scaffold.server_update)."""
  new, state = strategy.server_step(x, mean, state)
  if mean_control is not None:
    state = dict(state, c=jax.tree.map(jnp.add, state["c"], mean_control))
  return new, state


def per_site_update(strategy, num_sites: int):
  """update(x, state, deltas [K, ...], site_ids [K], weights [K], steps [K], key) -> (x',
  state'): the simulation's aggregation hooks (accumulator, on_client_done per site,
  server_update; fed/strategies.py) over K sites' updates y_k - x. Site k is client site_ids[k]
  of num_sites, as in the simulation; weights are client_weights over the K sites."""

  def update(x, state, deltas, site_ids, weights, steps, key):
    server = strategies.Server(x, {})
    acc = strategy.accumulator(state, server, num_sites)
    for k in range(site_ids.shape[0]):
      y = jax.tree.map(lambda a, d: (a.astype(jnp.float32) + d[k]).astype(a.dtype), x, deltas)
      done = strategies.Finished(site_ids[k], weights[k], y, {}, steps[k])
      acc, state = strategy.on_client_done(acc, state, server, done)
    new, state = strategy.server_update(acc, state, server, key)
    return new.params, state

  return update


# ----------------------------------------------------------------------------- rounds on a Grid
def records(arrays: dict) -> ArrayRecord:
  """{key: numpy array} -> an ArrayRecord with the same keys in the same order."""
  return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def connected_sites(grid: Grid, want: int, timeout, poll_s: float = 0.5) -> list[int]:
  """The connected node ids, once `want` of them are connected or after `timeout` seconds
  (None: no limit), so a round waits for sites that start late or restart after a crash."""
  t0 = time.monotonic()
  while len(nodes := sorted(grid.get_node_ids())) < want:
    if timeout is not None and time.monotonic() - t0 >= timeout:
      break
    time.sleep(poll_s)
  return nodes


def send_and_receive(grid: Grid, messages, timeout, poll_s: float = 0.5) -> list[Message]:
  """Grid.send_and_receive, asking for the replies every poll_s seconds: Flower's HTTP grid
  asks every 3 s, which a round waits for after its last reply. Returns the replies that came
  within `timeout` seconds (None: all of them). The in-process LocalGrid, whose replies are
  there when push_messages returns (a lost one never comes), answers through its own."""
  if isinstance(grid, local.LocalGrid):
    return list(grid.send_and_receive(messages, timeout=timeout))
  waiting = set(grid.push_messages(messages))
  end = None if timeout is None else time.monotonic() + timeout
  replies = []
  while waiting:
    got = list(grid.pull_messages(waiting))
    replies += got
    waiting -= {reply.metadata.reply_to_message_id for reply in got}
    if not waiting or (end is not None and time.monotonic() >= end):
      break
    time.sleep(poll_s)
  return replies


def plain_round(grid: Grid, nodes, sent: dict[str, dict], round_index: int, timeout):
  """Sends `sent` ({record name: named arrays}: 'arrays' = x, with SCAFFOLD 'control' = c) to
  `nodes`; returns ([(reply arrays {record name: named arrays}, metrics)], failures)."""
  content = lambda: RecordDict(
    {
      **{name: records(arrays) for name, arrays in sent.items()},
      "config": ConfigRecord({"round": round_index}),
    }
  )
  messages = [
    Message(content(), dst_node_id=n, message_type=TRAIN, group_id=str(round_index + 1))
    for n in nodes
  ]
  replies = send_and_receive(grid, messages, timeout)
  ok, failures = [], []
  for reply in replies:
    if reply.has_error():
      failures.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
      continue
    arrays = {
      name: {k: v.numpy() for k, v in record.items()}
      for name, record in reply.content.array_records.items()
    }
    ok.append((arrays, dict(reply.content.metric_records["metrics"])))
  answered = {r.metadata.src_node_id for r in replies}
  failures += [f"node {n}: no reply" for n in nodes if n not in answered]
  return ok, failures


def run(
  grid: Grid,
  config,
  workdir,
  context: Context | None = None,
  *,
  stop_after_rounds: int | None = None,
):
  """Trains to config.fed.num_rounds over the sites connected to `grid`; returns the params.

  stop_after_rounds: return after that round as if the server were killed there."""
  workdir = pathlib.Path(workdir)
  site_lib.validate(config)
  f = config.fl
  timeout = f.round_timeout_s or None
  if context is None:  # called directly (tests, a dry run): the workflow state lives here
    context = Context(
      run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}
    )
  with resume.WorkdirLock(workdir):
    coord = Coordinator(config, workdir)
    last = (
      config.fed.num_rounds
      if stop_after_rounds is None
      else min(config.fed.num_rounds, stop_after_rounds)
    )
    try:
      for r in range(coord.start, last):
        why = coord.strategy.stop_reason(coord.start, coord.strategy_state)
        if why:  # DP-FedAvg's privacy budget: keep round r's state, end the run cleanly
          logging.warning("Stopping before round %d: %s", r + 1, why)
          coord.checkpoint()
          break
        t0 = time.perf_counter()
        for attempt in range(f.retries + 1):
          nodes = connected_sites(grid, f.min_clients, timeout)
          need = f.min_clients or len(nodes)
          if f.secagg:
            from ultrajax.fl import secure

            mean_update, results, failures = secure.secagg_round(
              grid, context, config, nodes, params_lib.to_arrays(coord.params), r, timeout
            )
          else:
            ok, failures = plain_round(grid, nodes, coord.sent_arrays(), r, timeout)
            ok.sort(key=lambda reply: int(reply[1]["site_id"]))  # site order, as the simulation
            results = [site_lib.round_scalars(m) for _, m in ok]
            weights = (
              coord.strategy.client_weights([m["num_images"] for m in results]) if ok else []
            )
            mean_update = weighted_mean([a["update"] for a, _ in ok], weights) if ok else None
          ids = [m["site_id"] for m in results]
          configlib.check(
            len(set(ids)) == len(ids),
            f"round {r + 1}: two sites answered with the same config.fl.site_id ({sorted(ids)})",
          )
          configlib.check(
            not f.num_sites or all(0 <= i < f.num_sites for i in ids),
            f"round {r + 1}: sites {sorted(ids)} answered; config.fl.num_sites={f.num_sites} "
            "allows site ids 0..num_sites-1",
          )
          for failure in failures:
            logging.warning("round %d: %s; left out of this round", r + 1, failure)
          if len(results) >= max(need, 1) and mean_update is not None:
            break
          logging.warning(
            "round %d: %d of %d sites answered (need %d); sending it again (%d of %d retries)",
            r + 1,
            len(results),
            len(nodes),
            need,
            attempt + 1,
            f.retries,
          )
        else:
          raise RuntimeError(
            f"round {r + 1}: fewer than {need} sites answered after "
            f"{f.retries} retries (config.fl.min_clients, config.fl.retries)"
          )
        if failures:
          logging.warning("round %d: weights renormalised over sites %s", r + 1, sorted(ids))
        args = results, len(failures), time.perf_counter() - t0
        if config.fed.strategy in site_lib.PER_SITE:
          scalars = coord.apply_each([a["update"] for a, _ in ok], *args)
        elif config.fed.strategy in site_lib.CONTROL:
          mean_control = weighted_mean([a["control_delta"] for a, _ in ok], weights)
          scalars = coord.apply(mean_update, *args, mean_control)
        else:
          scalars = coord.apply(mean_update, *args)
        logging.info(
          "round %d/%d  loss %.4f  %d sites (%d dropped)",
          r + 1,
          config.fed.num_rounds,
          scalars["loss"],
          len(results),
          len(failures),
        )
    finally:
      coord.close()
  return coord.params


# ----------------------------------------------------------------------------- Flower entry
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
  """Run config keys: config ('configs/pretrain_fed.py:cpu'), overrides ('fed.num_rounds=3
  fl.secagg=True'), workdir."""
  rc = context.run_config
  config = site_lib.load_config(str(rc["config"]), str(rc.get("overrides", "")))
  writers.quiet_orbax()
  logging.set_verbosity(logging.INFO)  # the rounds, and the sites left out, in the server's log
  logging.use_absl_handler()
  run(grid, config, pathlib.Path(str(rc["workdir"])), context)


def flower_app(config_spec: str, overrides: str, workdir: str) -> str:
  """The pyproject.toml of a Flower app that runs this ServerApp and ClientApp with this run
  config (`flwr run <its folder> <superlink connection>` submits it)."""
  quote = lambda s: json.dumps(str(s))  # a TOML basic string
  return f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "ultrajax-fl"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "ultrajax"

[tool.flwr.app.components]
serverapp = "ultrajax.fl.server:app"
clientapp = "ultrajax.fl.client:app"

[tool.flwr.app.config]
config = {quote(config_spec)}
overrides = {quote(overrides)}
workdir = {quote(workdir)}
"""


def submission(argv: list[str]) -> list[str]:
  """The `flwr run` command line for `python -m ultrajax.fl.server` with these arguments
  (--config=FILE[:preset] --workdir=DIR [--config.f=v ...] [flwr run flags, e.g. the SuperLink
  connection name]), after checking the config and writing DIR/flower_app."""
  config, workdir, overrides, rest = site_lib.command_line(argv, "ultrajax.fl.server")
  config_file, _, preset = config.partition(":")
  spec = str(pathlib.Path(configlib.find_config_file(config_file) or config_file).absolute())
  spec += f":{preset}" if preset else ""
  site_lib.load_config(spec, overrides)  # a bad field fails here, not on the SuperLink
  folder = pathlib.Path(workdir) / "flower_app"
  loop.atomic_write(folder / "pyproject.toml", flower_app(spec, overrides, workdir))
  return ["flwr", "run", str(folder), *rest]


if __name__ == "__main__":
  import os
  import sys

  command = submission(sys.argv[1:])
  os.execvp(command[0], command)
