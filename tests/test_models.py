"""ViT / MAE / sin-cos positions against independent references (numpy, MAE's formulas)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ultrajax import configlib
from ultrajax.configs import pretrain_fed
from ultrajax.models import layers, mae, posemb, vit

TINY = dict(width=64, depth=2, num_heads=4, patch_size=8, image_size=32)
TINY_DEC = dict(decoder_width=32, decoder_depth=2, decoder_heads=4)
N = 16  # (32 / 8) ** 2 patches


def _images(seed=0, b=2):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, 32, 32, 3)), jnp.float32)


def _mask(seed=0, b=2, n=N, keep=4):
  """Random MAE mask, True = masked, exactly `keep` visible patches per row."""
  rng = np.random.default_rng(seed)
  mask = np.ones((b, n), bool)
  for row in mask:
    row[rng.permutation(n)[:keep]] = False
  return mask


def _perturb(model, seed=0, scale=0.1):
  """Adds noise to every parameter so zero biases and unit norms are exercised too."""
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  nnx.update(
    model, jax.tree.map(lambda x: x + jnp.asarray(scale * rng.normal(size=x.shape), x.dtype), state)
  )
  return model


@pytest.fixture(scope="module")
def tiny_mae():
  return _perturb(mae.MAE(**TINY, **TINY_DEC, rngs=nnx.Rngs(0)))


# ----------------------------------------------------------------------------- sin-cos
def _official_mae_pos_embed(embed_dim, grid_size, cls_token=False):
  """Transcription of facebookresearch/mae util/pos_embed.py (the public reference formula)."""

  def one_d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float64)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
  emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
  return emb


@pytest.mark.parametrize("grid,dim,cls", [(4, 64, False), (14, 768, True), (7, 32, True)])
def test_sincos_matches_official_mae(grid, dim, cls):
  ours = posemb.sincos_2d(grid, grid, dim, cls_token=cls)
  ref = _official_mae_pos_embed(dim, grid, cls).astype(np.float32)
  assert ours.dtype == np.float32 and ours.shape == ((1 if cls else 0) + grid * grid, dim)
  np.testing.assert_array_equal(ours, ref)


def test_sincos_hand_checked_entries():
  h, w, d = 3, 5, 16
  emb = posemb.sincos_2d(h, w, d, cls_token=True)
  np.testing.assert_array_equal(emb[0], 0.0)  # cls row
  # Grid position (0, 0): sin 0 = 0 and cos 0 = 1 in both halves.
  np.testing.assert_array_equal(emb[1], [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4)
  omega = [10000 ** (-k / 4) for k in range(4)]
  for r, c in [(0, 1), (2, 3), (1, 4)]:
    row = emb[1 + r * w + c]  # raster order
    expected = (
      [math.sin(c * o) for o in omega]
      + [math.cos(c * o) for o in omega]
      + [math.sin(r * o) for o in omega]
      + [math.cos(r * o) for o in omega]
    )
    np.testing.assert_allclose(row, expected, atol=1e-6)


def test_sincos_translation_invariant_inner_products():
  emb = posemb.sincos_2d(6, 6, 64).astype(np.float64)
  at = lambda r, c: emb[r * 6 + c]  # noqa: E731
  # |e|^2 = D/2 (sin^2 + cos^2 per frequency) and e(p).e(q) depends only on p - q.
  np.testing.assert_allclose(np.sum(emb**2, axis=1), 32.0, rtol=1e-6)
  np.testing.assert_allclose(at(0, 0) @ at(1, 2), at(3, 2) @ at(4, 4), rtol=1e-5)
  assert at(0, 0) @ at(0, 1) > at(0, 0) @ at(0, 5)  # nearby positions are more similar


# ----------------------------------------------------------------------------- patchify / loss
def test_patchify_matches_loops_and_roundtrips():
  p, h, w, c = 4, 8, 12, 3
  x = np.random.default_rng(0).normal(size=(2, h, w, c)).astype(np.float32)
  ref = np.zeros((2, (h // p) * (w // p), p * p * c), np.float32)
  for b in range(2):
    for i in range(h // p):
      for j in range(w // p):
        n = i * (w // p) + j
        for pi in range(p):
          for qj in range(p):
            for ch in range(c):
              ref[b, n, (pi * p + qj) * c + ch] = x[b, i * p + pi, j * p + qj, ch]
  got = np.asarray(mae.patchify(jnp.asarray(x), p))
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(np.asarray(mae.unpatchify(got, p, h, w)), x)


def test_normalize():
  x = np.random.default_rng(0).uniform(size=(2, 4, 4, 3)).astype(np.float32)
  ref = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(np.asarray(mae.normalize(x)), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_matches_numpy(norm_pix):
  rng = np.random.default_rng(1)
  p = 8
  images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  pred = rng.normal(size=(3, N, p * p * 3)).astype(np.float32)
  mask = _mask(2, b=3, keep=5)
  target = np.asarray(mae.patchify(images, p)).astype(np.float64)
  if norm_pix:
    target = (target - target.mean(-1, keepdims=True)) / np.sqrt(
      target.var(-1, ddof=1, keepdims=True) + 1e-6
    )
  per_patch = ((pred - target) ** 2).mean(-1)
  ref_loss = (per_patch * mask).sum() / mask.sum()
  ref_per_image = (per_patch * mask).sum(1) / mask.sum(1)
  loss, per_image = mae.mae_loss(
    jnp.asarray(pred), jnp.asarray(images), jnp.asarray(mask), p, norm_pix=norm_pix
  )
  assert loss.dtype == jnp.float32 and per_image.shape == (3,)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(per_image), ref_per_image, rtol=1e-5)


# ----------------------------------------------------------------------------- MAE
def test_mae_pred_depends_only_on_visible_pixels(tiny_mae):
  images, mask = _images(), _mask()
  pred = tiny_mae(images, jnp.asarray(mask))
  assert pred.shape == (2, N, 8 * 8 * 3) and pred.dtype == jnp.float32
  pixel_mask = np.asarray(mae.unpatchify(np.repeat(mask[..., None], 8 * 8 * 3, -1), 8, 32, 32))
  noise = np.random.default_rng(5).normal(size=images.shape).astype(np.float32)
  hidden_changed = tiny_mae(images + 3.0 * noise * pixel_mask, jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(hidden_changed), np.asarray(pred), atol=1e-6)
  visible_changed = tiny_mae(images + 3.0 * noise * (1 - pixel_mask), jnp.asarray(mask))
  assert np.abs(np.asarray(visible_changed) - np.asarray(pred)).max() > 1e-2


def test_mae_decoder_places_tokens_like_an_explicit_loop(tiny_mae):
  """Reference un-shuffle: every masked position gets the mask token, visible position j gets
  the encoder output of j, built position by position."""
  m = tiny_mae
  images, mask = _images(1), _mask(3)
  pred = np.asarray(m(images, jnp.asarray(mask)))
  for b in range(2):
    visible = np.flatnonzero(~mask[b])
    latent = m.encoder.encode(images[b : b + 1], visible_ids=jnp.asarray(visible[None]))
    emb = np.asarray(m.decoder_embed(latent))[0]
    rows = [emb[0]]
    for j in range(N):
      rows.append(
        emb[1 + list(visible).index(j)] if j in visible else np.asarray(m.mask_token[...])[0, 0]
      )
    x = jnp.asarray(np.stack(rows)[None] + posemb.sincos_2d(4, 4, 32, cls_token=True)[None])
    for block in m.decoder_blocks:
      x = block(x)
    ref = np.asarray(m.decoder_pred(m.decoder_norm(x)))[0, 1:]
    np.testing.assert_allclose(pred[b], ref, atol=1e-5)


def test_mae_rejects_bad_masks(tiny_mae):
  images = _images()
  with pytest.raises(ValueError, match="len_keep=4"):
    tiny_mae(images, jnp.asarray(_mask(keep=5)))
  with pytest.raises(ValueError, match=r"\[B, 16\]"):
    tiny_mae(images, jnp.ones((2, 15), bool))


def test_mae_from_config_and_field_errors():
  # The smoke preset's model (ViT 64 x 2 at 32 px, patch 8; decoder 32 x 1), untyped as a
  # checkpoint's saved config is, so the loop below can set values of the wrong type.
  cfg = ml_collections.ConfigDict(pretrain_fed.get_config("smoke").model.to_dict(), type_safe=False)
  cfg.update(drop_path_rate=0.1, dtype="bfloat16")
  model = nnx.eval_shape(lambda: mae.mae_from_config(cfg, nnx.Rngs(0)))
  assert model.len_keep == 4 and model.encoder.width == 64 and model.remat == "none"
  assert model.decoder_pred.kernel.shape == (32, 8 * 8 * 3)
  b16 = cfg.copy_and_resolve_references()
  b16.update(variant="B/16", image_size=224, remat=True)
  big = nnx.eval_shape(lambda: mae.mae_from_config(b16, nnx.Rngs(0)))
  assert big.encoder.width == 768 and len(big.encoder.blocks) == 12 and big.remat == "full"
  for field, value in [
    ("variant", "Q/16"),
    ("dtype", "float16"),
    ("image_size", 30),
    ("decoder_width", 30),
    ("mask_ratio", 1.0),
    ("num_heads", 0),
    ("remat", "some"),
    ("scan_layers", "yes"),
    ("attention_impl", "flash"),
  ]:
    bad = cfg.copy_and_resolve_references()
    bad[field] = value
    with pytest.raises(configlib.ConfigError, match=rf"config\.model\.{field}"):
      mae.mae_from_config(bad, nnx.Rngs(0))


def test_parse_variant():
  assert vit.parse_variant("B/16") == (768, 12, 12, 16)
  assert vit.parse_variant("Ti/8") == (192, 12, 3, 8)
  for bad in ("B16", "X/16", "B/", "b/16"):
    with pytest.raises(ValueError, match=repr(bad).replace("/", ".")):
      vit.parse_variant(bad)


def test_model_dims_reads_the_variant_or_the_explicit_sizes():
  explicit = ml_collections.ConfigDict(
    dict(variant="", width=64, depth=2, num_heads=4, patch_size=8)
  )
  assert vit.model_dims(explicit) == (64, 2, 4, 8)
  named = ml_collections.ConfigDict(
    dict(variant="S/8", width=0, depth=0, num_heads=0, patch_size=0)
  )
  assert vit.model_dims(named) == (384, 12, 6, 8)  # the explicit sizes are ignored
  with pytest.raises(configlib.ConfigError, match=r"config\.teacher\.variant: ViT variant 'B16'"):
    vit.model_dims(ml_collections.ConfigDict(dict(variant="B16")), "config.teacher")
  explicit.depth = 0
  with pytest.raises(configlib.ConfigError, match=r"config\.model\.depth=0 must be a positive"):
    vit.model_dims(explicit)


# ----------------------------------------------------------------------------- ViT
def test_vit_pools_shapes_and_return_blocks():
  images = _images()
  for pool, classes, shape in [
    ("cls", 0, (2, 64)),
    ("gap", 0, (2, 64)),
    ("cls", 7, (2, 7)),
    ("gap", 7, (2, 7)),
    ("none", 0, (2, 1 + N, 64)),
  ]:
    model = vit.ViT(**TINY, pool=pool, num_classes=classes, rngs=nnx.Rngs(0))
    out = model(images)
    assert out.shape == shape and out.dtype == jnp.float32, pool
  model = _perturb(vit.ViT(**TINY, pool="cls", rngs=nnx.Rngs(0)))
  tokens, (b1, b2) = model.encode(images, return_blocks=(1, 2))
  assert b1.shape == b2.shape == tokens.shape == (2, 1 + N, 64)
  np.testing.assert_allclose(np.asarray(model.norm(b2)), np.asarray(tokens), atol=1e-6)
  np.testing.assert_allclose(np.asarray(model(images)), np.asarray(tokens[:, 0]), atol=1e-6)
  gap = _perturb(vit.ViT(**TINY, pool="gap", rngs=nnx.Rngs(0)))
  raw = gap.encode(images)  # no final norm for 'gap'
  np.testing.assert_allclose(
    np.asarray(gap(images)), np.asarray(gap.fc_norm(raw[:, 1:].mean(1))), atol=1e-6
  )
  with pytest.raises(ValueError, match="outside 1..2"):
    model.encode(images, return_blocks=(3,))
  # visible_ids gathers tokens after their positions are added (any order), as MAE does.
  ids = np.array([[5, 0, 9], [15, 3, 4]])
  embedded = np.asarray(model.embed(images))
  x = np.concatenate(
    [
      np.broadcast_to(np.asarray(model.cls_token[...]), (2, 1, 64)),
      np.stack([embedded[b, ids[b]] for b in range(2)]),
    ],
    axis=1,
  )
  x = jnp.asarray(x)
  for block in model.blocks:
    x = block(x)
  np.testing.assert_allclose(
    np.asarray(model.encode(images, visible_ids=jnp.asarray(ids))),
    np.asarray(model.norm(x)),
    atol=1e-5,
  )
  # Keeping every patch in order is the same as no masking.
  np.testing.assert_allclose(
    np.asarray(model.encode(images, visible_ids=jnp.tile(jnp.arange(N), (2, 1)))),
    np.asarray(tokens),
    atol=1e-6,
  )


def test_vit_init_like_mae():
  model = vit.ViT(**TINY, num_classes=5, rngs=nnx.Rngs(0))
  # Patch-embed kernel: xavier over the [p*p*3, D] view, bound sqrt(6 / (192 + 64)).
  kernel = np.asarray(model.patch_embed.kernel[...])
  bound = math.sqrt(6 / (8 * 8 * 3 + 64))
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
  qkv = np.asarray(model.blocks[0].attn.qkv.kernel[...])
  qkv_bound = math.sqrt(6 / (64 + 192))
  assert np.abs(qkv).max() <= qkv_bound and np.abs(qkv).max() > 0.95 * qkv_bound
  assert not np.any(np.asarray(model.blocks[0].mlp.fc1.bias[...]))
  np.testing.assert_array_equal(np.asarray(model.blocks[1].norm2.scale[...]), 1.0)
  assert 0.01 < np.asarray(model.cls_token[...]).std() < 0.03
  assert np.abs(np.asarray(model.head.kernel[...])).max() < 2e-4  # std 2e-5


def test_drop_path():
  images = _images()
  model = vit.ViT(**TINY, drop_path_rate=0.5, rngs=nnx.Rngs(0))
  det = np.asarray(model(images))
  np.testing.assert_array_equal(np.asarray(model(images)), det)
  a = np.asarray(model(images, key=jax.random.key(1)))
  b = np.asarray(model(images, key=jax.random.key(2)))
  assert np.abs(a - det).max() > 1e-3 and np.abs(a - b).max() > 1e-3
  no_drop = vit.ViT(**TINY, drop_path_rate=0.0, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(
    np.asarray(no_drop(images, key=jax.random.key(1))), np.asarray(no_drop(images))
  )
  assert [blk.drop_path_rate for blk in model.blocks] == [0.0, 0.5]
  # Whole samples are dropped with probability `rate`; survivors are rescaled by 1 / keep.
  x = jnp.ones((4000, 3, 2))
  y = np.asarray(vit.drop_path(x, 0.3, jax.random.key(0)))
  np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.7], rtol=1e-6)
  assert np.all(y.min(axis=(1, 2)) == y.max(axis=(1, 2)))
  assert abs((y[:, 0, 0] == 0).mean() - 0.3) < 0.03


def test_bfloat16_close_to_float32():
  images = _images()
  f32 = _perturb(vit.ViT(**TINY, pool="none", rngs=nnx.Rngs(0)))
  bf16 = vit.ViT(**TINY, pool="none", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  nnx.update(bf16, nnx.state(f32, nnx.Param))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  a, b = np.asarray(f32(images)), np.asarray(bf16(images))
  assert b.dtype == np.float32
  rel = np.linalg.norm(a - b) / np.linalg.norm(a)
  assert 0 < rel < 2e-2


def test_state_is_params_only_and_jit_boundary():
  images, mask = _images(), jnp.asarray(_mask())
  model = mae.MAE(**TINY, **TINY_DEC, drop_path_rate=0.1, remat=True, rngs=nnx.Rngs(0))
  assert nnx.state(model) == nnx.state(model, nnx.Param)
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(p):
    pred = nnx.merge(graphdef, p)(images, mask)
    return mae.mae_loss(pred, images, mask, 8)[0]

  eager = float(mae.mae_loss(model(images, mask), images, mask, 8)[0])
  value, grads = jax.jit(jax.value_and_grad(loss))(nnx.to_pure_dict(params))
  np.testing.assert_allclose(float(value), eager, rtol=1e-5)
  assert float(jnp.abs(grads["encoder"]["cls_token"]).sum()) > 0
  # The nnx.State form crosses the boundary too.
  np.testing.assert_allclose(float(jax.jit(loss)(params)), eager, rtol=1e-5)


def test_remat_changes_memory_not_math():
  images = _images()
  grads = []
  for remat in (False, True):
    model = vit.ViT(**TINY, drop_path_rate=0.3, remat=remat, rngs=nnx.Rngs(0))
    assert nnx.state(model) == nnx.state(model, nnx.Param)
    graphdef, params = nnx.split(model, nnx.Param)
    # Drop path is on, so the per-block keys must also be replayed identically under remat.
    grads.append(
      jax.jit(jax.grad(lambda p, k, g=graphdef: jnp.sum(nnx.merge(g, p)(images, key=k) ** 2)))(
        params, jax.random.key(3)
      )
    )
  # Float32 tolerance on the gradients' scale: a leaf whose gradient is a sum cancelling to
  # ~1e-4 (terms of order 1) carries ~1e-5 of rounding that depends on the order XLA sums in,
  # which remat and XLA's compile options change; a wrong key or block would differ by O(1).
  scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(grads[0]))
  for x, y in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5 * scale)


def _jit_call(model, *args, method="__call__", **kwargs):
  """model.method(*args, **kwargs) compiled (the eager op-by-op path is slower on CPU)."""
  return jax.jit(lambda *a: getattr(model, method)(*a, **kwargs))(*args)


def _mae_loss_and_grads(images, mask, key, dtype=jnp.float32, **options):
  """Loss and gradients of a tiny MAE (same init for every option) on images/mask."""
  model = mae.MAE(**TINY, **TINY_DEC, drop_path_rate=0.2, dtype=dtype, rngs=nnx.Rngs(0), **options)
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(p):
    return mae.mae_loss(nnx.merge(graphdef, p)(images, mask, key=key), images, mask, 8)[0]

  return jax.jit(jax.value_and_grad(loss))(params)


def test_fused_attention_asks_cudnn_on_a_gpu_in_bf16_and_falls_back_to_xla(monkeypatch):
  """vit.fused_attention: on a GPU, bf16 inputs go to cuDNN first (JAX's own default is XLA's
  attention); where JAX refuses cuDNN at trace time (here: no cuDNN on this machine) the XLA
  result is returned, equal to softmax(q k^T / sqrt(d)) v worked in numpy. float32 and the
  other backends never ask for cuDNN."""
  real, asked = jax.nn.dot_product_attention, []

  def recording(*args, implementation=None, **kw):
    asked.append(implementation)
    return real(*args, implementation=implementation, **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 5, 4, 8))  # [B, N, heads, head_dim]
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  want = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)
  for backend, dtype, calls, tol in (
    ("gpu", jnp.bfloat16, ["cudnn", None], 3e-2),
    ("gpu", jnp.float32, [None], 1e-5),
    ("tpu", jnp.bfloat16, [None], 3e-2),
  ):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    asked.clear()
    out = vit.fused_attention(*(x.astype(dtype) for x in (q, k, v)))
    assert asked == calls, (backend, dtype)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=tol, atol=tol)


def test_cudnn_attention_pads_odd_lengths_and_equals_unpadded_attention(monkeypatch):
  """JAX refuses cuDNN for odd sequence lengths in training (it counts its own stand-in for a
  missing bias as a bias). vit.cudnn_attention pads them by one masked token: with a stand-in
  for jax.nn.dot_product_attention that refuses odd cuDNN shapes as JAX does, on a backend
  reported as a GPU's, fused_attention now gets cuDNN (no fallback) for 197-like lengths, and
  the result and the gradients of q, k and v equal the unpadded attention's (numpy and JAX's
  own, in float32)."""
  real, shapes = jax.nn.dot_product_attention, []

  def strict(q, k, v, bias=None, implementation=None, **kw):
    shapes.append((implementation, q.shape[1], k.shape[1]))
    if implementation == "cudnn" and (q.shape[1] % 2 or k.shape[1] % 2):
      raise NotImplementedError(f"Unsupported sequence length Q {q.shape[1]}, KV {k.shape[1]}.")
    return real(q, k, v, bias, **kw)  # XLA's attention in place of cuDNN's

  q = jax.random.normal(jax.random.key(1), (2, 5, 3, 8))  # T = 5
  k, v = jax.random.normal(jax.random.key(2), (2, 2, 7, 3, 8))  # S = 7
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  want = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)
  monkeypatch.setattr(jax.nn, "dot_product_attention", strict)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  out = vit.fused_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert shapes == [("cudnn", 6, 8)]  # taken at once, padded to even lengths
  np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=3e-2, atol=3e-2)
  monkeypatch.setattr(jax.nn, "dot_product_attention", real)

  weights = jax.random.normal(jax.random.key(3), want.shape)  # a loss that uses every output
  loss = lambda attend: lambda *qkv: jnp.sum(attend(*qkv) * weights)  # noqa: E731
  padded = jax.value_and_grad(
    loss(lambda *a: vit.cudnn_attention(*a, implementation=None)), (0, 1, 2)
  )
  plain = jax.value_and_grad(loss(real), (0, 1, 2))
  (la, ga), (lb, gb) = padded(q, k, v), plain(q, k, v)
  np.testing.assert_allclose(float(la), float(np.sum(want * weights)), rtol=1e-5)
  np.testing.assert_allclose(float(la), float(lb), rtol=1e-5)
  for a, b in zip(ga, gb):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_bias", [False, True])
def test_vmapped_cudnn_attention_folds_the_lanes_into_the_heads(monkeypatch, with_bias):
  """The round's lanes vmap the model. JAX's own vmap of cuDNN's attention folds the lanes into
  the batch axis, which a batch sharded over devices cannot follow (the paper preset on 8 H200
  targets did not compile). vit.lanes_as_heads_attention folds them into the heads instead:
  with a stand-in for jax.nn.dot_product_attention (XLA's attention in place of cuDNN's), the
  forward and backward calls are reached outside any vmap with 4 lanes x 2 heads as 8 heads,
  and the loss's value and
  gradients (q, k, v, and a bias when there is one) equal each lane's own, unpadded attention's.
  T = 5 and S = 7 go through cudnn_attention's padding when there is no bias."""
  from jax._src.interpreters import batching

  real, seen = jax.nn.dot_product_attention, []

  def standin(q, k, v, bias=None, implementation=None, **kw):
    seen.append((isinstance(q, batching.BatchTracer), q.shape[2]))
    return real(q, k, v, bias, **kw)

  keys = jax.random.split(jax.random.key(4), 5)
  q = jax.random.normal(keys[0], (4, 3, 5, 2, 8))  # 4 lanes of [B=3, T=5, heads=2, 8]
  k, v = (jax.random.normal(key, (4, 3, 7, 2, 8)) for key in keys[1:3])
  bias = jax.random.normal(keys[3], (4, 3, 2, 5, 7)) if with_bias else None
  weights = jax.random.normal(keys[4], q.shape[1:])  # a loss that uses every output

  def loss(attend):
    return lambda q, k, v, bias: jnp.sum(attend(q, k, v, bias) * weights)

  args = (0, 1, 2, 3) if with_bias else (0, 1, 2)
  monkeypatch.setattr(jax.nn, "dot_product_attention", standin)
  lv, lg = jax.vmap(jax.value_and_grad(loss(vit.lanes_as_heads_attention), args))(q, k, v, bias)
  # custom_vmap also traces the per-lane function once for its shapes (2 heads, never run).
  assert not any(batched for batched, _ in seen) and seen.count((False, 8)) == 2, seen
  for lane in range(4):
    b = None if bias is None else bias[lane]
    wv, wg = jax.value_and_grad(loss(real), args)(q[lane], k[lane], v[lane], b)
    np.testing.assert_allclose(lv[lane], wv, rtol=1e-5)
    for got, want in zip(lg, wg):
      np.testing.assert_allclose(got[lane], want, rtol=1e-4, atol=1e-5)


