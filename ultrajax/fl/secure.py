"""One round under Flower's SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020).

Flower's `SecAggPlusWorkflow` (server) and `secaggplus_mod` (client) run the protocol: key
agreement, Shamir shares of each site's secrets among its neighbours, each site's upload
[q(n_k / max_weight), q(n_k / max_weight * update_k)] plus pairwise and self masks, and the
unmasking, which also removes the masks of sites that dropped after the key exchange. The
server ends with sum_k n_k update_k / sum_k n_k and nothing per site except what Flower's
FitRes carries in the clear: n_k and the scalars (site id, steps, loss, gradient norm).

The workflow is written against Flower's legacy Strategy interface, hence `_Collect`.

Quantisation: each value of n_k / max_weight * update_k is clipped to +-clip_range and rounded
to one of `quantization` levels, so the mean carries an error of about
clip_range / quantization * max_weight / sum_k n_k per value (tests check it).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig, SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

from ultrajax.fl import site


class _Collect(Strategy):
  """The smallest legacy Strategy: sends the round's parameters to every registered node and
  keeps the unmasked mean that the workflow passes to `aggregate_fit`."""

  def __init__(self, round_index: int):
    self.round_index = round_index
    self.mean, self.results, self.failures = None, [], []

  def initialize_parameters(self, client_manager):
    return None

  def configure_fit(self, server_round, parameters, client_manager):
    fitins = FitIns(parameters, {"round": self.round_index})
    return [(proxy, fitins) for proxy in client_manager.all().values()]

  def aggregate_fit(self, server_round, results, failures):
    # The workflow has put the unmasked weighted mean into every FitRes.
    if results:
      self.mean = parameters_to_ndarrays(results[0][1].parameters)
    self.results = [dict(fitres.metrics) for _, fitres in results]
    self.failures = [str(f) for f in failures]
    return None, {}

  def configure_evaluate(self, server_round, parameters, client_manager):
    return []

  def aggregate_evaluate(self, server_round, results, failures):
    return None, {}

  def evaluate(self, server_round, parameters):
    return None


def secagg_round(grid, context: Context, config, nodes, arrays: dict, round_index: int, timeout):
  """(mean update {key: array} or None, per-site scalars, failure strings) of one round."""
  f = config.fl
  collect = _Collect(round_index)
  legacy = LegacyContext(
    context,
    config=ServerConfig(num_rounds=1, round_timeout=timeout),
    strategy=collect,
    client_manager=SimpleClientManager(),
  )
  for node in nodes:
    legacy.client_manager.register(GridClientProxy(node_id=node, grid=grid, run_id=grid.run.run_id))
  legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
    {Key.CURRENT_ROUND: round_index + 1}
  )
  legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
    ndarrays_to_parameters(list(arrays.values())), keep_input=True
  )
  workflow = SecAggPlusWorkflow(
    num_shares=1.0,
    reconstruction_threshold=0.5,
    max_weight=f.secagg_max_weight,
    clipping_range=f.secagg_clip_range,
    quantization_range=int(f.secagg_quantization),
    timeout=timeout,
  )
  workflow(grid, legacy)
  del legacy.state.array_records[MAIN_PARAMS_RECORD]
  missing = len(nodes) - len(collect.results)
  failures = [
    f"a node dropped out of SecAgg+ ({'; '.join(collect.failures) or 'no reply'})"
  ] * missing
  if collect.mean is None:
    return None, [], failures or ["SecAgg+ halted (too few sites for its threshold)"]
  mean = {k: np.asarray(v, np.float32) for k, v in zip(arrays, collect.mean, strict=True)}
  return mean, [site.round_scalars(m) for m in collect.results], failures
