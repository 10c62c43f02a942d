"""Parameter pytrees <-> named numpy arrays, the form they travel in between sites and server.

The wire format is an ordered mapping key -> array. A key is the leaf's slash-joined pytree path
(`train.tree.path_str`, e.g. 'encoder/blocks/0/attn/qkv/kernel'), and the order is the pytree's
own leaf order (`jax.tree.leaves`: dict keys sorted), so both ends list the same keys in the same
order without exchanging it. Flower's SecAgg+ carries a plain list of arrays: that list is the
values in this order.

On receipt every key, shape and dtype is checked against the receiver's own template; a
mismatch raises `configlib.DataError` naming the key (a site built with another config, a
truncated message, a float64 array where float32 was expected).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from ultrajax import configlib
from ultrajax.train import tree as tree_lib


def keys(tree) -> list[str]:
  """The leaves' paths in wire order."""
  return [tree_lib.path_str(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(tree)]


def to_arrays(tree) -> dict[str, np.ndarray]:
  """tree -> {path: host numpy array} in wire order (dicts keep insertion order)."""
  leaves = jax.device_get(jax.tree.leaves(tree))
  return dict(zip(keys(tree), (np.asarray(x) for x in leaves), strict=True))


def from_arrays(arrays: Mapping[str, np.ndarray], like, where: str = "received parameters"):
  """{path: array} -> a pytree shaped like `like` (arrays or ShapeDtypeStructs).

  Raises DataError naming the first missing, unexpected or mis-shaped/typed key."""
  wanted = keys(like)
  missing = [k for k in wanted if k not in arrays]
  extra = [k for k in arrays if k not in set(wanted)]
  if missing or extra:
    raise configlib.DataError(
      f"{where}: keys differ from this model's: missing {missing[:4]}"
      f"{' ...' if len(missing) > 4 else ''}, unexpected {extra[:4]}"
      f"{' ...' if len(extra) > 4 else ''}"
    )
  leaves = []
  for key, ref in zip(wanted, jax.tree.leaves(like), strict=True):
    x = np.asarray(arrays[key])
    if x.shape != tuple(ref.shape) or x.dtype != np.dtype(ref.dtype):
      raise configlib.DataError(
        f"{where}: {key!r} is {x.dtype}{list(x.shape)}, this model "
        f"expects {np.dtype(ref.dtype)}{list(ref.shape)}"
      )
    leaves.append(x)
  return jax.tree.unflatten(jax.tree.structure(like), leaves)


def from_list(arrays, like, where: str = "received parameters"):
  """A list of arrays in wire order (Flower's legacy Parameters) -> a pytree like `like`."""
  wanted = keys(like)
  if len(arrays) != len(wanted):
    raise configlib.DataError(
      f"{where}: {len(arrays)} arrays, this model has {len(wanted)} (first key {wanted[0]!r})"
    )
  return from_arrays(dict(zip(wanted, arrays)), like, where)