def _dot_generals(jaxpr) -> list:
  """The dot_general equations of a jaxpr and of the jaxprs nested in it."""
  from jax.extend import core as jex_core

  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(eqn)
    for sub in jex_core.jaxprs_in_params(eqn.params):
      found += _dot_generals(sub)
  return found


def test_linear_on_a_gpu_contracts_one_dimension_in_the_vmapped_kernel_gradient():
  """The round vmaps the model over lanes. Under that vmap, the gradient of x [B, N, in] @ W
  contracts two dimensions (batch, tokens) in a batched product, before which XLA:GPU
  transposes the activations or the gradient (compiled for an H200: 1.7 ms of the paper
  preset's 42.3 ms step). vit.Linear traced for a GPU merges the leading dimensions first, so
  every product of the vmapped loss and gradient contracts one dimension, and the loss and
  gradients equal numpy's x @ W + b per lane (the CPU trace keeps its own written-out path)."""
  from jax._src import mesh as mesh_lib

  layer = vit.linear(4, 6, dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, _ = nnx.split(layer)
  rng = np.random.default_rng(0)
  kernel, bias = rng.normal(size=(3, 4, 6)), rng.normal(size=(3, 6))  # 3 lanes
  x, weights = rng.normal(size=(3, 2, 5, 4)), rng.normal(size=(2, 5, 6))

  def loss(kernel, bias, x):
    state = nnx.State({"kernel": nnx.Param(kernel), "bias": nnx.Param(bias)})
    return jnp.sum(nnx.merge(graphdef, state)(x) * weights)

  f = jax.vmap(jax.value_and_grad(loss, (0, 1, 2)))
  args = tuple(jnp.asarray(a, jnp.float32) for a in (kernel, bias, x))
  for platform in ("gpu", "cpu"):
    device = mesh_lib.AbstractDevice("fake", None, platform)
    mesh = jax.sharding.AbstractMesh((1,), ("data",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
      jaxpr = jax.make_jaxpr(f)(*args)
      value, (dk, db, dx) = f(*args)
    contracted = {len(e.params["dimension_numbers"][0][0]) for e in _dot_generals(jaxpr.jaxpr)}
    if platform == "gpu":
      assert contracted == {1}, contracted
    y = np.einsum("lbni,lio->lbno", x, kernel) + bias[:, None, None]
    np.testing.assert_allclose(value, np.sum(y * weights, axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(dk, np.einsum("lbni,bno->lio", x, weights), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, np.broadcast_to(weights.sum((0, 1)), (3, 6)), rtol=1e-5)
    np.testing.assert_allclose(
      dx, np.einsum("bno,lio->lbni", weights, kernel), rtol=1e-5, atol=1e-5
    )


def test_dot_product_attention_equals_einsum(monkeypatch):
  """The fused path (jax.nn.dot_product_attention) against explicit q k^T softmax v: MAE loss
  and gradients (encoder ViT and decoder) in float32, predictions in bfloat16. On the CPU
  `dot_product` runs the einsum path, so the backend is reported as a GPU's here."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  images, mask = _images(), jnp.asarray(_mask())
  (la, ga), (lb, gb) = (
    _mae_loss_and_grads(images, mask, None, attention_impl=impl) for impl in vit.ATTENTION_IMPLS
  )
  np.testing.assert_allclose(float(la), float(lb), rtol=1e-5)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
  preds = [
    _jit_call(
      mae.MAE(**TINY, **TINY_DEC, dtype=jnp.bfloat16, attention_impl=impl, rngs=nnx.Rngs(0)),
      images,
      mask,
    )
    for impl in vit.ATTENTION_IMPLS
  ]
  a, b = np.asarray(preds[0]), np.asarray(preds[1])
  assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-2  # bfloat16 rounding, 8 bits
  # Attention.weights are the probabilities both paths apply to v.
  attn = vit.Attention(64, 4, dtype=jnp.float32, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(0), (2, 5, 64))
  _, _, v = attn._qkv(x)
  mixed = jnp.einsum("bhqk,bhkd->bqhd", attn.weights(x), v).reshape(2, 5, 64)
  np.testing.assert_allclose(
    np.asarray(attn.proj(mixed)), np.asarray(attn(x)), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize("spec", ["bhqd,bhkd->bhqk", "bqhd,bkhd->bhqk"])
def test_attention_scores_gradient_is_the_products_in_the_inputs_dtype(spec):
  """vit.attention_scores: q k^T in float32, forward and backward, against numpy in float64;
  with bfloat16 q and k the backward multiplies the gradient rounded to bfloat16 (as flash
  attention does), so its products are bfloat16 x bfloat16 and its result is numpy's on the
  rounded gradient."""
  rng = np.random.default_rng(0)
  heads_first = spec.startswith("bhqd")
  shape = lambda n: (2, 3, n, 4) if heads_first else (2, n, 3, 4)
  q, k, g = rng.normal(size=shape(5)), rng.normal(size=shape(6)), rng.normal(size=(2, 3, 5, 6))
  to_bhnd = (lambda x: x) if heads_first else (lambda x: x.transpose(0, 2, 1, 3))
  from_bhnd = to_bhnd  # the transpose is its own inverse
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
    qx, kx = jnp.asarray(q, dtype), jnp.asarray(k, dtype)
    out, vjp = jax.vjp(lambda a, b: vit.attention_scores(spec, a, b), qx, kx)
    assert out.dtype == jnp.float32
    qn, kn = (to_bhnd(np.asarray(x, np.float64)) for x in (qx, kx))
    np.testing.assert_allclose(out, qn @ kn.transpose(0, 1, 3, 2), rtol=1e-5, atol=1e-5)
    dq, dk = vjp(jnp.asarray(g, jnp.float32))
    assert dq.dtype == dtype and dk.dtype == dtype
    gn = np.asarray(jnp.asarray(g, dtype), np.float64)  # the gradient as the products see it
    np.testing.assert_allclose(dq, from_bhnd(gn @ kn), rtol=tol, atol=tol)
    np.testing.assert_allclose(dk, from_bhnd(gn.transpose(0, 1, 3, 2) @ qn), rtol=tol, atol=tol)
    products = jax.make_jaxpr(vjp)(jnp.asarray(g, jnp.float32)).jaxpr.eqns
    dots = [e for e in products if e.primitive.name == "dot_general"]
    assert len(dots) == 2
    assert all(v.aval.dtype == dtype for e in dots for v in e.invars)


def test_scan_and_remat_policies_keep_loss_and_grads():
  """Scan over layers and each remat policy: the loss and gradients of the plain loop, with
  drop path on (per-block keys and rates replayed), parameters under the same names."""
  images, mask, key = _images(), jnp.asarray(_mask()), jax.random.key(5)
  ref_loss, ref_grads = _mae_loss_and_grads(images, mask, key)
  for options in (dict(scan_layers=True, remat="dots"), dict(remat="full")):
    loss, grads = _mae_loss_and_grads(images, mask, key, **options)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5, err_msg=str(options))
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(
        np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6, err_msg=str(options)
      )
  # Intermediate blocks come out of the scan as out of the loop.
  plain, scanned = (
    _jit_call(
      vit.ViT(**TINY, pool="none", scan_layers=scan, rngs=nnx.Rngs(0)),
      images,
      method="encode",
      return_blocks=(2, 1),
    )
    for scan in (False, True)
  )
  for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(scanned)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="remat='some'"):
    vit.remat_mode("some")


def test_block_outputs_follow_the_batch_over_the_data_axis():
  """Inside a mesh, run_blocks keeps activations batch-split over 'data' whatever the input's
  layout: from a replicated input with kernels split by the `fsdp` rule, XLA's own propagation
  would split them along embed instead (then gather them at every layer). Values unchanged."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  from ultrajax.train import sharding

  blocks = nnx.List([vit.Block(32, 4, rngs=nnx.Rngs(i)) for i in range(2)])
  graphdef, params = nnx.split(blocks)
  params = nnx.to_pure_dict(params)
  x = np.random.default_rng(0).standard_normal((8, 5, 32)).astype(np.float32)
  apply = lambda p, x: vit.run_blocks(nnx.merge(graphdef, p), x, None)[0]  # noqa: E731
  mesh = sharding.make_mesh(1, 4)
  fsdp = sharding.tree_shardings(jax.eval_shape(lambda: params), mesh, ((".*", "fsdp"),), False)
  assert fsdp[0]["mlp"]["fc1"]["kernel"].spec == P(None, "data")  # 128 outputs split
  with jax.set_mesh(mesh):
    fn = jax.jit(apply, in_shardings=(fsdp, NamedSharding(mesh, P())))
    out = fn(jax.device_put(params, fsdp), x)
  assert out.sharding.spec == P("data")
  np.testing.assert_allclose(out, jax.jit(apply)(params, x), atol=1e-5)


def test_mlp_uses_exact_gelu():
  mlp = vit.Mlp(8, 32, dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).normal(scale=3.0, size=(4, 5, 8)).astype(np.float32)
  w1, b1 = np.asarray(mlp.fc1.kernel[...]), np.asarray(mlp.fc1.bias[...]) + 0.5
  mlp.fc1.bias[...] = b1
  w2, b2 = np.asarray(mlp.fc2.kernel[...]), np.asarray(mlp.fc2.bias[...])
  h = x.astype(np.float64) @ w1 + b1
  erf = np.vectorize(math.erf)
  exact = (0.5 * h * (1 + erf(h / math.sqrt(2)))) @ w2 + b2
  tanh = (0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))) @ w2 + b2
  got = np.asarray(mlp(jnp.asarray(x)))
  np.testing.assert_allclose(got, exact, atol=2e-5)
  assert np.abs(tanh - exact).max() > 1e-4  # the two GELUs are distinguishable here


def test_upsample2x_is_the_stride_2_transposed_convolution():
  # Each output pixel (2h + i, 2w + j) is input pixel (h, w) times one tap of the kernel (the
  # defining sum, written out in numpy) and equals Flax's ConvTranspose with the same params.
  up = layers.Upsample2x(3, 4, rngs=nnx.Rngs(0))
  up.bias[...] = jax.random.normal(jax.random.key(2), (4,))  # a non-zero bias is checked too
  x = np.asarray(jax.random.normal(jax.random.key(1), (2, 3, 5, 3)))
  kernel, bias = np.asarray(up.kernel[...]), np.asarray(up.bias[...])
  want = np.zeros((2, 6, 10, 4), np.float32)
  for h in range(3):
    for w in range(5):
      for i in range(2):
        for j in range(2):
          want[:, 2 * h + i, 2 * w + j] = x[:, h, w] @ kernel[1 - i, 1 - j] + bias
  np.testing.assert_allclose(np.asarray(up(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
  conv = nnx.ConvTranspose(3, 4, (2, 2), strides=(2, 2), padding="VALID", rngs=nnx.Rngs(2))
  conv.kernel[...], conv.bias[...] = up.kernel[...], up.bias[...]
  np.testing.assert_allclose(np.asarray(conv(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
