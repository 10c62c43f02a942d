"""Speed devices that must not change the math: vit.cut_grad_fusion in the blocks' backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ultrajax.models import mae, vit


def _tiny_mae(cut: bool | None) -> mae.MAE:
  model = mae.MAE(
    width=32,
    depth=1,
    num_heads=2,
    patch_size=8,
    image_size=16,
    decoder_width=32,
    decoder_depth=1,
    decoder_heads=2,
    rngs=nnx.Rngs(0),
  )
  for block in [*model.encoder.blocks, *model.decoder_blocks]:
    block.cut_grad_fusion = cut
  return model


def _loss_and_grads(cut: bool | None, images, mask):
  """MAE norm-pix loss and its gradients, for two clients' images at once under vmap (as the
  round's lanes run them)."""
  graphdef, params = nnx.split(_tiny_mae(cut), nnx.Param)

  def loss(params, images, mask):
    pred = nnx.merge(graphdef, params)(images, mask)
    return mae.mae_loss(pred, images, mask, 8)[0]

  step = jax.jit(jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0, 0)))
  compiled = step.lower(params, images, mask).compile()
  return compiled(params, images, mask), compiled.as_text()


def test_cut_grad_fusion_keeps_loss_and_gradients():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(2, 3, 16, 16, 3)), jnp.float32)
  mask = np.ones((2, 3, 4), bool)
  for lane in range(2):
    for row in range(3):
      mask[lane, row, rng.choice(4, 1)] = False  # len_keep = int(4 * 0.25) = 1
  # None: the default, on for the CPU backend the tests run on.
  (loss_cut, grads_cut), hlo_cut = _loss_and_grads(None, images, mask)
  (loss_plain, grads_plain), hlo_plain = _loss_and_grads(False, images, mask)
  # The cut is in the compiled program (a loop per block input and per block middle), even
  # under vmap, where a conditional would have become a select: at least 2 x 2 loops more than
  # the plain path (which has loops of its own where XLA:CPU's elemental emitters write a
  # scatter as one, as under the test session's XLA_FLAGS).
  assert hlo_cut.count(" while(") - hlo_plain.count(" while(") >= 2 * 2
  np.testing.assert_allclose(loss_cut, loss_plain, rtol=1e-6)
  for path, g in jax.tree_util.tree_leaves_with_path(grads_plain):
    cut = dict(jax.tree_util.tree_leaves_with_path(grads_cut))[path]
    np.testing.assert_allclose(cut, g, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_cut_grad_fusion_is_the_identity_forward_and_backward():
  x = jnp.asarray([[0.5, -1.0, jnp.inf], [2.0, 0.0, 3.0]])
  f = lambda x: jnp.sum(jnp.sin(x[:, :2]) * x[:, :2])
  np.testing.assert_array_equal(vit.cut_grad_fusion(x), x)
  np.testing.assert_array_equal(jax.grad(lambda x: f(vit.cut_grad_fusion(x)))(x), jax.grad(f)(x))
  # A cotangent starting with a NaN runs the loop once; its finite values come back unchanged.
  g = jnp.asarray([jnp.nan, 1.5, -2.0])
  _, vjp = jax.vjp(vit.cut_grad_fusion, jnp.zeros(3))
  out = vjp(g)[0]
  assert np.isnan(out[0]) and np.array_equal(out[1:], g[1:])


def test_cut_grad_fusion_has_a_second_derivative():
  """A gradient of a gradient (the audit's inversion attack) passes the cut: equal to the
  plain function's, computed by jax without the cut."""
  x = jnp.asarray([0.3, -1.2, 2.0])
  f = lambda x: jnp.sum(jnp.sin(x) * x**2)
  inner = lambda cut: lambda x: jnp.sum(jax.grad(lambda y: f(cut(y)))(x) ** 2)
  np.testing.assert_allclose(
    jax.grad(inner(vit.cut_grad_fusion))(x), jax.grad(inner(lambda y: y))(x), rtol=1e-6
  )


def test_patch_embedding_is_the_convolution():
  """ViT embeds patches with one matmul over patchified pixels (XLA:CPU compiles a convolution's
  weight gradient inside the round's scan into a far slower kernel): the same values and
  gradients as its `patch_embed` convolution, and no convolution left in a scanned step."""
  model = vit.ViT(width=8, depth=1, num_heads=2, patch_size=4, image_size=8, rngs=nnx.Rngs(0))
  model.patch_embed.bias[...] = jnp.linspace(-1.0, 1.0, 8)
  graphdef, params = nnx.split(model, nnx.Param)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8, 3)), jnp.float32)

  def by_conv(params, images):  # [B, 2, 2, D] in row-major patch order -> [B, 4, D]
    return nnx.merge(graphdef, params).patch_embed(images).reshape(3, 4, 8)

  def by_matmul(params, images):
    return nnx.merge(graphdef, params)._embed_patches(images)

  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4, 8)), jnp.float32)
  want, want_vjp = jax.vjp(by_conv, params, images)
  got, got_vjp = jax.vjp(by_matmul, params, images)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  for g, w in zip(jax.tree.leaves(got_vjp(cotangent)), jax.tree.leaves(want_vjp(cotangent))):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)

  def scanned(params, batches):
    grad = jax.grad(lambda p, x: jnp.sum(by_matmul(p, x) ** 2))
    return jax.lax.scan(
      lambda p, x: (jax.tree.map(jnp.subtract, p, grad(p, x)), None), params, batches
    )[0]

  hlo = jax.jit(scanned).lower(params, jnp.stack([images] * 2)).compile().as_text()
  assert "convolution(" not in hlo


