"""Optimizers and schedules: AdamW with a per-step injected learning rate, MAE's schedule.

The learning rate lives in the optimizer state (`optax.inject_hyperparams`) and is set by the
caller before each update. Federated clients need this: the schedule runs on a fractional
"epoch" index (round + local step / steps of that client), which differs per client.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from ultrajax import configlib
from ultrajax.train import tree


def warmup_cosine(epoch, *, peak_lr: float, min_lr: float, warmup: float, total: float):
  """MAE's schedule on a fractional epoch: linear warmup, then half-cosine to min_lr.

  epoch: scalar (may be traced). Returns the learning rate at that point.
  """
  epoch = jnp.asarray(epoch, jnp.float32)
  warm = peak_lr * epoch / max(warmup, 1e-12)
  progress = (epoch - warmup) / max(total - warmup, 1e-12)
  cos = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * jnp.clip(progress, 0, 1)))
  return jnp.where(epoch < warmup, warm, cos)


def weight_decay_mask(params, mode: str):
  """Which leaves get weight decay: 'all' (UltraFedFM's code) or 'mae' (matrices only).

  MAE's `add_weight_decay` skips 1-D parameters (biases and norm scales); tokens such as
  cls_token [1, 1, D] keep decay there too, so the rule is simply ndim > 1.
  """
  if mode == "all":
    return jax.tree.map(lambda _: True, params)
  if mode == "mae":
    return jax.tree.map(lambda x: x.ndim > 1, params)
  raise configlib.ConfigError(f"config.optim.weight_decay_on={mode!r} is not 'mae' or 'all'")


def adamw_steps(optim_config, learning_rate, mask) -> list[optax.GradientTransformation]:
  """Global-norm clipping (when optim_config.grad_clip_norm > 0), then AdamW with weight decay
  where `mask` holds: the first steps of an optax.chain."""
  o = optim_config
  steps = [optax.clip_by_global_norm(o.grad_clip_norm)] if o.grad_clip_norm > 0 else []
  steps.append(optax.adamw(learning_rate, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=mask))
  return steps


def adamw(optim_config, params) -> optax.GradientTransformation:
  """AdamW (+ optional global-norm clipping) whose learning rate is set with `set_lr`."""
  mask = weight_decay_mask(params, optim_config.weight_decay_on)

  def make(learning_rate):
    return optax.chain(*adamw_steps(optim_config, learning_rate, mask))

  return optax.inject_hyperparams(make)(learning_rate=0.0)


def set_lr(opt_state, lr):
  """Returns opt_state with its injected learning rate replaced by `lr` (scalar)."""
  hyper = dict(opt_state.hyperparams)
  hyper["learning_rate"] = jnp.asarray(lr, hyper["learning_rate"].dtype)
  return opt_state._replace(hyperparams=hyper)


def peak_lr(optim_config, batch_size: int) -> float:
  """The MAE scaling rule: lr = base_lr * batch / 256."""
  return optim_config.base_lr * batch_size / 256


def vit_layer_id(path: str, depth: int) -> int:
  """BEiT/MAE's layer index for layer-wise lr decay: embeddings (patch_embed, cls_token) 0,
  blocks.i i + 1, everything after the blocks (final norms, heads, decoders) depth + 1.

  path: a parameter path like 'blocks/3/attn/qkv/kernel' or 'encoder/blocks/3/...'.
  """
  parts = path.split("/")
  if parts[0] == "encoder":
    parts = parts[1:]
  if parts[0] in ("patch_embed", "cls_token", "pos_embed"):
    return 0
  if parts[0] == "blocks":
    return int(parts[1]) + 1
  return depth + 1


def layer_decay_scales(params, depth: int, decay: float):
  """Per-leaf lr multipliers decay ** (depth + 1 - layer_id) (MAE's param_groups_lrd)."""
  return tree.map_with_path(
    lambda p, _: float(decay) ** (depth + 1 - vit_layer_id(p, depth)), params
  )


def scale_by_tree(scales) -> optax.GradientTransformation:
  """Multiplies each update leaf by its scale (a tree of floats shaped like the params)."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def finetune_adamw(
  optim_config, params, *, schedule, depth: int, trainable=None
) -> optax.GradientTransformation:
  """AdamW for fine-tuning with MAE's layer-wise lr decay.

  Scaling the whole AdamW update (decoupled decay included) by decay ** (depth + 1 - layer)
  equals MAE's per-group `lr_scale`, which multiplies the lr that torch's AdamW also applies to
  the decay term. trainable: optional bool tree; False leaves get no update (linear probing,
  where only the head trains and layer decay, 1 on the head, does not apply).
  """
  steps = adamw_steps(
    optim_config, schedule, weight_decay_mask(params, optim_config.weight_decay_on)
  )
  if optim_config.layer_decay < 1.0 and trainable is None:
    steps.append(scale_by_tree(layer_decay_scales(params, depth, optim_config.layer_decay)))
  tx = optax.chain(*steps)
  if trainable is not None:
    labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
  return tx
