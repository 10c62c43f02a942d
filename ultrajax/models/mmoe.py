"""HeteroSync Learning's multi-gate mixture of experts (MMoE) over one encoder per task.

Layout of the official MMOE_ResNet18.py (research/seed_systems.md section 4.1), for T tasks
(HSL: T = 2, the node's primary task and the shared anchor task, SAT):
  f_t   = relu(fc_t(encoder_t(x_t)))                       [B, F]   F = 512, one encoder per task
  emb   = softmax(concat(f_1 .. f_T) / temperature)        [B, T*F] over the feature axis, T = 3
  e_k   = W2_k dropout(relu(W1_k emb + b1_k)) + b2_k       [B, O]   12 experts, 1024 -> 62 -> 32
  g_t   = softmax(gate_t(emb))                             [B, E]   over experts; no temperature
  z_t   = sum_k g_t,k e_k + down_t(f_t)                    [B, O]   residual 512 -> 32 projection
  y_t   = tower2_t(dropout(relu(tower1_t(z_t))))           [B]      logit; 32 -> 16 -> 1
The official towers end in a sigmoid trained with BCELoss; here they return logits for a
BCE-with-logits loss, the same objective computed stably. The temperature raises the entropy
of the shared representation (the paper's knowledge-distillation analogy): T -> inf gives a
uniform emb, T = 1 plain softmax.

Encoders: 'resnet18' (default, as the paper; models/resnet.py, BatchNorm state split as
described there) or 'vit' (models/vit.py with pool='gap', parameter state only).
Dropout draws from an explicit `key`; key=None is deterministic (evaluation).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ultrajax.models import resnet, vit

ENCODERS = ("resnet18", "vit")


def dropout(x, rate: float, key):
  """Inverted dropout; key=None or rate=0 -> identity."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def make_encoder(
  kind: str,
  *,
  image_size: int,
  resnet_width: int = 64,
  resnet_blocks: Sequence[int] = (2, 2, 2, 2),
  resnet_norm: str = "batch",
  resnet_stem: str = "imagenet",
  vit_width: int = 192,
  vit_depth: int = 12,
  vit_heads: int = 3,
  vit_patch: int = 16,
  remat="none",
  scan_layers: bool = False,
  attention_impl: str = "dot_product",
  dtype=jnp.float32,
  rngs: nnx.Rngs,
):
  """A feature extractor images [B, S, S, 3] -> [B, D] (ResNet-18 trunk or gap-pooled ViT).
  remat, scan_layers, attention_impl: the ViT's compute options (vit.ViT); the ResNet has none."""
  if kind == "resnet18":
    return resnet.ResNet(
      width=resnet_width,
      blocks=tuple(resnet_blocks),
      norm=resnet_norm,
      stem=resnet_stem,
      dtype=dtype,
      rngs=rngs,
    )
  if kind == "vit":
    return vit.ViT(
      width=vit_width,
      depth=vit_depth,
      num_heads=vit_heads,
      patch_size=vit_patch,
      image_size=image_size,
      pool="gap",
      remat=remat,
      scan_layers=scan_layers,
      attention_impl=attention_impl,
      dtype=dtype,
      rngs=rngs,
    )
  raise ValueError(f"encoder={kind!r} is not one of {ENCODERS}")


def encoder_dim(encoder) -> int:
  return encoder.num_features if isinstance(encoder, resnet.ResNet) else encoder.width


def run_encoder(encoder, images, train: bool):
  """images: [B, S, S, 3] -> [B, D] float32. Only ResNet has a training mode (BatchNorm)."""
  if isinstance(encoder, resnet.ResNet):
    return encoder(images, train=train)
  return encoder(images)