def test_gelu_is_the_exact_gelu():
  """vit.gelu (the erf form) against x Phi(x) from scipy in float64, and its derivative against
  Phi(x) + x phi(x); it keeps bfloat16 inputs in bfloat16."""
  from scipy import stats

  x = np.linspace(-9.0, 9.0, 2001)
  value, grad = jax.vmap(jax.value_and_grad(vit.gelu))(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(value, x * stats.norm.cdf(x), rtol=2e-6, atol=2e-6)
  np.testing.assert_allclose(grad, stats.norm.cdf(x) + x * stats.norm.pdf(x), rtol=2e-6, atol=2e-6)
  assert vit.gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


def test_softmax_and_its_derivatives():
  """vit.softmax (hand-written backward) against jax.nn.softmax: values, the gradient and the
  gradient of a gradient (what the privacy audit's inversion attack takes)."""
  x = jax.random.normal(jax.random.key(0), (3, 4, 7)) * 4
  w = jax.random.normal(jax.random.key(1), (3, 4, 7))
  for_each = [vit.softmax, lambda x: jax.nn.softmax(x, axis=-1)]
  values = [fn(x) for fn in for_each]
  np.testing.assert_allclose(values[0], values[1], rtol=1e-6, atol=1e-7)
  grads = [jax.grad(lambda x, fn=fn: jnp.sum(jnp.sin(fn(x) * w)))(x) for fn in for_each]
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
  second = [
    jax.grad(lambda x, fn=fn: jnp.sum(jax.grad(lambda y: jnp.sum(jnp.sin(fn(y) * w)))(x) ** 2))(x)
    for fn in for_each
  ]
  np.testing.assert_allclose(second[0], second[1], rtol=1e-4, atol=1e-6)


def _value_grads(fn, module, x, second=False):
  """fn(module, x)'s sum-of-sines, its gradients wrt x and the module's params, and (second)
  the gradient wrt x of the squared gradient norm (a gradient of a gradient)."""
  graphdef, params = nnx.split(module, nnx.Param)

  def loss(p, x):
    return jnp.sum(jnp.sin(fn(nnx.merge(graphdef, p), x).astype(jnp.float32)))

  value, grads = jax.value_and_grad(loss, argnums=(0, 1))(params, x)
  if not second:
    return value, grads
  gg = jax.grad(lambda x: sum(jnp.sum(g**2) for g in jax.tree.leaves(jax.grad(loss)(params, x))))
  return value, grads, gg(x)


def test_linear_and_layer_norm_backward_equal_flax():
  """vit.Linear and vit.LayerNorm (the backward written out, taken on the CPU) against
  nnx.Linear / nnx.LayerNorm's own call on the same parameters: values, gradients wrt the
  input and every parameter, and a gradient of a gradient; float32 on 3-D and 2-D inputs,
  LayerNorm's bfloat16 compute within its rounding (Linear's bfloat16 rounds differently from
  flax's, on purpose: the next test)."""
  rngs = nnx.Rngs(0)
  x3 = jax.random.normal(jax.random.key(1), (2, 5, 12)) * 3 + 1
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):
    modules = [(vit.layer_norm(12, dtype=dtype, rngs=rngs), nnx.LayerNorm.__call__)]
    if dtype == jnp.float32:
      modules.append((vit.linear(12, 7, dtype=dtype, rngs=rngs), nnx.Linear.__call__))
    for module, flax_call in modules:
      # Non-trivial parameters: the init's zero bias / unit scale would hide mistakes.
      for i, name in enumerate(("kernel", "scale", "bias")):
        if (param := getattr(module, name, None)) is not None:
          param[...] = param[...] + jax.random.normal(jax.random.key(i), param[...].shape)
      for x in (x3, x3[0]):
        ours = _value_grads(lambda m, x: m(x), module, x, second=dtype == jnp.float32)
        theirs = _value_grads(flax_call, module, x, second=dtype == jnp.float32)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
          # atol scales with the leaf: the gradient of a gradient sums terms up to ~2e3 into
          # entries near 1, so float32 summation order alone moves those by ~1e-4.
          b = np.asarray(b, np.float32)
          scale = max(1.0, float(np.abs(b).max()))
          np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=tol, atol=tol * scale)
      assert module(x3).dtype == dtype


