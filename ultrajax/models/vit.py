"""Vision Transformer as MAE builds it (timm block layout, fixed 2-D sin-cos positions).

Parameter names mirror timm's `VisionTransformer` (patch_embed, cls_token, blocks.i.{norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm | fc_norm, head), so converting weights is a
rename plus transposes (ultrajax/interop/timm_vit.py). The model holds only `nnx.Param` state:
callers split it with `nnx.split(model, nnx.Param)` and merge inside their jitted functions.
Randomness (stochastic depth) comes in as an explicit `key`; key=None is deterministic.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import einops
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from ultrajax import configlib
from ultrajax.models import posemb
from ultrajax.train import sharding

# name -> (width, depth, heads)
VARIANTS = {
  "Ti": (192, 12, 3),
  "S": (384, 12, 6),
  "B": (768, 12, 12),
  "L": (1024, 24, 16),
  "H": (1280, 32, 16),
}
# Compute dtypes by config name (`model.dtype`); parameters stay float32.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
POOLS = ("cls", "gap", "none")
# "sincos": MAE's fixed table (cls position = zero row); "learned": timm's trained `pos_embed`
# [1, 1 + N, D] (cls position at row 0), as CLIP-style teachers have.
POS_EMBEDS = ("sincos", "learned")
ATTENTION_QUERIES = ("cls", "mean")
# "dot_product": jax.nn.dot_product_attention, with cuDNN's flash attention on a GPU where its
# checks accept the call (bf16/f16, head_dim a multiple of 8 up to 128, 256 on Hopper; JAX's
# default backend choice is XLA's attention everywhere), XLA's otherwise (TPU, float32), and the
# einsum path where the step is compiled for the CPU (XLA:CPU's lowering of it made the MAE-B/16
# step 5-7% slower; docs/benchmarks.md, 2026-12-02);
# "einsum": explicit q k^T softmax v with heads before tokens, the reference path.
ATTENTION_IMPLS = ("dot_product", "einsum")


def _weight_dots_saveable(prim, *avals, **params) -> bool:
  """Remat policy 'dots': save products without batch dimensions (the weight matmuls), also
  inside a custom VJP. The CPU path's `Linear` is one (`_dense`), and JAX's own
  dots_with_no_batch_dims_saveable sees only the custom_vjp_call there, so it recomputed
  every Linear as 'full' does."""
  if prim.name == "custom_vjp_call":
    primal = params.get("call_jaxpr")  # a ClosedJaxpr
    eqns = getattr(primal, "jaxpr", primal).eqns if primal is not None else ()
    return any(
      e.primitive.name == "dot_general" and not e.params["dimension_numbers"][1][0] for e in eqns
    )
  return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params)


# Activation recomputation per block in the backward pass: "none"; "dots" keeps the outputs of
# the weight matmuls (dots without batch dimensions: qkv, proj, fc1, fc2) and recomputes the rest
# (norms, GELU, the attention scores); "full" keeps only each block's input.
_REMAT_POLICIES = {
  "none": None,
  "dots": _weight_dots_saveable,
  "full": jax.checkpoint_policies.nothing_saveable,
}
REMATS = tuple(_REMAT_POLICIES)
# The model config fields that choose how the step is computed, with their defaults
# (`compute_options`); the pretraining, fine-tuning and SAM jobs read them alike.
COMPUTE_OPTIONS = {"remat": "none", "scan_layers": False, "attention_impl": "dot_product"}
LN_EPS = 1e-6

xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
token_init = nnx.initializers.normal(0.02)
# MAE's fine-tuning sets trunc_normal_(head.weight, std=2e-5) with bounds +-2 (absolute), which
# at that std is an untruncated normal.
head_init = nnx.initializers.normal(2e-5)
# MAE initialises the patch-embed conv "like nn.Linear": xavier over the [D, p*p*3] view, i.e.
# fan_in = p*p*3 and fan_out = D; Flax's conv default would count fan_out as p*p*D.
patch_kernel_init = nnx.initializers.variance_scaling(
  1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3
)


def parse_variant(variant: str) -> tuple[int, int, int, int]:
  """'B/16' -> (width, depth, heads, patch) = (768, 12, 12, 16)."""
  match = re.fullmatch(r"(Ti|S|B|L|H)/(\d+)", variant)
  if not match:
    raise ValueError(
      f"ViT variant {variant!r} is not '<{'|'.join(VARIANTS)}>/<patch size>', e.g. 'B/16'"
    )
  return (*VARIANTS[match.group(1)], int(match.group(2)))


def model_dims(model_config, where: str = "config.model") -> tuple[int, int, int, int]:
  """(width, depth, heads, patch) of a ViT config block: its `variant` ('B/16'), or, when that
  is '', its width / depth / num_heads / patch_size. `where` names the block in errors
  (ConfigError naming the field)."""
  variant = model_config.get("variant", "")
  if variant:
    try:
      return parse_variant(variant)
    except ValueError as e:
      raise configlib.ConfigError(f"{where}.variant: {e}") from None
  names = ("width", "depth", "num_heads", "patch_size")
  for name in names:
    value = model_config.get(name)
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
      raise configlib.ConfigError(
        f"{where}.{name}={value!r} must be a positive integer when {where}.variant is ''"
      )
  return tuple(model_config[name] for name in names)


def _on_cpu() -> bool:
  """Whether the step is traced for the CPU, where the backward passes written out below (and
  `cut_grad_fusion`) beat XLA's derived ones (docs/benchmarks.md); GPU/TPU keep JAX's own."""
  return sharding.compute_platform() == "cpu"


def fused_attention(q, k, v, bias=None):
  """q: [B, T, heads, head_dim], k, v: [B, S, heads, head_dim], bias: None or [B, heads, T, S]
  -> softmax(q k^T / sqrt(head_dim) + bias) v, [B, T, heads, head_dim].

  cuDNN's flash attention on a GPU for bf16/f16 inputs (`cudnn_attention`). JAX checks at trace
  time whether cuDNN takes the call (its version, the GPU, the head dim) and raises if not;
  then, and everywhere else, XLA's attention (jax.nn.dot_product_attention's default)."""
  if sharding.compute_platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
    try:
      return lanes_as_heads_attention(q, k, v, bias)
    except (NotImplementedError, RuntimeError, ValueError) as e:
      logging.log_first_n(logging.WARNING, "cuDNN attention refused (%s); XLA's instead", 1, e)
  return jax.nn.dot_product_attention(q, k, v, bias)


def cudnn_attention(q, k, v, bias=None, implementation: str | None = "cudnn"):
  """fused_attention's cuDNN call, q: [B, T, heads, head_dim], k, v: [B, S, heads, head_dim].
  Without a bias, an odd T or S is padded by one token, masked out by the sequence lengths, and
  the padded query row cut off. JAX (0.11) refuses odd lengths in training when there is a
  bias, and counts its own empty stand-in for a missing bias as one: every ViT at 224 px (197
  tokens) and MAE's decoder fell back to XLA's attention on an H200 (docs/benchmarks.md).
  `implementation`: jax.nn.dot_product_attention's (None, XLA's, for tests off a GPU)."""
  t, s = q.shape[1], k.shape[1]
  if bias is not None or not (t % 2 or s % 2):
    return jax.nn.dot_product_attention(q, k, v, bias, implementation=implementation)
  even = lambda x, n: jnp.pad(x, ((0, 0), (0, n % 2), (0, 0), (0, 0)))  # noqa: E731
  lengths = lambda n: jnp.full((q.shape[0],), n, jnp.int32)  # noqa: E731
  out = jax.nn.dot_product_attention(
    even(q, t),
    even(k, s),
    even(v, s),
    query_seq_lengths=lengths(t),
    key_value_seq_lengths=lengths(s),
    implementation=implementation,
  )
  return out[:, :t]


def _lanes_into_heads(x, axis: int):
  """x [L, ...] -> the L vmapped lanes folded into the heads axis `axis` of x[0]: [..., L*H, ...]."""
  x = jnp.moveaxis(x, 0, axis)
  return x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2 :])


def _heads_into_lanes(x, axis: int, lanes: int):
  """_lanes_into_heads' inverse: [..., L*H, ...] -> [L, ..., H, ...]."""
  return jnp.moveaxis(x.reshape(*x.shape[:axis], lanes, -1, *x.shape[axis + 1 :]), axis, 0)


