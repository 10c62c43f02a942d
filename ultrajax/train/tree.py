"""Small helpers over parameter pytrees (nested dicts of arrays, as `nnx.to_pure_dict` gives)."""

from __future__ import annotations

import jax


def path_str(keypath) -> str:
  """'blocks/0/attn/qkv/kernel' for a jax key path."""
  return jax.tree_util.keystr(keypath, simple=True, separator="/")


def map_with_path(fn, tree):
  """`jax.tree.map` whose `fn(path: str, leaf)` also gets the leaf's slash-joined path."""
  return jax.tree_util.tree_map_with_path(lambda kp, x: fn(path_str(kp), x), tree)


def count(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))
