"""A hospital's process on Flower: the `ClientApp` that trains one site (site.py) per round.

The SuperNode that runs it gives it the site's own settings as node config (Flower's
`--node-config`, a string or a .toml file):

  config     the shared config file and preset, e.g. 'configs/pretrain_fed.py:cpu'
  overrides  this site's fields, space-separated: 'fl.site_id=2 data.source=folder
             data.root=/data/us' (the same syntax as --config.field=value, without --config.)
  workdir    this site's folder for its optimizer and data-iterator state

What leaves the site per round: the update y_k - x (named float32 arrays), n_k, the number
of local steps, the mean loss and gradient norm, and the site id. With SecAgg+ (the server's
config.fl.secagg) the update leaves masked and quantised; a site whose own config sets
fl.secagg=True refuses any round that is not securely aggregated.

  python -m ultrajax.fl.client --config=configs/pretrain_fed.py:cpu --workdir=/var/site \
      --superlink=server.example.org:8000 --root-certificates=ca.crt \
      --config.fl.site_id=2 --config.data.source=folder --config.data.root=/data/us
starts this site's SuperNode (flower-supernode) with that node config.
"""

from __future__ import annotations

import functools
import os
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


def site_of(context: Context) -> site_lib.Site:
  nc = context.node_config
  missing = [k for k in ("config", "workdir") if k not in nc]
  configlib.check(
    not missing,
    f"the SuperNode's --node-config lacks {missing} (needs config, "
    "overrides, workdir; docs/deployment.md)",
  )
  return _site(str(nc["config"]), str(nc.get("overrides", "")), str(nc["workdir"]))


def _metrics(site: site_lib.Site, result: dict) -> dict:
  return dict(
    site_id=site.site_id,
    num_images=result["num_images"],
    steps=result["steps"],
    loss=result["loss"],
    grad_norm=result["grad_norm"],
  )


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
      _metrics(site, result),
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
  configlib.check(
    not site.config.fl.secagg,
    f"site {site.site_id}: config.fl.secagg=True and "
    "the server asked for a plaintext update; refused",
  )
  arrays = {k: v.numpy() for k, v in content.array_records["arrays"].items()}
  result = site.train_round(arrays, int(content.config_records["config"]["round"]))
  reply = RecordDict(
    {
      "update": server_lib.records(result["update"]),
      "metrics": MetricRecord(_metrics(site, result)),
    }
  )
  return Message(reply, reply_to=msg)


def supernode_command(argv: list[str]) -> list[str]:
  """`flower-supernode` arguments for this module's command line: --config, --workdir and
  --config.<field>=<value> become the node config; the other flags pass through."""
  config, workdir, overrides, rest = None, None, [], []
  for arg in argv:
    if arg.startswith("--config="):
      config = arg.split("=", 1)[1]
    elif arg.startswith("--workdir="):
      workdir = os.path.abspath(arg.split("=", 1)[1])
    elif arg.startswith("--config."):
      overrides.append(arg[len("--config.") :])
    else:
      rest.append(arg)
  configlib.check(
    config is not None and workdir is not None,
    "python -m ultrajax.fl.client needs --config=FILE[:preset] and --workdir=DIR",
  )
  node_config = f'config="{config}" workdir="{workdir}" overrides="{" ".join(overrides)}"'
  return ["flower-supernode", *rest, "--node-config", node_config]


if __name__ == "__main__":
  command = supernode_command(sys.argv[1:])
  os.execvp(command[0], command)
