"""UltraMIM ops against independent references: scipy/numpy filters, exact sampling probabilities,
binomial frequencies, scikit-image rotations and polar warps."""

import functools
import itertools
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import skimage.transform
from PIL import Image, ImageDraw

from ultrajax import ultramim
from ultrajax.data import phantom, pipeline, sources
from ultrajax.ultramim import geometry

# ----------------------------------------------------------------------------------------------- texture

CV2_LAPLACIAN_K3 = np.array([[2, 0, 2], [0, -8, 0], [2, 0, 2]], np.float64)


def reference_texture(images, p):
  """Per-patch scipy 'mirror' (= reflect-101) Laplacian, |.|, clip 255, mean; images: [B, H, W, C]."""
  images = np.asarray(images, np.float64)
  grey = images[..., 0] if images.shape[-1] == 1 else images @ np.array([0.299, 0.587, 0.114])
  grey = 255.0 * grey
  b, h, w = grey.shape
  out = np.zeros((b, (h // p) * (w // p)))
  for n in range(b):
    for i in range(h // p):
      for j in range(w // p):
        patch = grey[n, i * p : (i + 1) * p, j * p : (j + 1) * p]
        lap = scipy.ndimage.convolve(patch, CV2_LAPLACIAN_K3, mode="mirror")
        out[n, i * (w // p) + j] = np.minimum(np.abs(lap), 255).mean()
  return out


def structured_images(h=32, w=32):
  """Checkerboard, stripes, a flat field and a smooth ramp, as [4, H, W, 3] grey."""
  y, x = np.mgrid[0:h, 0:w]
  imgs = [
    ((y // 2 + x // 3) % 2).astype(float),
    (x % 4 < 2) * 0.8,
    np.full((h, w), 0.3),
    x / w * 0.5 + y / h * 0.5,
  ]
  return np.repeat(np.stack(imgs)[..., None], 3, axis=-1).astype(np.float32)


@pytest.mark.parametrize("channels,patch", [(3, 8), (1, 16), (3, 16)])
def test_texture_scores_match_per_patch_scipy_reference(channels, patch):
  rng = np.random.default_rng(0)
  noise = rng.random((3, 32, 32, channels)).astype(np.float32)
  structured = structured_images()[..., :channels]
  for images in (noise, structured):
    got = np.asarray(jax.jit(ultramim.texture_scores, static_argnums=1)(images, patch))
    assert got.shape == (images.shape[0], (32 // patch) ** 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_texture(images, patch), atol=1e-3, rtol=1e-5)


def test_texture_scores_ignore_neighbouring_patches():
  # A step edge exactly on a patch border is invisible to per-patch filtering; inside a patch it is not.
  img = np.zeros((1, 16, 16, 1), np.float32)
  img[..., :, 8:, :] = 1.0
  assert np.all(np.asarray(ultramim.texture_scores(img, 8)) == 0)
  assert np.all(np.asarray(ultramim.texture_scores(img, 16)) > 0)
  with pytest.raises(ValueError, match="patch_size=5"):
    ultramim.texture_scores(img, 5)


# ----------------------------------------------------------------------------------------------- masking


def exact_tgm_probabilities(weights, len_keep):
  """Sequential draws without replacement, by enumerating every draw order.

  Returns (P(patch k is among the first len_keep draws), P(the patch drawn at step k has raster index
  >= len_keep)): the intended mode's keep probability and the official code's mask probability.
  """
  n = len(weights)
  keep, official_mask = np.zeros(n), np.zeros(n)
  for order in itertools.permutations(range(n)):
    prob, left = 1.0, float(sum(weights))
    for k in order:
      prob *= weights[k] / left
      left -= weights[k]
    keep[list(order[:len_keep])] += prob
    official_mask += prob * (np.array(order) >= len_keep)
  return keep, official_mask


def gradient_texture_scores():
  """Scores of a 64x64 image whose speckle amplitude grows left to right: [1, 64] (8x8 patches of 8)."""
  rng = np.random.default_rng(1)
  amp = np.linspace(0.0, 0.45, 64)[None, :]
  img = 0.5 + amp * (rng.random((64, 64)) - 0.5) * 2
  return ultramim.texture_scores(np.repeat(img[None, ..., None], 3, -1).astype(np.float32), 8)


def mask_frequencies(scores, mode, draws=4000, mask_ratio=0.75, seed=0):
  keys = jax.random.split(jax.random.key(seed), draws)
  masks = jax.jit(jax.vmap(lambda k: ultramim.tgm_mask(k, scores, mask_ratio, mode)))(keys)
  return np.asarray(masks).mean(axis=(0, 1))


@pytest.mark.parametrize("mode", ultramim.MODES)
@pytest.mark.parametrize("mask_ratio,n", [(0.75, 196), (0.5, 64), (0.9, 10), (0.0, 16)])
def test_every_row_masks_exactly_n_minus_len_keep(mode, mask_ratio, n):
  scores = jax.random.uniform(jax.random.key(3), (5, n)) * 100
  masks = np.asarray(ultramim.tgm_mask(jax.random.key(4), scores, mask_ratio, mode))
  assert masks.dtype == bool and masks.shape == (5, n)
  assert np.all(masks.sum(-1) == n - int(n * (1 - mask_ratio)))


def test_tgm_frequencies_match_exact_sequential_sampling():
  scores = jnp.array([1.0, 2.0, 3.0, 4.0, 6.0])
  weights = [6.0, 5.0, 4.0, 3.0, 1.0]  # (max - a) + |min|, by hand
  np.testing.assert_allclose(np.exp(ultramim.tgm_log_weights(scores[None]))[0], weights, rtol=1e-6)
  keep, official_mask = exact_tgm_probabilities(weights, len_keep=2)
  rows = 40000
  tol = 5 * np.sqrt(0.25 / rows)
  tiled = jnp.tile(scores, (rows, 1))
  intended = np.asarray(ultramim.tgm_mask(jax.random.key(0), tiled, 0.6, "intended")).mean(0)
  np.testing.assert_allclose(intended, 1 - keep, atol=tol)
  official = np.asarray(ultramim.tgm_mask(jax.random.key(1), tiled, 0.6, "official_code")).mean(0)
  np.testing.assert_allclose(official, official_mask, atol=tol)
  assert np.ptp(1 - keep) > 0.4  # the intended mode really depends on texture at this scale


def test_intended_masks_textured_patches_official_ignores_texture_random_is_uniform():
  scores = gradient_texture_scores()
  s = np.asarray(scores)[0]
  intended = mask_frequencies(scores, "intended")
  assert scipy.stats.spearmanr(intended, s).statistic > 0.9
  assert scipy.stats.pearsonr(intended, s).statistic > 0.9
  official = mask_frequencies(scores, "official_code")
  assert abs(scipy.stats.pearsonr(official, s).statistic) < 0.2
  # 4000 draws: a binomial standard deviation of 0.007, so 0.04 is over 5 of them.
  assert np.all(np.abs(official - 0.75) < 0.04)
  assert np.all(np.abs(mask_frequencies(scores, "random") - 0.75) < 0.04)


def test_degenerate_scores_fall_back_to_uniform():
  for row in ([7.0] * 8, [np.nan] + [1.0] * 7, [0.0] * 8):
    freq = mask_frequencies(jnp.array([row]), "intended", draws=4000, mask_ratio=0.5)
    assert np.all(np.abs(freq - 0.5) < 0.04), row


def test_tgm_mask_jits_and_vmaps_over_clients():
  scores = jax.random.uniform(jax.random.key(0), (3, 4, 16)) * 50
  keys = jax.random.split(jax.random.key(1), 3)
  step = jax.jit(jax.vmap(lambda k, s: ultramim.tgm_mask(k, s, 0.75)))
  batched = np.asarray(step(keys, scores))
  for c in range(3):
    np.testing.assert_array_equal(batched[c], ultramim.tgm_mask(keys[c], scores[c], 0.75))


def test_tgm_mask_rejects_bad_arguments():
  scores = jnp.ones((1, 4))
  with pytest.raises(ValueError, match="'sorted'"):
    ultramim.tgm_mask(jax.random.key(0), scores, 0.5, "sorted")
  for ratio in (1.0, -0.1):
    with pytest.raises(ValueError, match=f"mask_ratio={ratio}"):
      ultramim.tgm_mask(jax.random.key(0), scores, ratio)


# ------------------------------------------------------------------------------------------- corruption


def config(**overrides):
  """The official UltraFedFM settings (configs/pretrain_fed.py), with overrides."""
  official = dict(
    p_clean=0.5,
    p_each=0.5,
    motion_length=24,
    motion_angle_deg=45.0,
    gaussian_sigma=1.1,
    salt_pepper_density=0.1,
  )
  return ml_collections.ConfigDict({**official, **overrides})


def test_corruption_subsets_have_the_official_frequencies():
  b = 200000
  which = np.asarray(ultramim.sample_corruptions(jax.random.key(0), b, config()))
  codes = which @ np.array([1, 2, 4])
  freq = np.bincount(codes, minlength=8) / b
  # Index = subset bits (1 motion, 2 gaussian, 4 salt & pepper); 0 = clean.
  expected = np.r_[0.5, 0.5 * np.array([1 / 6, 1 / 6, 1 / 8, 1 / 6, 1 / 8, 1 / 8, 1 / 8])]
  np.testing.assert_allclose(freq, expected, atol=5 * np.sqrt(0.25 / b))


def test_corrupt_applies_the_sampled_subset_in_order():
  rng = np.random.default_rng(0)
  images = rng.random((16, 32, 32, 3)).astype(np.float32)
  cfg = config()
  key = jax.random.key(5)
  got = np.asarray(jax.jit(lambda k, x: ultramim.corrupt(k, x, cfg))(key, images))
  k_which, k_noise = jax.random.split(key)
  which = np.asarray(ultramim.sample_corruptions(k_which, 16, cfg))
  assert which.any(1).sum() not in (0, 16)
  for n in range(16):
    x = images[n : n + 1]
    if which[n, 0]:
      x = ultramim.motion_blur(x, 24, 45.0)
    if which[n, 1]:
      x = ultramim.gaussian_blur(x, 1.1)
    if which[n, 2]:
      # The noise mask is drawn for the whole batch; take this image's slice.
      x = ultramim.salt_and_pepper(k_noise, jnp.broadcast_to(x, images.shape), 0.1)[n : n + 1]
    np.testing.assert_allclose(got[n : n + 1], x, atol=1e-6)


def test_corrupt_keeps_images_clean_when_p_clean_is_one_and_jits_and_vmaps():
  rng = np.random.default_rng(1)
  images = rng.random((2, 4, 32, 32, 1)).astype(np.float32)  # [clients, B, H, W, C]
  keys = jax.random.split(jax.random.key(0), 2)
  clean = jax.jit(jax.vmap(lambda k, x: ultramim.corrupt(k, x, config(p_clean=1.0))))(keys, images)
  np.testing.assert_array_equal(clean, images)
  cfg = config(p_clean=0.0, p_each=1.0)
  every = np.asarray(jax.jit(jax.vmap(lambda k, x: ultramim.corrupt(k, x, cfg)))(keys, images))
  for c in range(2):
    np.testing.assert_allclose(every[c], ultramim.corrupt(keys[c], images[c], cfg), atol=1e-6)
  assert not np.allclose(every, images)
  with pytest.raises(ValueError, match="p_clean=1.5"):
    ultramim.corrupt(keys[0], images[0], config(p_clean=1.5))


def test_corrupt_splits_over_the_data_axis_under_the_lanes_vmap():
  """As the round chunk runs MIC: vmapped over lanes, the batch split over 4 devices. Each device
  does a quarter of the work (XLA's FLOP count) and nothing is gathered; a convolution here had
  every device blur all images (its vmap merges lanes and images into one batch axis)."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  from ultrajax.train import sharding

  cfg = config(p_clean=0.0, p_each=1.0)
  images = np.random.default_rng(4).random((2, 8, 32, 32, 3)).astype(np.float32)
  keys = jax.random.split(jax.random.key(0), 2)
  fn = jax.vmap(lambda k, x: ultramim.corrupt(k, x, cfg))
  one = jax.jit(fn).lower(keys, images).compile()
  mesh = sharding.make_mesh(1, 4)
  split = NamedSharding(mesh, P(None, "data"))
  with jax.set_mesh(mesh):
    four = jax.jit(fn, in_shardings=(None, split), out_shardings=split).lower(keys, images)
    four = four.compile()
  assert "all-gather" not in four.as_text()
  ratio = four.cost_analysis()["flops"] / one.cost_analysis()["flops"]
  assert 0.2 < ratio < 0.3, ratio
  np.testing.assert_allclose(
    four(keys, jax.device_put(images, split)), one(keys, images), atol=1e-6
  )


def test_salt_and_pepper_density_and_shared_channel_mask():
  images = np.full((4, 64, 64, 3), 0.5, np.float32)
  out = np.asarray(ultramim.salt_and_pepper(jax.random.key(0), images, 0.1))
  assert np.all(out == out[..., :1])
  pixels = out.size / 3
  for value in (0.0, 1.0):
    frac = (out[..., 0] == value).sum() / pixels
    assert abs(frac - 0.05) < 5 * np.sqrt(0.05 * 0.95 / pixels)
  assert set(np.unique(out)) == {0.0, 0.5, 1.0}


def test_gaussian_blur_matches_scipy():
  images = np.random.default_rng(2).random((2, 32, 40, 3)).astype(np.float32)
  got = np.asarray(ultramim.gaussian_blur(images, 1.1))
  ref = scipy.ndimage.gaussian_filter(
    images.astype(np.float64), (0, 1.1, 1.1, 0), mode="reflect", truncate=3.0
  )
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_motion_kernel_is_the_rotated_diagonal():
  k = ultramim.motion_kernel(24, 45.0)
  # cv2.getRotationMatrix2D((12, 12), 45, 1) + warpAffine, via scikit-image: counter-clockwise about (12, 12).
  ref = skimage.transform.rotate(
    np.eye(24), 45, center=(12, 12), order=1, mode="constant", preserve_range=True
  )
  np.testing.assert_allclose(k, ref / 24, atol=1e-6)
  # The official 45 degrees turn the -45 degree diagonal into a horizontal line through the anchor.
  assert k.sum(1).argmax() == 12 and k[12].sum() > 0.9 * k.sum()
  np.testing.assert_allclose(ultramim.motion_kernel(24, 0.0), np.eye(24) / 24, atol=1e-7)


@pytest.mark.parametrize("length,angle", [(24, 45.0), (24, 30.0), (7, 100.0)])
def test_motion_blur_is_filter2d_then_minmax_stretch(length, angle):
  images = np.random.default_rng(3).random((2, 40, 32, 3)).astype(np.float32)
  k = ultramim.motion_kernel(length, angle).astype(np.float64)
  # cv2.filter2D is a correlation anchored at (L//2, L//2) with reflect-101 borders (scipy 'mirror').
  ref = np.stack(
    [
      scipy.ndimage.correlate(images[..., c].astype(np.float64), k[None], mode="mirror")
      for c in range(3)
    ],
    -1,
  )
  lo, hi = ref.min((1, 2, 3), keepdims=True), ref.max((1, 2, 3), keepdims=True)
  got = np.asarray(ultramim.motion_blur(images, length, angle))
  np.testing.assert_allclose(got, (ref - lo) / (hi - lo), atol=1e-4)
  flat = np.full((1, 32, 32, 1), 0.7, np.float32)
  assert np.all(
    np.asarray(ultramim.motion_blur(flat, length, angle)) == 0
  )  # cv2.normalize of a constant


# ------------------------------------------------------------------------------------------ scan mode


def fan_reference(h, w, fan_deg, r0):
  """Independent layout for fans of at most 180 degrees: (apex row, apex col, scale, inside mask [H, W]).

  The fan's bounding box runs from the inner arc's ends (r0 cos(fan/2) below the apex) to the outer
  arc's lowest point (r0 + h below it) and 2 (r0 + h) sin(fan/2) across.
  """
  half = np.deg2rad(fan_deg / 2)
  outer = r0 + h
  scale = min(w / (2 * outer * np.sin(half)), h / (outer - r0 * np.cos(half)))
  apex_row = -r0 * np.cos(half) * scale - 0.5
  apex_col = (w - 1) / 2
  rr, cc = np.mgrid[0:h, 0:w]
  dist = np.hypot(rr - apex_row, cc - apex_col) / scale
  angle = np.arctan2(cc - apex_col, rr - apex_row)
  inside = (dist >= r0) & (dist <= outer) & (np.abs(angle) <= half)
  return apex_row, apex_col, scale, inside


def smooth_image(h, w, c=1):
  y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
  img = 0.5 + 0.2 * np.sin(2 * np.pi * y) * np.cos(np.pi * x) + 0.1 * x
  return np.repeat(img[None, ..., None], c, -1).astype(np.float32)


@pytest.mark.parametrize("fan,r0,size,tol", [(90.0, 32.0, 64, 0.004), (160.0, 120.0, 96, 0.005)])
@pytest.mark.parametrize("orientation", ultramim.ORIENTATIONS)
def test_linear_convex_linear_round_trip(fan, r0, size, tol, orientation):
  img = smooth_image(size, size, 3)
  there = ultramim.linear_to_convex(img, fan, r0, orientation)
  back = np.asarray(ultramim.convex_to_linear(there, fan, r0, orientation))
  inner = (slice(None), slice(3, -3), slice(3, -3))
  assert np.abs(back - img)[inner].mean() < tol


def test_convex_matches_skimage_warp_with_independent_inverse_map():
  h, w, fan, r0 = 64, 80, 120.0, 24.0
  img = (
    smooth_image(h, w)[0, ..., 0] + np.random.default_rng(0).random((h, w)).astype(np.float32) * 0.2
  )
  apex_row, apex_col, scale, inside = fan_reference(h, w, fan, r0)

  def inverse_map(colrow):  # output (col, row) -> source (col, row)
    dc, dr = colrow[:, 0] - apex_col, colrow[:, 1] - apex_row
    depth = np.hypot(dc, dr) / scale - r0 - 0.5
    lateral = (np.degrees(np.arctan2(dc, dr)) + fan / 2) / fan * w - 0.5
    return np.stack([lateral, depth], 1)

  ref = skimage.transform.warp(img.astype(np.float64), inverse_map, order=1, mode="edge") * inside
  got = np.asarray(ultramim.linear_to_convex(img[None, ..., None], fan, r0))[0, ..., 0]
  assert inside.mean() > 0.3
  np.testing.assert_allclose(got, ref, atol=1e-4)


def test_rows_land_on_arcs_and_columns_on_rays():
  h = w = 64
  fan, r0 = 120.0, 24.0
  apex_row, apex_col, scale, _ = fan_reference(h, w, fan, r0)
  radius = (r0 + h) * scale + 2
  for row in (0, 31, 63):
    img = np.zeros((1, h, w, 1), np.float32)
    img[0, row] = 1.0
    convex = np.asarray(ultramim.linear_to_convex(img, fan, r0))[0, ..., 0]
    polar = skimage.transform.warp_polar(
      convex, center=(apex_row, apex_col), radius=radius, output_shape=(720, int(4 * radius))
    )
    found = polar.sum(0).argmax() / (polar.shape[1] / radius)
    assert abs(found - (r0 + row + 0.5) * scale) < 0.5, row
  for col in (0, 20, 63):
    img = np.zeros((1, h, w, 1), np.float32)
    img[0, :, col] = 1.0
    convex = np.asarray(ultramim.linear_to_convex(img, fan, r0))[0, ..., 0]
    polar = skimage.transform.warp_polar(
      convex, center=(apex_row, apex_col), radius=radius, output_shape=(720, int(4 * radius))
    )
    # warp_polar's angle runs from +col towards +row; the fan's from the downward vertical towards +col.
    found = 90.0 - polar.sum(1).argmax() / 2.0
    assert abs(found - (-fan / 2 + fan * (col + 0.5) / w)) < 1.5, col


def test_outside_the_fan_is_zero():
  h, w, fan, r0 = 64, 64, 160.0, 120.0
  convex = np.asarray(jax.jit(ultramim.linear_to_convex)(np.ones((2, h, w, 3), np.float32)))
  *_, inside = fan_reference(h, w, fan, r0)
  assert np.all(convex[:, ~inside] == 0) and np.allclose(convex[:, inside], 1)


def bright(h, w, row=None, col=None):
  img = np.zeros((1, h, w, 1), np.float32)
  img[0, slice(None) if row is None else row, slice(None) if col is None else col] = 1.0
  return img


def mean_distance(convex, centre):
  rr, cc = np.nonzero(convex > 0.5)
  return np.hypot(rr - centre[0], cc - centre[1]).mean()


def test_near_field_sits_at_the_apex_by_default_and_on_the_outer_arc_in_official_code():
  h = w = 64
  r0 = 16.0

  def warp(img, orientation):
    return np.asarray(ultramim.linear_to_convex(img, 160.0, r0, orientation))[0, ..., 0]

  apex = fan_reference(h, w, 160.0, r0)[:2]
  near, far = warp(bright(h, w, row=0), "correct"), warp(bright(h, w, row=h - 1), "correct")
  assert mean_distance(near, apex) + 20 < mean_distance(far, apex)
  centre = (
    h / 2 - 0.5,
    w / 2 - 0.5,
  )  # the official apex: the canvas centre, which the resize keeps
  near, far = (
    warp(bright(h, w, row=0), "official_code"),
    warp(bright(h, w, row=h - 1), "official_code"),
  )
  assert mean_distance(near, centre) > mean_distance(far, centre) + 20
  assert np.all(np.nonzero(near)[0] >= h / 2 - 1)  # the fan fills only the lower half
  assert np.nonzero(warp(bright(h, w, col=0), "official_code") > 0.5)[1].mean() > w / 2  # mirrored
  assert np.nonzero(warp(bright(h, w, col=0), "correct") > 0.5)[1].mean() < w / 2
  # The official band of uint8 value 1 fills the fan inside the inner radius.
  assert near[int(centre[0]) + 4, int(centre[1])] == pytest.approx(1 / 255)


@pytest.mark.parametrize(
  "kwargs,name",
  [
    (dict(fan_angle_deg=0.0), "fan_angle_deg"),
    (dict(fan_angle_deg=360.0), "fan_angle_deg"),
    (dict(inner_radius=-1.0), "inner_radius"),
    (dict(orientation="flipped"), "orientation"),
  ],
)
def test_scanmode_rejects_bad_arguments(kwargs, name):
  img = np.zeros((1, 16, 16, 1), np.float32)
  for fn in (ultramim.linear_to_convex, ultramim.convex_to_linear):
    with pytest.raises(ValueError, match=name):
      fn(img, **kwargs)


@pytest.mark.parametrize("orientation", ultramim.ORIENTATIONS)
def test_scanmode_host_numpy_path_equals_device_path(orientation):
  # Data pipelines warp SMAT partners on the host with scipy; it must be the same warp as on device.
  img = np.random.default_rng(3).uniform(0, 1, (2, 40, 56, 3)).astype(np.float32)
  for fn in (ultramim.linear_to_convex, ultramim.convex_to_linear):
    host = fn(img, 150.0, 20.0, orientation)
    device = np.asarray(fn(jnp.asarray(img), 150.0, 20.0, orientation))
    assert isinstance(host, np.ndarray) and host.dtype == np.float32
    np.testing.assert_allclose(host, device, atol=1e-5)


# ------------------------------------------------------------------------- SMAT with each image's own fan

# (fan angle, apex radius in depths, image size, padding (top, left)): the padding moves the apex.
PHANTOM_FANS = [
  (50.0, 0.4, 96, (6, 0)),
  (90.0, 0.25, 96, (4, 17)),
  (130.0, 0.5, 96, (9, 5)),
  (60.0, 0.3, 128, (0, 0)),
]  # the last: the phantom's default fan, touching the top


GOOD_FAN = dict(apex_x=50.0, apex_y=-10.0, fan_angle_deg=60.0, inner_radius=10.0, outer_radius=90.0)
BAD_FAN_FIELDS = [
  *(
    (field, value, f"{field}={value!r}") for field in GOOD_FAN for value in ("wide", None, math.inf)
  ),
  ("apex_y", math.nan, "apex_y=nan"),
  ("fan_angle_deg", 0, r"fan_angle_deg=0.0 is not in \(0, 360\)"),
  ("fan_angle_deg", 360.0, r"fan_angle_deg=360.0 is not in \(0, 360\)"),
  ("inner_radius", -1, "inner_radius=-1.0 is below 0"),
  ("outer_radius", 10.0, "outer_radius=10.0 is not above inner_radius=10.0"),
]


@pytest.mark.parametrize("field,value,match", BAD_FAN_FIELDS)
def test_check_fan_names_the_bad_field_and_value(field, value, match):
  bad = dict(GOOD_FAN, **{field: value})
  for fan in (bad, tuple(bad.values()), list(bad.values())):  # a record's dict, a Fan's fields
    with pytest.raises(ValueError, match=rf"^fan of a\.png: {match}"):
      geometry.check_fan(fan, "fan of a.png")
  assert geometry.check_fan(GOOD_FAN) == geometry.Fan(**GOOD_FAN)


@pytest.mark.parametrize(
  "fan,match",
  [
    ({k: v for k, v in GOOD_FAN.items() if k != "outer_radius"}, r"lacks \['outer_radius'\]"),
    (tuple(GOOD_FAN.values())[:4], r"is \(50.0, -10.0, 60.0, 10.0\); a fan needs the 5 values"),
    (60.0, "is 60.0; a fan needs the 5 values"),
  ],
)
def test_check_fan_names_a_missing_field_or_wrong_shape(fan, match):
  with pytest.raises(ValueError, match=match):
    geometry.check_fan(fan)


def assert_fan_close(got, truth):
  """The issue's tolerance: angle within 2 degrees, radii within 2%, apex within 2% of the outer radius."""
  assert abs(got.fan_angle_deg - truth.fan_angle_deg) <= 2.0, (got, truth)
  for name in ("inner_radius", "outer_radius"):
    assert abs(getattr(got, name) / getattr(truth, name) - 1) <= 0.02, (name, got, truth)
  assert np.hypot(got.apex_x - truth.apex_x, got.apex_y - truth.apex_y) <= 0.02 * truth.outer_radius


def padded_phantom(fan, apex_radius, size, pad, organ="kidney", seed=1):
  rec = phantom.generate(
    np.random.default_rng(seed), organ, "convex", size, fan_angle_deg=fan, apex_radius=apex_radius
  )
  f = geometry.check_fan(rec["fan"])
  image = np.pad(rec["image"], ((pad[0], 2), (pad[1], 3)))
  return image, f._replace(apex_x=f.apex_x + pad[1], apex_y=f.apex_y + pad[0])


@pytest.mark.parametrize("fan,apex_radius,size,pad", PHANTOM_FANS)
def test_phantom_fan_round_trip_never_uses_pixels_outside_the_fan(fan, apex_radius, size, pad):
  image, truth = padded_phantom(fan, apex_radius, size, pad)
  inside = geometry.fan_mask(truth, image.shape)
  # The recorded geometry is exactly the drawn fan: the phantom leaves 0 only outside it.
  np.testing.assert_array_equal(inside, image > 0)
  # Outside the fan a sentinel no bilinear mix of grey levels can reach.
  marked = np.where(inside, image, 1000.0).astype(np.float32)
  linear = ultramim.sector_to_linear(marked, truth)
  assert linear.shape == image.shape and 1.0 <= linear.min() and linear.max() <= 255.0
  back = ultramim.linear_to_sector(linear, truth, image.shape)
  assert np.all(back[~inside] == 0) and back.max() <= 255.0
  core = scipy.ndimage.binary_erosion(inside, iterations=2)
  assert np.corrcoef(back[core], image[core])[0, 1] > 0.95
  # The same from the geometry estimated from the pixels alone.
  estimated = ultramim.estimate_fan(image)
  assert_fan_close(estimated, truth)
  linear = ultramim.sector_to_linear(marked, estimated, valid=geometry.support(image))
  assert 1.0 <= linear.min() and linear.max() <= 255.0


def test_sector_to_linear_rows_are_arcs_and_columns_are_rays():
  # Independent of the warp: draw a ring and a ray analytically in an image with a known fan.
  truth = geometry.Fan(
    apex_x=41.0, apex_y=-12.0, fan_angle_deg=70.0, inner_radius=20.0, outer_radius=80.0
  )
  r, theta = geometry.polar(truth, (72, 90))
  ring = (np.abs(r - 50.0) < 1.0).astype(np.float32)
  ray = (np.abs(np.degrees(theta) - 14.0) < 0.8).astype(np.float32)
  h = w = 60
  rows = ultramim.sector_to_linear(ring * geometry.fan_mask(truth, ring.shape), truth, (h, w))
  cols = ultramim.sector_to_linear(ray * geometry.fan_mask(truth, ray.shape), truth, (h, w))
  assert abs(rows.mean(1).argmax() - ((50.0 - 20.0) / 60.0 * h - 0.5)) <= 1
  assert abs(cols.mean(0).argmax() - ((14.0 + 35.0) / 70.0 * w - 0.5)) <= 1
  # 'official_code' is the inverse of the official linear_to_convex: both axes reversed.
  flipped = ultramim.sector_to_linear(
    ring * geometry.fan_mask(truth, ring.shape), truth, (h, w), orientation="official_code"
  )
  np.testing.assert_allclose(flipped, rows[::-1, ::-1], atol=1e-5)


def speckle_sector_with_text(fan, shape=(140, 200), seed=0):
  """A convex-looking image: log-compressed speckle in the fan with an anechoic (black) cyst,
  black around it, burnt-in text, a depth ruler and a grey-level bar outside it and a caliper
  cross inside."""
  rng = np.random.default_rng(seed)
  envelope = phantom.speckle_envelope(rng, (96, 96))
  grey = np.clip(255 * (1 + 20 * np.log10(envelope + 1e-6) / 50) - 20, 0, 255)
  y, x = np.mgrid[0:96, 0:96]
  grey[np.hypot(y - 60, x - 30) < 7] = 0
  image = np.rint(ultramim.linear_to_sector(grey.astype(np.float32), fan, shape)).astype(np.uint8)
  canvas = Image.fromarray(image)
  draw = ImageDraw.Draw(canvas)
  draw.text((2, 1), "C5-2", fill=255)
  draw.text((shape[1] - 40, 2), "GN 58", fill=200)
  draw.text((3, shape[0] - 12), "D 14cm", fill=255)
  draw.rectangle((shape[1] - 6, 30, shape[1] - 3, 90), fill=128)  # grey bar, 4 px wide
  for y in range(20, shape[0] - 20, 10):  # depth ruler ticks
    draw.point((shape[1] - 10, y), fill=255)
  cx, cy = int(fan.apex_x), int(fan.apex_y + (fan.inner_radius + fan.outer_radius) / 2)
  draw.line((cx - 3, cy, cx + 3, cy), fill=255)
  draw.line((cx, cy - 3, cx, cy + 3), fill=255)
  return np.asarray(canvas)


def test_speckle_sector_with_burnt_in_text_gets_its_fan():
  truth = geometry.Fan(
    apex_x=100.0, apex_y=-20.0, fan_angle_deg=70.0, inner_radius=35.0, outer_radius=135.0
  )
  image = speckle_sector_with_text(truth)
  assert image[:12, :40].max() > 0  # the text is there, outside the fan
  estimated = ultramim.estimate_fan(image)
  assert_fan_close(estimated, truth)
  partner = ultramim.sector_to_linear(image, estimated, valid=geometry.support(image))
  black = np.rint(partner) == 0
  assert 0.005 < black.mean() < 0.05  # the cyst, and nothing of the surround
  rgb = np.stack([image, image // 2, image // 3], -1)  # colour images: one fan, warped per channel
  assert ultramim.estimate_fan(rgb) == estimated
  got = ultramim.sector_to_linear(rgb, estimated, valid=geometry.support(rgb))
  for c in range(3):
    np.testing.assert_allclose(
      got[..., c],
      ultramim.sector_to_linear(rgb[..., c], estimated, valid=geometry.support(image)),
      atol=1e-4,
    )


def test_real_convex_images_get_a_sensible_fan_or_a_clear_refusal(real_us):
  names = [
    "hc18/images/110_HC.png",
    "hc18/images/100_2HC.png",
    "hc18_more/images/train/004_HC.png",
    "hc18_more/images/train/008_HC.png",
  ]
  paths = [real_us / n for n in names if (real_us / n).exists()]
  if not paths:
    pytest.skip("none of the chosen HC18 frames is present")
  fans = 0
  for path in paths:
    image = np.asarray(Image.open(path))
    try:
      fan = ultramim.estimate_fan(image)
    except ultramim.NotASector as e:
      assert str(e).startswith(("not a sector", "mostly black")), (path, e)
      continue
    fans += 1
    echoes = geometry.support(image)
    rows = np.nonzero(echoes)[0]
    assert fan.apex_y < rows.min() and 20.0 < fan.fan_angle_deg < 180.0, (path, fan)
    # The fan's deepest point on the axis is where the echoes end in that column.
    column = echoes[:, round(fan.apex_x)]
    if column[-1] == 0:
      deepest = np.nonzero(column)[0].max()
      assert abs(fan.apex_y + fan.outer_radius - deepest) < 0.02 * fan.outer_radius, path
    partner = ultramim.sector_to_linear(image, fan, valid=echoes)
    assert np.mean(partner.max(-1) if partner.ndim == 3 else partner) > 10, path  # not black
  assert fans >= 1


def test_linear_and_black_images_are_refused():
  linear = phantom.generate(np.random.default_rng(0), "thyroid", "linear", 64)["image"]
  with pytest.raises(ultramim.NotASector, match="bounding box"):
    ultramim.estimate_fan(linear)
  framed = np.pad(linear, ((10, 20), (15, 15)))  # a linear image on a black screen
  with pytest.raises(ultramim.NotASector, match="bounding box"):
    ultramim.estimate_fan(framed)
  black = np.zeros((64, 64), np.uint8)
  black[30:36, 30:36] = 200
  with pytest.raises(ultramim.NotASector, match="mostly black"):
    ultramim.estimate_fan(black)


def test_real_linear_images_are_refused(real_us):
  busi = sorted((real_us / "busi_seg" / "images").rglob("*.png"))[:3]  # breast: linear probes
  assert busi
  for path in busi:
    with pytest.raises(ultramim.NotASector, match="bounding box"):
      ultramim.estimate_fan(np.asarray(Image.open(path)))


FAN_HEADER = "image,probe,apex_x,apex_y,fan_angle_deg,inner_radius,outer_radius\n"


def write_manifest(tmp_path, lines, header=FAN_HEADER):
  for i in range(3):
    Image.fromarray(np.full((8, 8), 9, np.uint8)).save(tmp_path / f"{i}.png")
  path = tmp_path / "m.csv"
  path.write_text(header + "".join(line + "\n" for line in lines))
  return path


def test_manifest_fan_columns_are_parsed(tmp_path):
  path = write_manifest(
    tmp_path, ["0.png,convex,31.5,-20,75,40.5,150", "1.png,convex,,,,,", "2.png,linear,,,,,"]
  )
  (client,) = sources.manifest_clients(path)
  assert client[0]["fan"] == dict(
    apex_x=31.5, apex_y=-20.0, fan_angle_deg=75.0, inner_radius=40.5, outer_radius=150.0
  )
  assert "fan" not in client[1] and "fan" not in client[2]


@pytest.mark.parametrize(
  "line,message",
  [
    ("0.png,convex,31.5,-20,wide,40,150", r"line 2: fan_angle_deg='wide' is not a number"),
    ("0.png,convex,31.5,-20,75,,150", r"line 2: fan geometry \['inner_radius'\] empty"),
    ("0.png,linear,31.5,-20,75,40,150", r"line 2: fan geometry given for probe 'linear'"),
    ("0.png,convex,31.5,-20,75,150,40", r"line 2: outer_radius=40.0 is not above"),
    ("0.png,convex,31.5,-20,400,40,150", r"line 2: fan_angle_deg=400.0 is not in"),
    ("0.png,convex,nan,-20,75,40,150", r"line 2: apex_x=nan is not a finite number"),
  ],
)
def test_bad_manifest_fan_is_refused_naming_file_and_line(tmp_path, line, message):
  path = write_manifest(tmp_path, [line, "1.png,convex,,,,,"])
  with pytest.raises(ValueError, match=r"m\.csv " + message):
    sources.manifest_clients(path)


def test_manifest_with_some_fan_columns_is_refused(tmp_path):
  path = write_manifest(tmp_path, ["0.png,convex,31.5,-20"], header="image,probe,apex_x,apex_y\n")
  with pytest.raises(ValueError, match=r"m\.csv has fan geometry columns \['apex_x', 'apex_y'\]"):
    sources.manifest_clients(path)


def smat_config(**overrides):
  from ultrajax import configlib

  config = configlib.load_config_module(
    pathlib.Path(__file__).parents[1] / "configs" / "pretrain_fed.py"
  ).get_config("smoke")
  config.update_from_flattened_dict(overrides)
  return config


@pytest.mark.parametrize("ratio,fraction", [(1.0, 1.0), (0.5, 1.0), (2.0, 0.5), (0.0, 0.25)])
def test_smat_ratio_and_data_fraction_give_the_right_counts(ratio, fraction):
  from ultrajax import pretrain_checks
  from ultrajax.data import clients as clients_lib

  config = smat_config(**{"ultramim.smat_ratio": ratio, "data.fraction": fraction})
  pretrain_checks.validate(config)
  clients = clients_lib.client_sources(config)
  full = sources.default_client_sources(
    scale=0.0, image_size=48, seed=0, num_clients=2, min_images=16
  )
  assert [c.name for c in clients] == [c.name for c in full]
  for client, source in zip(clients, full):
    real = max(1, round(fraction * len(source)))
    assert len(client) == real + round(ratio * real)
  # The kept images are a seeded subset of the client's own, and the same on every call.
  if fraction < 1:
    kept = clients[0] if ratio == 0 else clients[0].source
    again = clients_lib.client_sources(config)[0]
    again = again if ratio == 0 else again.source
    assert kept.indices == again.indices and len(set(kept.indices)) == len(kept)
    np.testing.assert_array_equal(kept[1]["image"], full[0][kept.indices[1]]["image"])
    other_seed = clients_lib.client_sources(smat_config(**{"data.fraction": fraction, "seed": 1}))
    assert other_seed[0].source.indices != kept.indices


def test_partial_smat_ratio_converts_a_seeded_subset_once_each():
  source = sources.PhantomSource("site", "liver", "convex", 10, 32, seed=0)
  half = pipeline.ScanModePartners(source, lambda r: dict(r, probe="linear"), 0.5, seed=3)
  assert len(half) == 15 and len(set(half.of.tolist())) == 5
  assert half.of.tolist() == pipeline.ScanModePartners(source, dict, 0.5, seed=3).of.tolist()
  assert half.of.tolist() != pipeline.ScanModePartners(source, dict, 0.5, seed=4).of.tolist()
  twice = pipeline.ScanModePartners(source, dict, 2.0)
  assert len(twice) == 30 and np.bincount(twice.of).tolist() == [2] * 10
  with pytest.raises(ValueError, match="ratio"):
    pipeline.ScanModePartners(source, dict, -1.0)


def test_bad_smat_ratio_and_fraction_name_the_field():
  from ultrajax import configlib, pretrain_checks

  for field, value in (
    ("ultramim.smat_ratio", -1.0),
    ("data.fraction", 1.5),
    ("data.fraction", 0.0),
  ):
    with pytest.raises(configlib.ConfigError, match=field.replace(".", r"\.")):
      pretrain_checks.validate(smat_config(**{field: value}))


def test_smat_partners_of_phantom_clients_have_no_black_and_real_refusals_stay_real():
  from ultrajax.data import clients as clients_lib

  partner = functools.partial(
    clients_lib._smat_partner,
    fan_angle_deg=160.0,
    inner_radius=16.0,
    orientation="correct",
    default_probe="",
  )
  convex = sources.PhantomSource("CLUST", "liver", "convex", 2, 48, seed=0)[0]
  linear = partner(convex)
  assert linear["probe"] == "linear" and "fan" not in linear and linear["image"].shape == (48, 48)
  assert np.mean(linear["image"] == 0) == 0  # one global 160-degree fan left ~40% black
  estimated = partner({k: v for k, v in convex.items() if k != "fan"})
  assert np.mean(estimated["image"] == 0) == 0
  breast = sources.PhantomSource("BUV", "breast", "linear", 2, 48, seed=0)[0]
  fan = partner(breast)
  assert fan["probe"] == "convex" and np.mean(fan["image"] == 0) > 0.2
  # A linear image labelled convex has no fan: no partner (the pipeline keeps the real image).
  assert partner(dict(breast, probe="convex", path="/data/mislabelled.png")) is None