def _vmap_as_heads(fn, heads_axes: tuple[int, ...]):
  """fn(*arrays) -> tuple of arrays, heads at heads_axes (arguments, then results, None for a
  missing argument), with a vmap rule that folds the vmapped axis into the heads. Heads are
  independent, so fn on L*H heads is fn on each lane. JAX's own vmap of cuDNN's attention folds
  the lanes into the batch axis instead: a reshape that a batch sharded over devices cannot
  follow, and JAX's partitioner for the cuDNN call then failed to compile (the paper preset,
  5 lanes of batch 64 on 8 devices, compiled for H200s; docs/benchmarks.md)."""
  fn = jax.custom_batching.custom_vmap(fn)

  @fn.def_vmap
  def rule(lanes, in_batched, *args):
    merged = [
      None
      if a is None
      else _lanes_into_heads(a if b else jnp.broadcast_to(a, (lanes, *a.shape)), ax)
      for a, b, ax in zip(args, in_batched, heads_axes)
    ]
    outs = fn(*merged)
    out_axes = heads_axes[len(args) :]
    split = tuple(
      None if o is None else _heads_into_lanes(o, ax, lanes) for o, ax in zip(outs, out_axes)
    )
    return split, tuple(None if o is None else True for o in outs)

  return fn


_cudnn_forward = _vmap_as_heads(
  lambda q, k, v, bias: (cudnn_attention(q, k, v, bias),), (2, 2, 2, 1, 2)
)
_cudnn_backward = _vmap_as_heads(
  lambda q, k, v, bias, g: jax.vjp(cudnn_attention, q, k, v, bias)[1](g),
  (2, 2, 2, 1, 2, 2, 2, 2, 1),
)


@jax.custom_vjp
def lanes_as_heads_attention(q, k, v, bias=None):
  """cudnn_attention, q: [B, T, heads, head_dim], whose vmap (the round's lanes) folds the lanes
  into the heads (`_vmap_as_heads`). The backward recomputes the forward (cuDNN's, about 1% of
  the MAE-B step's FLOPs), so JAX's training-only checks of the cuDNN call run when the
  gradient is traced, outside fused_attention's fallback."""
  return _cudnn_forward(q, k, v, bias)[0]


