"""A hospital's process on Flower: the `ClientApp` that trains one site (site.py) per round.

The SuperNode that runs it gives it the site's own settings as node config (Flower's
`--node-config`, a string or a .toml file):

  config     the shared config file and preset, e.g. 'configs/pretrain_fed.py:cpu'
  overrides  this site's fields, space-separated: 'fl.site_id=2 data.source=folder
             data.root=/data/us' (the same syntax as --config.field=value, without --config.)
  workdir    this site's folder for its optimizer and data-iterator state

The run (the server's command) carries the consortium's shared fields as its run config
`overrides` (fed.strategy, model.*, ...): a site applies them first and its own overrides
after, so the site's own fields win. Which images a site trains on is the site's alone: a run
that sets one of SITE_ONLY is refused. A site keeps each job's state apart, in
`workdir/job-<hash of the server's workdir>/`.

What leaves the site per round is site.train_round's result (c_i stays on the site's disk) and
its id. With SecAgg+ (the server's config.fl.secagg) the update leaves masked and quantised; a
site whose own config sets fl.secagg=True refuses any round that is not securely aggregated.

  python -m ultrajax.fl.client --config=configs/pretrain_fed.py:cpu --workdir=/var/site \
      --superlink=server.example.org:8000 --root-certificates=ca.crt \
      --config.fl.site_id=2 --config.data.source=folder --config.data.root=/data/us
starts this site's SuperNode (flower-supernode --isolation process) with that node config,
under a guard (guard.py: it passes this process's death on to the SuperNode once), and serves
the SuperNode's ClientApp tasks itself (worker.py): one long-lived process that imports JAX
and compiles the local epoch once.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
import signal
import sys

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from ultrajax import configlib
from ultrajax.fl import params as params_lib, server as server_lib, site as site_lib

LEGACY_INS = "fitins.parameters"  # the record SecAgg+ (Flower's legacy FitIns layout) carries


@functools.lru_cache(maxsize=4)
def _site(config_spec: str, overrides: str, workdir: str) -> site_lib.Site:
  """One Site per process and node config (its compiled step is reused across rounds when the
  ClientApp process is long-lived)."""
  return site_lib.Site(site_lib.load_config(config_spec, overrides), workdir)


# The fields that choose a site's images (and its identity): never taken from the run.
SITE_ONLY = (
  "fl.site_id",
  "data.source",
  "data.root",
  "data.manifest",
  "data.image_column",
  "data.client_column",
  "data.tfds_name",
  "data.tfds_data_dir",
  "data.tfds_split",
  "data.dicom_frames",
  "data.clients",
  "data.pool_clients",
  "data.fraction",
  "data.probe",
  "data.on_bad_image",
)


def site_of(context: Context) -> site_lib.Site:
  nc, rc = context.node_config, context.run_config
  missing = [k for k in ("config", "workdir") if k not in nc]
  configlib.check(
    not missing,
    f"the SuperNode's --node-config lacks {missing} (needs config, "
    "overrides, workdir; docs/deployment.md)",
  )
  refused = [
    item for item in str(rc.get("overrides", "")).split() if item.split("=")[0] in SITE_ONLY
  ]
  configlib.check(
    not refused,
    f"the run sets {refused}: which images a site trains on is set by the site only "
    "(its own --config.<field> flags)",
  )
  overrides = " ".join(str(c.get("overrides", "")) for c in (rc, nc)).strip()
  workdir = pathlib.Path(str(nc["workdir"]))
  if "workdir" in rc:  # one folder per job: a second job cannot pick up this one's state
    workdir = workdir / f"job-{hashlib.sha256(str(rc['workdir']).encode()).hexdigest()[:12]}"
  return _site(str(nc["config"]), overrides, str(workdir))


def _secagg_when_asked(msg: Message, context: Context, call_next) -> Message:
  """Flower's SecAgg+ mod for the rounds the server runs with SecAgg+; other messages pass."""
  if RECORD_KEY_CONFIGS in msg.content.config_records:
    return secaggplus_mod(msg, context, call_next)
  return call_next(msg, context)


app = ClientApp(mods=[_secagg_when_asked])


@app.train()
def train(msg: Message, context: Context) -> Message:
  site = site_of(context)
  content = msg.content
  if LEGACY_INS in content.array_records:  # inside SecAgg+: FitIns in, FitRes out
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    arrays = params_lib.to_arrays(
      params_lib.from_list(
        parameters_to_ndarrays(fitins.parameters),
        site.abstract_params,
        where=f"site {site.site_id}: SecAgg+ parameters",
      )
    )
    result = site.train_round(arrays, int(fitins.config["round"]))
    fitres = FitRes(
      Status(Code.OK, ""),
      ndarrays_to_parameters(list(result["update"].values())),
      site_lib.secagg_weight(site.programs.strategy, result["num_images"]),
      site_lib.round_scalars(dict(result, site_id=site.site_id)),
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
  configlib.check(
    not site.config.fl.secagg,
    f"site {site.site_id}: config.fl.secagg=True and "
    "the server asked for a plaintext update; refused",
  )
  received = {
    name: {k: v.numpy() for k, v in record.items()}
    for name, record in content.array_records.items()
  }
  result = site.train_round(
    received["arrays"], int(content.config_records["config"]["round"]), received.get("control")
  )
  reply = RecordDict(
    {
      "update": server_lib.records(result["update"]),
      "metrics": MetricRecord(site_lib.round_scalars(dict(result, site_id=site.site_id))),
    }
  )
  if "control_delta" in result:  # SCAFFOLD: c_i' - c_i; c_i itself stays on the site's disk
    reply["control_delta"] = server_lib.records(result["control_delta"])
  return Message(reply, reply_to=msg)


def site_command(argv: list[str]) -> tuple[list[str], str]:
  """(`flower-supernode` command, its Runtime API address) for this module's command line:
  --config, --workdir and --config.<field>=<value> become the node config; the other flags
  pass through. The SuperNode runs in process isolation: this process serves its tasks."""
  config, workdir, overrides, rest = site_lib.command_line(argv, "ultrajax.fl.client")
  configlib.check(
    not any(a.startswith("--isolation") for a in rest),
    "python -m ultrajax.fl.client runs the SuperNode with --isolation process (it serves the "
    "ClientApp itself); drop --isolation",
  )
  flags = {}  # the Runtime API's --host / --port, as `--flag=value` or `--flag value`
  for i, arg in enumerate(rest):
    name, eq, value = arg.partition("=")
    if name in ("--host", "--port"):
      flags[name] = value if eq else rest[i + 1]
  address = f"{flags.get('--host', '127.0.0.1')}:{flags.get('--port', '9094')}"
  node_config = f'config="{config}" workdir="{workdir}" overrides="{overrides}"'
  command = ["flower-supernode", *rest, "--isolation", "process", "--node-config", node_config]
  return command, address


def main(argv: list[str]) -> None:
  """Starts the site's SuperNode and serves its ClientApp tasks until killed."""
  import logging as std_logging

  from absl import logging

  from ultrajax.fl import guard, worker

  command, address = site_command(argv)
  logging.set_verbosity(logging.INFO)
  logging.use_absl_handler()
  std_logging.getLogger("httpx").setLevel(std_logging.WARNING)  # one line per Runtime API call
  supernode = guard.start(command)  # its parent: one thread, so a killed site is noticed at once
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the `finally` below
  try:
    worker.serve(address, app, supernode_exit=supernode.poll)
  finally:
    supernode.terminate()
    supernode.wait(timeout=30)


if __name__ == "__main__":
  main(sys.argv[1:])