@pytest.mark.parametrize("rows", [(2, 5), (6,), (5,)])
def test_linear_bfloat16_products_accumulate_in_float32(rows):
  """vit.Linear in bfloat16 on the CPU against numpy on the same bf16-rounded operands: the
  output is (x @ W + b) computed in float32 and rounded once; the VJP's input gradient is
  g @ W^T rounded once, the kernel and bias gradients are float32 sums (no bf16 round trip).
  The kernel gradient's three forms (`vit._kernel_grad`): over x's leading axes ([2, 5, d]),
  over [rows / 2, 2, d] views (6 rows) and over one axis (an odd count, 5 rows)."""
  bf16 = jnp.bfloat16
  module = vit.linear(12, 7, dtype=bf16, rngs=nnx.Rngs(0))
  module.bias[...] = jax.random.normal(jax.random.key(0), (7,))
  graphdef, params = nnx.split(module, nnx.Param)
  x = (jax.random.normal(jax.random.key(1), (*rows, 12)) * 3 + 1).astype(bf16)
  y, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), params, x)
  g = jax.random.normal(jax.random.key(2), y.shape).astype(bf16)
  dparams, dx = vjp(g)

  f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
  round_bf16 = lambda a: f32(jnp.asarray(a, bf16))  # noqa: E731
  k = round_bf16(params["kernel"][...])
  x2, g2 = f32(x).reshape(-1, 12), f32(g).reshape(-1, 7)
  assert y.dtype == dx.dtype == bf16
  assert dparams["kernel"][...].dtype == dparams["bias"][...].dtype == jnp.float32
  # One bf16 rounding of a float32 result: within half a bf16 ulp (2^-8 relative) of numpy's
  # float32 value rounded the same way, up to float32 summation order.
  y_ref = round_bf16(x2 @ k + f32(params["bias"][...])).reshape(y.shape)
  np.testing.assert_allclose(f32(y), y_ref, rtol=2**-8, atol=1e-6)
  dx_ref = round_bf16(g2 @ k.T).reshape(x.shape)
  np.testing.assert_allclose(f32(dx), dx_ref, rtol=2**-8, atol=1e-6)
  np.testing.assert_allclose(f32(dparams["kernel"][...]), x2.T @ g2, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(f32(dparams["bias"][...]), g2.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cpu_path", [True, False])
def test_remat_dots_recomputes_only_the_batched_products(cpu_path, monkeypatch):
  """remat='dots' keeps the weight matmuls' outputs on the CPU path too, where `Linear` is a
  custom VJP that JAX's dots policy does not look into: the gradient's jaxpr recomputes only
  the attention products (q k^T, p v; batched over heads), by hand 2 x 2 t^2 w FLOPs per
  encoder block and image, where 'full' recomputes the whole forward."""
  from ultrajax.train import perf

  monkeypatch.setattr(vit, "_on_cpu", lambda: cpu_path)
  images = jnp.zeros((2, 16, 16, 3))
  ids = jnp.tile(jnp.arange(2), (2, 1))  # 2 of the 4 patches visible: 3 tokens with cls
  flops = {}
  for remat in ("none", "dots"):
    vit_model = vit.ViT(
      width=32, depth=2, num_heads=2, patch_size=8, image_size=16, remat=remat, rngs=nnx.Rngs(0)
    )
    graphdef, params = nnx.split(vit_model, nnx.Param)
    loss = lambda p: nnx.merge(graphdef, p).encode(images, visible_ids=ids).sum()  # noqa: B023
    flops[remat] = perf.matmul_flops(jax.make_jaxpr(jax.grad(loss))(params))
  attention = 2 * (2 * 3 * 3 * 32)  # q k^T and p v: 2 t^2 w multiply-adds, 2 FLOPs each
  assert flops["dots"] - flops["none"] == 2 * 2 * attention  # 2 blocks, 2 images
