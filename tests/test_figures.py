"""Figures: precision-recall and metric curve PNGs, ViT attention weights (numpy
recomputation) and their PNGs, t-SNE of features."""

import jax
import numpy as np
import pytest
from flax import nnx

from ultrajax.models import vit
from ultrajax.viz import attention as attention_viz, embedding, plots


def test_pr_and_metric_curve_pngs(tmp_path):
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 3, 60)
  probs = rng.dirichlet(np.ones(3), 60)
  plots.pr_curves(tmp_path / "pr.png", labels, probs, ["a", "b", "c"])
  plots.metric_curve(
    tmp_path / "blur.png", [0, 1, 2], {"auroc": [0.9, 0.8, 0.7]}, xlabel="sigma", ylabel="auroc"
  )
  assert (tmp_path / "pr.png").stat().st_size > 0 and (tmp_path / "blur.png").stat().st_size > 0


@pytest.fixture(scope="module")
def tiny_vit():
  model = vit.ViT(
    width=32,
    depth=2,
    num_heads=4,
    patch_size=8,
    image_size=16,
    pool="gap",
    num_classes=3,
    rngs=nnx.Rngs(0),
  )
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  return model, images


def _layer_norm(x, scale, bias):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + vit.LN_EPS) * scale + bias


def test_attention_weights_are_softmax_rows_equal_to_numpy_and_drive_the_block(tiny_vit):
  model, images = tiny_vit
  weights = np.asarray(model.attention(images))  # last block
  assert weights.shape == (2, 4, 5, 5)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
  # Independent recomputation from the last block's input and its norm1 / qkv parameters.
  _, (x,) = model.encode(images, return_blocks=(1,))
  block = model.blocks[1]
  h = _layer_norm(
    np.asarray(x, np.float64), np.asarray(block.norm1.scale[...]), np.asarray(block.norm1.bias[...])
  )
  qkv = h @ np.asarray(block.attn.qkv.kernel[...]) + np.asarray(block.attn.qkv.bias[...])
  q, k, v = qkv.reshape(2, 5, 3, 4, 8).transpose(2, 0, 3, 1, 4)  # [3, B, heads, N, head_dim]
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(8)
  ref = np.exp(logits - logits.max(-1, keepdims=True))
  ref /= ref.sum(-1, keepdims=True)
  np.testing.assert_allclose(weights, ref, rtol=1e-4, atol=1e-6)
  # These are the weights the fused attention applies: weights @ v, then proj, is the block's
  # attention output.
  mixed = (ref @ v).transpose(0, 2, 1, 3).reshape(2, 5, 32)
  out = mixed @ np.asarray(block.attn.proj.kernel[...]) + np.asarray(block.attn.proj.bias[...])
  np.testing.assert_allclose(block.attn(block.norm1(x)), out, rtol=1e-4, atol=1e-5)
  # cls and mean-query maps are slices of the same weights on the patch grid.
  np.testing.assert_allclose(
    model.attention_maps(images, "cls"), weights[:, :, 0, 1:].reshape(2, 4, 2, 2), rtol=1e-6
  )
  np.testing.assert_allclose(
    model.attention_maps(images, "mean", block=1),
    np.asarray(model.attention(images, 1))[:, :, :, 1:].mean(2).reshape(2, 4, 2, 2),
    rtol=1e-6,
  )
  with pytest.raises(ValueError, match="block 3"):
    model.attention(images, 3)


def test_vit_outputs_unchanged_by_the_feature_split(tiny_vit):
  model, images = tiny_vit
  tokens = model.encode(images)
  expected = model.head(model.fc_norm(tokens[:, 1:].mean(axis=1)))
  np.testing.assert_allclose(model(images), expected, rtol=1e-6)
  np.testing.assert_allclose(
    model.features(images), model.fc_norm(tokens[:, 1:].mean(axis=1)), rtol=1e-6
  )


def test_attention_png_and_upsampling(tmp_path, tiny_vit):
  model, images = tiny_vit
  maps = np.asarray(model.attention_maps(images))
  up = attention_viz.upsample(maps[0, 0], 16)
  assert up.shape == (16, 16) and up.min() == 0.0 and np.isclose(up.max(), 1.0)
  # The brightest pixel lies in the patch with the largest weight.
  r, c = np.unravel_index(np.argmax(up), up.shape)
  assert maps[0, 0][r // 8, c // 8] == maps[0, 0].max()
  pixels = (np.asarray(images) * 40 + 128).clip(0, 255).astype(np.uint8)
  path = attention_viz.save_attention(tmp_path / "attn.png", pixels, maps, title="round 1")
  assert path.stat().st_size > 0
  with pytest.raises(ValueError, match="share B"):
    attention_viz.save_attention(tmp_path / "bad.png", pixels[:1], maps)


def test_tsne_keeps_separated_classes_apart(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.repeat([0, 1, 2], 15)
  features = rng.normal(size=(45, 16)) + 8.0 * np.eye(3, 16)[labels]
  points = embedding.save_tsne(tmp_path / "tsne.png", features, labels, ["a", "b", "c"])
  assert points.shape == (45, 2) and (tmp_path / "tsne.png").stat().st_size > 0
  # Leave-one-out 1-nearest-neighbour in the 2-D map recovers every class.
  d = np.linalg.norm(points[:, None] - points[None], axis=-1) + np.eye(45) * 1e9
  assert np.mean(labels[d.argmin(1)] == labels) == 1.0
  with pytest.raises(ValueError, match="N >= 4"):
    embedding.tsne(features[:3])


def test_test_time_blur_matches_scipy_gaussian_filter():
  from scipy import ndimage

  from ultrajax.eval import downstream

  images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3)).astype(np.uint8)
  out = downstream.blurred(images, 1.5, chunk=2)
  ref = ndimage.gaussian_filter(
    images.astype(np.float64), sigma=(0, 1.5, 1.5, 0), mode="reflect", truncate=3.0
  )
  assert out.dtype == np.uint8 and np.abs(out.astype(np.float64) - ref).max() <= 0.5 + 1e-3
  assert downstream.blurred(images, 0.0) is images
