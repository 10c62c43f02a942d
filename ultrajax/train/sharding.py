"""Device mesh and shardings: axes ('clients', 'data'), parameter shardings by path rules.

The mesh is laid out so that the 'clients' axis stays inside each host and the 'data' axis
spans hosts with each process owning a contiguous block of it. Every process then loads all
clients' data for its slice of the batch, and `jax.make_array_from_process_local_data` can
assemble global arrays without cross-host shuffling.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ultrajax import configlib
from ultrajax.train import tree

AXES = ("clients", "data")


def compute_platform(mesh=None) -> str:
  """'cpu', 'gpu' or 'tpu': what a program on `mesh`'s devices, or the program being traced, is
  compiled for. Without `mesh`, the devices of the mesh set by `jax.set_mesh` (the jobs set
  one), else JAX's default backend. They differ when a GPU's program is compiled on a host
  without one (`bench plan --target`)."""
  if mesh is not None:
    platform = mesh.devices.flat[0].platform
  else:
    device = jax.sharding.get_abstract_mesh().abstract_device
    platform = device.platform if device is not None else jax.default_backend()
  return "gpu" if platform in ("cuda", "rocm") else platform


def make_mesh(clients: int = 1, data: int = -1, devices=None) -> Mesh:
  """A ('clients', 'data') mesh over all devices; `data=-1` takes what `clients` leaves."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  if clients < 1 or n % clients:
    raise configlib.ConfigError(f"config.mesh.clients={clients} does not divide {n} devices")
  if data == -1:
    data = n // clients
  if clients * data < n and jax.process_count() == 1 and data >= 1:
    # A smaller mesh on one host (e.g. to compare 1-device and 8-device runs): the first devices.
    devices, n = devices[: clients * data], clients * data
  if clients * data != n:
    raise configlib.ConfigError(
      f"config.mesh clients={clients} x data={data} != {n} available devices"
    )
  num_processes = len({d.process_index for d in devices})
  local = n // num_processes
  if local % clients:
    raise configlib.ConfigError(
      f"config.mesh.clients={clients} must divide the {local} devices of each host"
    )
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  grid = np.array(ordered, dtype=object).reshape(num_processes, clients, local // clients)
  grid = grid.transpose(1, 0, 2).reshape(clients, data)
  return Mesh(grid, AXES)


RULE_KINDS = ("replicated", "fsdp")


def check_rules(rules, field: str = "sharding_rules") -> None:
  """Start-up check of config.<field>: (regex, kind) pairs; ConfigError naming the bad rule."""
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
      raise configlib.ConfigError(f"config.{field} has {rule!r}, not a (regex, kind) pair")
    pattern, kind = rule
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise configlib.ConfigError(
        f"config.{field}: {pattern!r} is not a regular expression ({e})"
      ) from None
    if kind not in RULE_KINDS:
      raise configlib.ConfigError(
        f"config.{field}: kind {kind!r} of {pattern!r} is not one of {RULE_KINDS}"
      )


def _leaf_spec(path: str, shape, rules, mesh: Mesh) -> tuple:
  for pattern, kind in rules:
    if re.fullmatch(pattern, path):
      if kind == "replicated":
        return (None,) * len(shape)
      if kind == "fsdp":
        # Shard the largest dimension the data axis divides; small leaves stay replicated.
        size = mesh.shape["data"]
        for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
          if shape[i] % size == 0 and shape[i] >= size:
            return tuple("data" if j == i else None for j in range(len(shape)))
        return (None,) * len(shape)
      raise configlib.ConfigError(
        f"sharding rule kind {kind!r} for {pattern!r} is not 'replicated' or 'fsdp'"
      )
  raise configlib.ConfigError(f"no sharding rule matches parameter {path!r}")


def tree_shardings(abstract_tree, mesh: Mesh, rules, client_axis: bool):
  """NamedShardings for a tree of (abstract) arrays from (regex, kind) rules over paths.

  client_axis: the leaves carry a leading client axis, which is sharded over 'clients'.
  """

  def one(path, x):
    shape = x.shape[1:] if client_axis else x.shape
    spec = _leaf_spec(path, shape, rules, mesh)
    return NamedSharding(mesh, P("clients", *spec) if client_axis else P(*spec))

  return tree.map_with_path(one, abstract_tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """For [C, K, B, ...] batches: clients over 'clients', the batch dimension over 'data'."""
  return NamedSharding(mesh, P("clients", None, "data", *([None] * (ndim - 3))))


def client_vector_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("clients"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Builds the global [C, K, B, ...] array from this process's [C, K, B/processes, ...]."""
  global_shape = list(local.shape)
  global_shape[2] *= jax.process_count()
  return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))