lanes_as_heads_attention.defvjp(
  lambda q, k, v, bias=None: (lanes_as_heads_attention(q, k, v, bias), (q, k, v, bias)),
  lambda res, g: _cudnn_backward(*res, g),
)


def einsum_attention(q, k, v):
  """q: [B, T, heads, head_dim], k, v: [B, S, heads, head_dim] -> softmax(q k^T / sqrt(head_dim))
  v, [B, T, heads, head_dim]: fused_attention's layout and result with explicit products, the
  scores and softmax in float32 (attention_impl='einsum', where the fused kernel is not wanted)."""
  scores = attention_scores("bqhd,bkhd->bhqk", q * q.shape[-1] ** -0.5, k)
  return jnp.einsum("bhqk,bkhd->bqhd", softmax(scores).astype(v.dtype), v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attention_scores(spec: str, q, k):
  """einsum(spec, q, k) accumulated and returned in float32: attention scores, spec e.g.
  'bhqd,bhkd->bhqk'. The backward rounds the scores' gradient to q's dtype before its two
  products, as flash attention does. JAX's own transpose would multiply the float32 gradient
  by a bfloat16 q or k: a float32 product, the only one left in the bfloat16 MAE step
  (perf.matmul_flops_by_dtype), which an accelerator runs far below its bf16 rate. In float32
  the backward is JAX's own."""
  return jnp.einsum(spec, q, k, preferred_element_type=jnp.float32)


def _attention_scores_bwd(spec: str, qk, g):
  q, k = qk
  g = g.astype(q.dtype)  # JAX's transposes of the products, in q's dtype
  (dq,) = jax.linear_transpose(lambda a: jnp.einsum(spec, a, k), q)(g)
  (dk,) = jax.linear_transpose(lambda b: jnp.einsum(spec, q, b), k)(g)
  return dq, dk


attention_scores.defvjp(
  lambda spec, q, k: (attention_scores(spec, q, k), (q, k)), _attention_scores_bwd
)


def _matmul(a, b, contract: tuple[tuple[int, ...], tuple[int, ...]]):
  """dot_general of a and b over the `contract` axes, accumulated and returned in float32.
  XLA:CPU hands a bfloat16 product to YNNPACK's bf16 kernels only when it returns float32;
  otherwise it converts both operands to float32 first (half the speed, docs/benchmarks.md)."""
  return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _kernel_grad(x, g):
  """x [..., in], g [..., out] -> the sum over the leading axes of x^T g, [in, out] in float32.
  In float32, as (g^T x)^T over [rows, d] views: an Eigen dot, which XLA:CPU runs beside the
  thunks that follow (YNNPACK's, synchronous, made the MAE step slower). In bfloat16 Eigen runs
  at about half YNNPACK's speed, and XLA:CPU gives a product over the rows to YNNPACK only as a
  contraction of two or more leading axes, after a transposed copy: x's own leading axes when it
  has two or more (a [B, L, d] activation), else [rows / 2, 2, d] views when rows is even. A
  [rows / 2, 2, d] view of a [B, L, d] activation made that copy 10-20x slower
  (docs/benchmarks.md, stop 38)."""
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  if x.dtype == jnp.float32:
    return (g2.T @ x2).T
  if x.ndim >= 3:
    lead = tuple(range(x.ndim - 1))
    return _matmul(x, g, (lead, lead))
  if x2.shape[0] % 2:
    return _matmul(x2, g2, ((0,), (0,)))
  split = lambda a: a.reshape(a.shape[0] // 2, 2, a.shape[1])  # noqa: E731
  return _matmul(split(x2), split(g2), ((0, 1), (0, 1)))


@jax.custom_vjp
def _dense(x, kernel, bias):
  """x [..., in] (the compute dtype) @ kernel [in, out] + bias [out] (the parameters' dtype):
  the product in x's dtype with float32 accumulation, the bias added in float32, x's dtype out."""
  y = _matmul(x, kernel.astype(x.dtype), ((x.ndim - 1,), (0,)))
  return (y + bias).astype(x.dtype)


def _dense_fwd(x, kernel, bias):
  return _dense(x, kernel, bias), (x, kernel, bias)


def _dense_bwd(res, g):
  # JAX's own transpose of x @ W left the kernel's gradient to Eigen after a transposed copy of
  # the activations (the MAE step 5-7% slower in float32); in bfloat16 it ran all three
  # products in float32 (the step 36% slower, docs/benchmarks.md).
  x, kernel, bias = res
  dx = _matmul(g, kernel.astype(g.dtype), ((g.ndim - 1,), (1,))).astype(x.dtype)
  dkernel = _kernel_grad(x, g).astype(kernel.dtype)
  dbias = g.reshape(-1, g.shape[-1]).astype(jnp.float32).sum(0)
  return dx, dkernel, dbias.astype(bias.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


class Linear(nnx.Linear):
  """nnx.Linear (same parameters); on the CPU it is `_dense`: the backward written out, and in
  bfloat16 the products return float32 and the output is rounded once (flax rounds the product,
  then adds a bf16 bias)."""

  def __call__(self, x):
    if sharding.compute_platform() == "gpu" and x.ndim > 2:
      # One contracting dimension in the kernel's gradient: under the round's vmap over lanes,
      # XLA:GPU transposes the activations or the gradient before a batched product that
      # contracts two (batch, tokens): 1.7 ms of the paper preset's 42.3 ms step, compiled for an
      # H200 (docs/benchmarks.md, stop 50). Merging leading dimensions is free.
      return super().__call__(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
    if self.bias is None or not _on_cpu():
      return super().__call__(x)
    # Only x takes flax's promoted dtype here: the kernel is cast inside `_dense`, so that its
    # gradient comes back in float32 without a round trip through the compute dtype.
    x, _ = self.promote_dtype((x, self.kernel[...]), dtype=self.dtype)
    return _dense(x, self.kernel[...], self.bias[...])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, eps: float):
  """LayerNorm over the last axis in float32 (two-pass variance); x's dtype out."""
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
  inv = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
  xhat = centred * inv
  return (xhat * scale + bias).astype(x.dtype), (xhat, inv, scale)


def _layer_norm_bwd(eps, res, g):
  xhat, inv, scale = res
  dtype, g = g.dtype, g.astype(xhat.dtype)  # the cotangent has x's dtype
  rows = tuple(range(g.ndim - 1))
  gx = g * scale
  dx = inv * (gx - jnp.mean(gx, -1, keepdims=True) - xhat * jnp.mean(gx * xhat, -1, keepdims=True))
  return dx.astype(dtype), jnp.sum(g * xhat, rows), jnp.sum(g, rows)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.LayerNorm):
  """nnx.LayerNorm (same parameters) whose backward on the CPU is written out (`_layer_norm`):
  the MAE step 2-5% faster than with the backward XLA derives."""

  def __call__(self, x, *, mask=None):
    if mask is not None or self.scale is None or self.bias is None or not _on_cpu():
      return super().__call__(x, mask=mask)
    y = _layer_norm(x, self.scale[...], self.bias[...], self.epsilon)
    return y.astype(self.dtype or x.dtype)


def linear(
  din: int, dout: int, *, dtype, rngs: nnx.Rngs, use_bias: bool = True, kernel_init=xavier_uniform
) -> Linear:
  """MAE's nn.Linear init (xavier-uniform kernel, zero bias); float32 params, `dtype` compute."""
  return Linear(
    din,
    dout,
    use_bias=use_bias,
    kernel_init=kernel_init,
    bias_init=zeros,
    dtype=dtype,
    param_dtype=jnp.float32,
    rngs=rngs,
  )


def layer_norm(dim: int, *, dtype, rngs: nnx.Rngs, eps: float = LN_EPS) -> LayerNorm:
  """LayerNorm, ones/zeros init. Statistics in float32 at least; the two-pass variance matches
  torch instead of E[x^2] - E[x]^2, which cancels badly."""
  return LayerNorm(
    dim, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, rngs=rngs
  )


def conv(
  din: int,
  dout: int,
  kernel: int,
  *,
  dtype,
  rngs: nnx.Rngs,
  stride: int = 1,
  padding="VALID",
  use_bias: bool = True,
  kernel_init=nnx.initializers.lecun_normal(),  # nnx.Conv's default
) -> nnx.Conv:
  """A kernel x kernel convolution, zero bias; float32 params, `dtype` compute."""
  return nnx.Conv(
    din,
    dout,
    (kernel, kernel),
    strides=stride,
    padding=padding,
    use_bias=use_bias,
    kernel_init=kernel_init,
    bias_init=zeros,
    dtype=dtype,
    param_dtype=jnp.float32,
    rngs=rngs,
  )


def patch_embedding(
  width: int, patch_size: int, *, dtype, rngs: nnx.Rngs, use_bias: bool = True
) -> nnx.Conv:
  """A p x p convolution of stride p from RGB to `width`. Zero bias like every other bias (MAE
  leaves torch's default U(+-1/sqrt(p*p*3)) here)."""
  return conv(
    3,
    width,
    patch_size,
    stride=patch_size,
    use_bias=use_bias,
    kernel_init=patch_kernel_init,
    dtype=dtype,
    rngs=rngs,
  )


def check_images(images, image_size: int, model: str) -> None:
  """ValueError naming `model` unless images are [B, image_size, image_size, 3]."""
  if tuple(images.shape[1:]) != (image_size, image_size, 3):
    raise ValueError(
      f"{model} expects images [B, {image_size}, {image_size}, 3], got {tuple(images.shape)}"
    )


def drop_path(x, rate, key):
  """Stochastic depth on a residual branch x: [B, ...]: drops whole samples, rescales the rest.

  key=None or a Python rate of 0 -> identity (evaluation). rate may be traced (scan over layers).
  """
  if key is None or (isinstance(rate, (int, float)) and rate == 0.0):
    return x
  keep = 1.0 - rate
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  mask = jax.random.bernoulli(key, keep, shape)
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


@jax.custom_vjp
def cut_grad_fusion(x):
  """Identity whose cotangent XLA must materialise: a speed device for XLA:CPU, no math.

  In the backward pass of a pre-norm residual stack, XLA:CPU fuses each block's residual
  gradient (the sum of every later LayerNorm's backward) into all of its consumers and
  recomputes the whole chain in each, so the elementwise work grows with depth squared. It
  drops optimization barriers, but a loop's carry is always materialised, so the cotangent
  passes through a `lax.while_loop` whose trip count XLA cannot fold: zero, or, when the
  cotangent starts with a NaN, one iteration of g + 0 * g (not an identity, which JAX and XLA
  would hoist out of the loop; it keeps finite values and turns infinities into NaN in a
  gradient that is NaN already). A loop, not a `lax.cond`: under `vmap` (the round's lanes) a
  cond with a batched predicate becomes a fusible select.
  """
  return x


cut_grad_fusion.defvjp(lambda x: (x, None), lambda _, g: (_materialise(g),))


@jax.custom_vjp
def _materialise(g):
  """g through the loop of `cut_grad_fusion`. Its own derivative is the same loop, so a
  gradient of a gradient (the privacy audit's inversion attack) differentiates through it:
  JAX cannot reverse-differentiate a while_loop with a dynamic trip count."""
  start = (g, jnp.isnan(g.reshape(-1)[0]))
  g, _ = jax.lax.while_loop(lambda c: c[1], lambda c: (c[0] + 0 * c[0], jnp.zeros((), bool)), start)
  return g


_materialise.defvjp(lambda g: (_materialise(g), None), lambda _, ct: (_materialise(ct),))


@jax.custom_vjp
def softmax(x):
  """Softmax over the last axis, whose backward is written from the probabilities alone:
  p (g - sum(g p)). jax.nn.softmax's derived backward made the MAE step 3-4% slower on XLA:CPU
  (docs/benchmarks.md, 2026-12-02). Reverse mode only, to any order."""
  e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
  return e / jnp.sum(e, axis=-1, keepdims=True)


def _softmax_fwd(x):
  p = softmax(x)
  return p, p


softmax.defvjp(_softmax_fwd, lambda p, g: (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),))


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection (timm layout: 3 x heads x head_dim)."""

  def __init__(self, dim: int, num_heads: int, *, dtype, rngs: nnx.Rngs, impl: str = "dot_product"):
    if dim % num_heads:
      raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
    if impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention impl={impl!r} is not one of {ATTENTION_IMPLS}")
    self.num_heads, self.impl = num_heads, impl
    self.qkv = linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.proj = linear(dim, dim, dtype=dtype, rngs=rngs)

  def _qkv(self, x, heads_first: bool = True):
    """x: [B, N, D] -> q, k, v, each [B, heads, N, head_dim] (heads_first) or [B, N, heads,
    head_dim] (the layout jax.nn.dot_product_attention takes)."""
    to = "b h n d" if heads_first else "b n h d"
    # Split, then rearrange: the split's backward is one concatenation, where indexing a
    # [3, ...] rearrangement's is three pads and their sum (3-5% of the MAE step on XLA:CPU).
    qkv = jnp.split(self.qkv(x), 3, axis=-1)
    return [einops.rearrange(t, f"b n (h d) -> {to}", h=self.num_heads) for t in qkv]

  def __call__(self, x):
    """x: [B, N, D] -> [B, N, D]."""
    if self.impl == "dot_product" and not _on_cpu():
      out = fused_attention(*self._qkv(x, heads_first=False))  # scale as timm
      return self.proj(einops.rearrange(out, "b n h d -> b n (h d)"))
    q, k, v = self._qkv(x)
    # Scores and softmax in float32 (the fused path also accumulates them in float32); the
    # scale on q (timm's order), not on the [N, N] scores.
    scores = attention_scores("bhqd,bhkd->bhqk", q * q.shape[-1] ** -0.5, k)
    out = jnp.einsum("bhqk,bhkd->bhqd", softmax(scores).astype(v.dtype), v)
    return self.proj(einops.rearrange(out, "b h n d -> b n (h d)"))

  def weights(self, x):
    """x: [B, N, D] -> attention probabilities [B, heads, N (queries), N (keys)] float32.

    softmax over keys of q k^T / sqrt(head_dim), the weights `__call__` applies to v (computed
    apart, for figures: the fused attention never materialises them)."""
    q, k, _ = self._qkv(x)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    return jax.nn.softmax(logits / np.sqrt(q.shape[-1]), axis=-1)


def gelu(x):
  """Exact GELU, x (1 + erf(x / sqrt 2)) / 2, as torch nn.GELU() (JAX defaults to tanh).

  Written with erf: jax.nn.gelu(approximate=False) goes through erfc, whose forward and backward
  XLA:CPU runs about 3x slower (docs/benchmarks.md, 2026-12-02); the two agree to float32
  rounding."""
  return 0.5 * x * (1 + jax.lax.erf(x * 0.7071067811865476))


class Mlp(nnx.Module):
  """fc1 -> exact GELU -> fc2 (timm's Mlp with nn.GELU)."""

  def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.fc1 = linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = linear(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    """x: [B, N, D] -> [B, N, D]."""
    return self.fc2(gelu(self.fc1(x)))


class Block(nnx.Module):
  """Pre-norm transformer block: x + DropPath(attn(norm1 x)), then x + DropPath(mlp(norm2 x))."""

  def __init__(
    self,
    dim: int,
    num_heads: int,
    *,
    mlp_ratio: float = 4.0,
    drop_path_rate: float = 0.0,
    dtype=jnp.float32,
    attention_impl: str = "dot_product",
    cut_grad_fusion: bool | None = None,
    rngs: nnx.Rngs,
  ):
    self.drop_path_rate = float(drop_path_rate)
    # None: on where the step is compiled for the CPU (see `cut_grad_fusion`; measured in
    # docs/benchmarks.md), off on GPU/TPU, whose fusion the cut would only constrain.
    self.cut_grad_fusion = cut_grad_fusion
    self.norm1 = layer_norm(dim, dtype=dtype, rngs=rngs)
    self.attn = Attention(dim, num_heads, dtype=dtype, impl=attention_impl, rngs=rngs)
    self.norm2 = layer_norm(dim, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)

  def __call__(self, x, key=None, rate=None):
    """x: [B, N, D] -> [B, N, D]; key: stochastic depth (None = deterministic); rate overrides
    the block's drop-path rate (a traced value when the blocks are scanned)."""
    rate = self.drop_path_rate if rate is None else rate
    k1, k2 = (None, None) if key is None else jax.random.split(key)
    cut = self.cut_grad_fusion
    cut = _on_cpu() if cut is None else cut
    cut = cut_grad_fusion if cut else lambda x: x
    x = cut(x)
    x = x + drop_path(self.attn(self.norm1(x)), rate, k1)
    x = cut(x)
    return x + drop_path(self.mlp(self.norm2(x)), rate, k2)


def remat_mode(remat) -> str:
  """remat field -> one of REMATS; booleans (older configs, SAM) mean 'full' / 'none'."""
  if isinstance(remat, bool):
    return "full" if remat else "none"
  if remat not in REMATS:
    raise ValueError(f"remat={remat!r} is not one of {REMATS} (or a bool)")
  return remat


def compute_options(model_config, path: str, names=COMPUTE_OPTIONS) -> dict:
  """The compute options `names` of a model config block, defaulted and checked: remat (one of
  REMATS, or a bool), scan_layers (a bool), attention_impl (one of ATTENTION_IMPLS). None of them
  changes the parameters or the math. A bad value raises ConfigError naming `path`.field."""
  checks = {
    "remat": (lambda v: isinstance(v, bool) or v in REMATS, f"one of {REMATS} or a bool"),
    "scan_layers": (lambda v: isinstance(v, bool), "True or False"),
    "attention_impl": (lambda v: v in ATTENTION_IMPLS, f"one of {ATTENTION_IMPLS}"),
  }
  options = {}
  for name in names:
    value = model_config.get(name, COMPUTE_OPTIONS[name])
    ok, what = checks[name]
    if not ok(value):
      raise configlib.ConfigError(f"{path}.{name}={value!r} must be {what}")
    options[name] = value
  return options


def shard_activations(x):
  """x: [B, ...] -> x constrained to batch over the mesh's 'data' axis, the rest replicated.

  Without the constraint XLA's propagation may follow an `fsdp`-split kernel into the
  activations (split along embed) and all-gather them again at every layer. A no-op outside a
  mesh context (jax.set_mesh), on a 1-way 'data' axis, or when it does not divide B.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "data" not in mesh.axis_names:
    return x
  n = mesh.shape["data"]
  if n == 1 or x.shape[0] % n:
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec("data"))


def _checkpointed(fn, remat: str):
  """fn wrapped in jax.checkpoint with the policy `remat` names ('none': fn itself)."""
  return fn if remat == "none" else jax.checkpoint(fn, policy=_REMAT_POLICIES[remat])


def _apply_block(graphdef, state, x, key, rate=None):
  return nnx.merge(graphdef, state)(x, key, rate)


def run_blocks(
  blocks: Sequence[Block],
  x,
  key,
  *,
  remat=False,
  collect: Sequence[int] = (),
  scan: bool = False,
  period: int = 1,
):
  """Applies blocks in order. x: [B, N, D] -> (x, outputs of the 1-based blocks in `collect`).

  key=None is deterministic, otherwise it is split once per block. remat ('none' | 'dots' |
  'full', or a bool) recomputes each block's activations in the backward pass (jax.checkpoint
  over the block's split state, so it stays a plain JAX transform under the functional
  boundary). scan stacks the blocks' parameters at this boundary and runs one lax.scan over
  them: one block is compiled instead of `len(blocks)`, and the parameters keep their per-block
  names (blocks.i.*) for checkpoints and interop. With period p the scan steps over groups of p
  consecutive blocks (SAM's windowed, windowed, global pattern): blocks i and i + p must differ
  only in their drop-path rate, and p must divide len(blocks). The math is that of the loop.
  Inside a mesh, x stays batch-split over 'data' at every block boundary (shard_activations).
  """
  remat = remat_mode(remat)
  if not blocks:
    return x, []
  keys = None if key is None else jax.random.split(key, len(blocks))
  x = shard_activations(x)
  if scan:
    return _scan_blocks(blocks, x, keys, remat, collect, period)
  keys = [None] * len(blocks) if keys is None else list(keys)
  outputs = []
  for i, (block, block_key) in enumerate(zip(blocks, keys), start=1):
    if remat != "none":
      graphdef, state = nnx.split(block)
      x = _checkpointed(functools.partial(_apply_block, graphdef), remat)(state, x, block_key)
    else:
      x = block(x, block_key)
    x = shard_activations(x)
    if i in collect:
      outputs.append(x)
  return x, outputs


def _scan_blocks(blocks, x, keys, remat: str, collect, period: int):
  """run_blocks with scan=True: one scan step per group of `period` blocks. Blocks at the same
  place in their groups differ only in their drop-path rate (a static attribute), which the
  scan carries as data; the first group's graphs serve for all."""
  if period < 1 or len(blocks) % period:
    raise ValueError(f"scan period {period} does not divide the {len(blocks)} blocks")
  groups = len(blocks) // period
  graphdefs = [nnx.split(b)[0] for b in blocks[:period]]
  stack = lambda *leaves: jnp.stack(leaves)  # noqa: E731
  stacked = [
    jax.tree.map(stack, *[nnx.split(b)[1] for b in blocks[j::period]]) for j in range(period)
  ]
  rates = jnp.asarray([b.drop_path_rate for b in blocks], jnp.float32).reshape(groups, period)
  keys = None if keys is None else keys.reshape(groups, period, *keys.shape[1:])

  def step(x, group):
    states, group_keys, group_rates = group
    ys = []
    for j in range(period):
      block_key = None if group_keys is None else group_keys[j]
      x = shard_activations(_apply_block(graphdefs[j], states[j], x, block_key, group_rates[j]))
      ys.append(x if collect else None)
    return x, ys

  x, ys = jax.lax.scan(_checkpointed(step, remat), x, (stacked, keys, rates))
  return x, [ys[(i - 1) % period][(i - 1) // period] for i in sorted(set(collect))]


class ViT(nnx.Module):
  """ViT encoder / classifier with MAE's fixed sin-cos positions and timm parameter names.

  pool: 'cls'  -> final norm, cls token features [B, D];
        'gap'  -> mean of the patch tokens, then `fc_norm` (no final norm): MAE fine-tuning's
                  global_pool, timm's global_pool='avg';
        'none' -> every token after the final norm [B, 1 + N, D].
  num_classes > 0 adds a linear `head` on the pooled features ('cls' and 'gap' only).
  pos_embed: 'sincos' (default, fixed) or 'learned' (a `pos_embed` parameter, timm layout).
  Computation runs in `dtype` (bfloat16 for speed); parameters and outputs are float32.
  attention_impl: one of ATTENTION_IMPLS; remat: one of REMATS (or a bool: 'full' / 'none');
  scan_layers: one lax.scan over the blocks (see `run_blocks`). None of them changes the
  parameters or the math.
  """

  def __init__(
    self,
    *,
    width: int,
    depth: int,
    num_heads: int,
    patch_size: int,
    image_size: int,
    mlp_ratio: float = 4.0,
    pool: str = "cls",
    num_classes: int = 0,
    drop_path_rate: float = 0.0,
    dtype=jnp.float32,
    remat=False,
    pos_embed: str = "sincos",
    attention_impl: str = "dot_product",
    scan_layers: bool = False,
    rngs: nnx.Rngs,
  ):
    if pool not in POOLS:
      raise ValueError(f"pool={pool!r} is not one of {POOLS}")
    if pool == "none" and num_classes:
      raise ValueError("pool='none' returns tokens and cannot have a head (num_classes > 0)")
    if image_size % patch_size:
      raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
    if pos_embed not in POS_EMBEDS:
      raise ValueError(f"pos_embed={pos_embed!r} is not one of {POS_EMBEDS}")
    self.width, self.depth, self.patch_size, self.image_size = width, depth, patch_size, image_size
    self.pool, self.num_classes = pool, num_classes
    self.remat, self.scan_layers = remat_mode(remat), bool(scan_layers)
    self.grid = image_size // patch_size
    self.patch_embed = patch_embedding(width, patch_size, dtype=dtype, rngs=rngs)
    self.cls_token = nnx.Param(token_init(rngs.params(), (1, 1, width), jnp.float32))
    # Stochastic depth rate grows linearly over the blocks, as timm/MAE: 0 ... drop_path_rate.
    rates = np.linspace(0.0, drop_path_rate, depth)
    block_args = dict(mlp_ratio=mlp_ratio, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
    self.blocks = nnx.List(
      [Block(width, num_heads, drop_path_rate=rate, **block_args) for rate in rates]
    )
    if pool == "gap":
      self.fc_norm = layer_norm(width, dtype=dtype, rngs=rngs)
    else:
      self.norm = layer_norm(width, dtype=dtype, rngs=rngs)
    if num_classes:
      self.head = linear(width, num_classes, kernel_init=head_init, dtype=dtype, rngs=rngs)
    self.learned_pos = pos_embed == "learned"
    if self.learned_pos:  # created last, so the sin-cos model's init stream is unchanged
      self.pos_embed = nnx.Param(
        token_init(rngs.params(), (1, 1 + self.grid * self.grid, width), jnp.float32)
      )

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid

  def embed(self, images):
    """images: [B, H, W, 3] (normalized) -> patch tokens + positions [B, N, D] in dtype."""
    check_images(images, self.image_size, "ViT")
    x = self._embed_patches(images)
    if self.learned_pos:
      return x + self.pos_embed[0, 1:].astype(x.dtype)
    pos = posemb.sincos_2d(self.grid, self.grid, self.width)
    return x + jnp.asarray(pos, x.dtype)

  def _embed_patches(self, images):
    """`patch_embed` (a p x p convolution of stride p) as one matmul over patchified pixels,
    with its parameters: images [B, H, W, 3] -> [B, N, D]. The same sums in another order;
    XLA:CPU compiles the convolution's weight gradient inside a loop (the round chunk's
    `lax.scan`) into a kernel 13x slower than outside one, a matmul's into the same dots."""
    conv, p = self.patch_embed, self.patch_size
    bias = None if conv.bias is None else conv.bias[...]  # open_clip's teacher has none
    x, kernel, bias = conv.promote_dtype((images, conv.kernel[...], bias), dtype=conv.dtype)
    x = einops.rearrange(x, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p)
    x = x @ kernel.reshape(-1, kernel.shape[-1])
    return x if bias is None else x + bias

  def tokens(self, images, visible_ids=None):
    """The first block's input: cls token + patch tokens with positions [B, 1 + N', D] in dtype.

    images: [B, H, W, 3]; visible_ids: [B, Nv] patch indices to keep (see `encode`)."""
    x = self.embed(images)
    if visible_ids is not None:
      x = jnp.take_along_axis(x, visible_ids[..., None], axis=1)
    # The cls token's position embedding is the zero row of MAE's table: nothing to add.
    cls = self.cls_token[...]
    if self.learned_pos:
      cls = cls + self.pos_embed[:, :1]
    cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.width))
    return jnp.concatenate([cls, x], axis=1)

  def attention(self, images, block: int = 0):
    """images: [B, H, W, 3] -> block `block`'s attention probabilities [B, heads, 1 + N, 1 + N]
    float32 (1-based; 0 = the last block), deterministic. Outputs and parameters are those of
    `encode`; only the weights that block applies are returned."""
    block = block or self.depth
    if not 1 <= block <= self.depth:
      raise ValueError(f"block {block} is outside 1..{self.depth}")
    x, _ = run_blocks(self.blocks[: block - 1], self.tokens(images), None, remat=False)
    last = self.blocks[block - 1]
    return last.attn.weights(last.norm1(x))

  def attention_maps(self, images, query: str = "cls", block: int = 0):
    """Per-head attention over the patch grid, as the papers draw it: [B, heads, grid, grid].

    query 'cls': the cls token's attention to every patch (DINO / UltraFedFM Figs. 7-8);
    'mean': the attention each patch receives, averaged over all query tokens (for 'gap'
    models, whose prediction pools every token). Patches only, so a row need not sum to 1.
    """
    if query not in ATTENTION_QUERIES:
      raise ValueError(f"query={query!r} is not one of {ATTENTION_QUERIES}")
    weights = self.attention(images, block)
    rows = weights[:, :, 0, 1:] if query == "cls" else weights[:, :, :, 1:].mean(axis=2)
    return rows.reshape(*rows.shape[:2], self.grid, self.grid)

  def encode(self, images, *, key=None, visible_ids=None, return_blocks: Sequence[int] = ()):
    """images: [B, H, W, 3] -> tokens [B, 1 + N', D] float32.

    visible_ids: [B, Nv] int, patch indices to keep (after the position embedding is added, as
      MAE's random_masking); N' = Nv, else N' = N.
    return_blocks: 1-based block indices, e.g. (4, 6, 8, 12); then returns (tokens, [outputs of
      those blocks before the final norm, each [B, 1 + N', D] float32]).
    The tokens come after the final norm, except for pool='gap', which has none (its norm,
    `fc_norm`, follows the pooling).
    """
    bad = [i for i in return_blocks if not 1 <= i <= self.depth]
    if bad:
      raise ValueError(f"return_blocks {bad} are outside 1..{self.depth}")
    x, outputs = run_blocks(
      self.blocks,
      self.tokens(images, visible_ids),
      key,
      remat=self.remat,
      collect=return_blocks,
      scan=self.scan_layers,
    )
    if self.pool != "gap":
      x = self.norm(x)
    x = x.astype(jnp.float32)
    if return_blocks:
      return x, [o.astype(jnp.float32) for o in outputs]
    return x

  def __call__(self, images, *, key=None):
    """images: [B, H, W, 3] -> features [B, D], logits [B, num_classes] or tokens [B, 1+N, D].

    key: stochastic depth; None = deterministic. Output float32.
    """
    feats = self.features(images, key=key)
    if self.num_classes:
      feats = self.head(feats).astype(jnp.float32)
    return feats

  def features(self, images, *, key=None):
    """images: [B, H, W, 3] -> what the head sees: pooled features [B, D] ('cls', 'gap') or
    tokens [B, 1 + N, D] ('none'), float32 (e.g. for t-SNE)."""
    x = self.encode(images, key=key)
    if self.pool == "none":
      return x
    feats = x[:, 0] if self.pool == "cls" else self.fc_norm(x[:, 1:].mean(axis=1))
    return feats.astype(jnp.float32)