class MMoE(nnx.Module):
  """T encoders + the MMoE head above; __call__ maps T image batches to T logits."""

  def __init__(
    self,
    *,
    num_tasks: int = 2,
    encoder: str = "resnet18",
    image_size: int = 224,
    feature_dim: int = 512,
    num_experts: int = 12,
    expert_hidden: int = 62,
    expert_dim: int = 32,
    tower_hidden: int = 16,
    temperature: float = 3.0,
    expert_dropout: float = 0.3,
    tower_dropout: float = 0.4,
    encoder_kwargs: dict | None = None,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if num_tasks < 1 or num_experts < 1:
      raise ValueError(f"num_tasks={num_tasks} and num_experts={num_experts} must be >= 1")
    if not temperature > 0:
      raise ValueError(f"temperature={temperature!r} must be > 0")
    self.num_tasks, self.num_experts, self.temperature = num_tasks, num_experts, float(temperature)
    self.expert_dropout, self.tower_dropout = float(expert_dropout), float(tower_dropout)
    kwargs = dict(encoder_kwargs or {})
    self.encoders = nnx.List(
      [
        make_encoder(encoder, image_size=image_size, dtype=dtype, rngs=rngs, **kwargs)
        for _ in range(num_tasks)
      ]
    )
    lin = lambda i, o: vit.linear(i, o, dtype=dtype, rngs=rngs)
    self.fc = nnx.List([lin(encoder_dim(e), feature_dim) for e in self.encoders])
    self.down = nnx.List([lin(feature_dim, expert_dim) for _ in range(num_tasks)])
    d_in = num_tasks * feature_dim
    # Experts as stacked weights [E, ...]: one einsum instead of E small matmuls.
    init = lambda *shape: nnx.Param(
      jax.vmap(lambda k: vit.xavier_uniform(k, shape, jnp.float32))(
        jax.random.split(rngs.params(), num_experts)
      )
    )
    self.expert_w1 = init(d_in, expert_hidden)
    self.expert_b1 = nnx.Param(jnp.zeros((num_experts, expert_hidden), jnp.float32))
    self.expert_w2 = init(expert_hidden, expert_dim)
    self.expert_b2 = nnx.Param(jnp.zeros((num_experts, expert_dim), jnp.float32))
    self.gates = nnx.List([lin(d_in, num_experts) for _ in range(num_tasks)])
    self.tower1 = nnx.List([lin(expert_dim, tower_hidden) for _ in range(num_tasks)])
    self.tower2 = nnx.List([lin(tower_hidden, 1) for _ in range(num_tasks)])

  def features(self, images: Sequence, *, train: bool = False):
    """T batches [B, S, S, 3] -> T features f_t = relu(fc_t(encoder_t(x_t))), each [B, F]."""
    if len(images) != self.num_tasks:
      raise ValueError(f"MMoE with {self.num_tasks} tasks got {len(images)} image batches")
    return [
      jax.nn.relu(fc(run_encoder(enc, x, train)))
      for enc, fc, x in zip(self.encoders, self.fc, images)
    ]

  def head(self, feats: Sequence, *, key=None, internals: bool = False):
    """T features [B, F] -> logits [B, T]; with internals also a dict of emb [B, T*F],
    experts [B, E, O], gates [B, T, E] and task_features [B, T, O] (tower inputs)."""
    emb = jax.nn.softmax(jnp.concatenate(feats, axis=-1) / self.temperature, axis=-1)
    k_expert, *k_towers = (
      (None,) * (1 + self.num_tasks) if key is None else jax.random.split(key, 1 + self.num_tasks)
    )
    h = jax.nn.relu(jnp.einsum("bd,edh->beh", emb, self.expert_w1[...]) + self.expert_b1[...])
    h = dropout(h, self.expert_dropout, k_expert)
    experts = jnp.einsum("beh,eho->beo", h, self.expert_w2[...]) + self.expert_b2[...]
    gates, task_features, logits = [], [], []
    for t in range(self.num_tasks):
      g = jax.nn.softmax(self.gates[t](emb), axis=-1)
      z = jnp.einsum("be,beo->bo", g, experts) + self.down[t](feats[t])
      y = dropout(jax.nn.relu(self.tower1[t](z)), self.tower_dropout, k_towers[t])
      gates.append(g)
      task_features.append(z)
      logits.append(self.tower2[t](y)[:, 0])
    logits = jnp.stack(logits, axis=-1).astype(jnp.float32)
    if internals:
      return logits, dict(
        emb=emb,
        experts=experts,
        gates=jnp.stack(gates, 1),
        task_features=jnp.stack(task_features, 1),
      )
    return logits

  def __call__(self, images: Sequence, *, train: bool = False, key=None):
    """T image batches [B, S, S, 3] -> logits [B, T] (BCE-with-logits per task).

    train: BatchNorm batch statistics (ResNet encoders); key: dropout (None = off).
    """
    return self.head(self.features(images, train=train), key=key)


class Classifier(nnx.Module):
  """The single-task baseline of the paper's comparisons: one encoder + linear logit.

  __call__(images [B, S, S, 3]) -> logits [B, 1]; same encoders as MMoE.
  """

  def __init__(
    self,
    *,
    encoder: str = "resnet18",
    image_size: int = 224,
    encoder_kwargs: dict | None = None,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.encoder = make_encoder(
      encoder, image_size=image_size, dtype=dtype, rngs=rngs, **dict(encoder_kwargs or {})
    )
    self.fc = vit.linear(encoder_dim(self.encoder), 1, dtype=dtype, rngs=rngs)

  def __call__(self, images, *, train: bool = False, key=None):
    del key  # no dropout: the call signature matches MMoE's
    return self.fc(run_encoder(self.encoder, images, train)).astype(jnp.float32)


def split_classifier_tree(tree: dict, cut: int) -> tuple[dict, dict]:
  """A ResNet Classifier's state tree (params or BatchNorm statistics) -> (client part: the
  stem and layer1 .. layer{cut-1}, server part: the other stages and the logit), for split
  learning (SplitAVG). join_classifier_tree is its inverse."""
  client_keys = {"conv1", "bn1", *(f"layer{i}" for i in range(1, cut))}
  enc = tree.get("encoder", {})
  client = {"encoder": {k: v for k, v in enc.items() if k in client_keys}}
  server = {k: v for k, v in tree.items() if k != "encoder"}
  server["encoder"] = {k: v for k, v in enc.items() if k not in client_keys}
  return client, server


def join_classifier_tree(client: dict, server: dict) -> dict:
  return {**server, "encoder": {**client["encoder"], **server["encoder"]}}
