"""UltraMIM ops against independent references: scipy/numpy filters, exact sampling probabilities,
binomial frequencies, scikit-image rotations and polar warps."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import skimage.transform

from ultrajax import ultramim

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
        patch = grey[n, i * p:(i + 1) * p, j * p:(j + 1) * p]
        lap = scipy.ndimage.convolve(patch, CV2_LAPLACIAN_K3, mode="mirror")
        out[n, i * (w // p) + j] = np.minimum(np.abs(lap), 255).mean()
  return out


def structured_images(h=32, w=32):
  """Checkerboard, stripes, a flat field and a smooth ramp, as [4, H, W, 3] grey."""
  y, x = np.mgrid[0:h, 0:w]
  imgs = [((y // 2 + x // 3) % 2).astype(float), (x % 4 < 2) * 0.8, np.full((h, w), 0.3), x / w * 0.5 + y / h * 0.5]
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
  c = ultramim.default_corruption_config()
  c.update(overrides)
  return c


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
    x = images[n:n + 1]
    if which[n, 0]:
      x = ultramim.motion_blur(x, 24, 45.0)
    if which[n, 1]:
      x = ultramim.gaussian_blur(x, 1.1)
    if which[n, 2]:
      # The noise mask is drawn for the whole batch; take this image's slice.
      x = ultramim.salt_and_pepper(k_noise, jnp.broadcast_to(x, images.shape), 0.1)[n:n + 1]
    np.testing.assert_allclose(got[n:n + 1], x, atol=1e-6)


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
  ref = scipy.ndimage.gaussian_filter(images.astype(np.float64), (0, 1.1, 1.1, 0), mode="reflect", truncate=3.0)
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_motion_kernel_is_the_rotated_diagonal():
  k = ultramim.motion_kernel(24, 45.0)
  # cv2.getRotationMatrix2D((12, 12), 45, 1) + warpAffine, via scikit-image: counter-clockwise about (12, 12).
  ref = skimage.transform.rotate(np.eye(24), 45, center=(12, 12), order=1, mode="constant", preserve_range=True)
  np.testing.assert_allclose(k, ref / 24, atol=1e-6)
  # The official 45 degrees turn the -45 degree diagonal into a horizontal line through the anchor.
  assert k.sum(1).argmax() == 12 and k[12].sum() > 0.9 * k.sum()
  np.testing.assert_allclose(ultramim.motion_kernel(24, 0.0), np.eye(24) / 24, atol=1e-7)


@pytest.mark.parametrize("length,angle", [(24, 45.0), (24, 30.0), (7, 100.0)])
def test_motion_blur_is_filter2d_then_minmax_stretch(length, angle):
  images = np.random.default_rng(3).random((2, 40, 32, 3)).astype(np.float32)
  k = ultramim.motion_kernel(length, angle).astype(np.float64)
  # cv2.filter2D is a correlation anchored at (L//2, L//2) with reflect-101 borders (scipy 'mirror').
  ref = np.stack([scipy.ndimage.correlate(images[..., c].astype(np.float64), k[None], mode="mirror")
                  for c in range(3)], -1)
  lo, hi = ref.min((1, 2, 3), keepdims=True), ref.max((1, 2, 3), keepdims=True)
  got = np.asarray(ultramim.motion_blur(images, length, angle))
  np.testing.assert_allclose(got, (ref - lo) / (hi - lo), atol=1e-4)
  flat = np.full((1, 32, 32, 1), 0.7, np.float32)
  assert np.all(np.asarray(ultramim.motion_blur(flat, length, angle)) == 0)  # cv2.normalize of a constant


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
  img = smooth_image(h, w)[0, ..., 0] + np.random.default_rng(0).random((h, w)).astype(np.float32) * 0.2
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
    polar = skimage.transform.warp_polar(convex, center=(apex_row, apex_col), radius=radius,
                                         output_shape=(720, int(4 * radius)))
    found = polar.sum(0).argmax() / (polar.shape[1] / radius)
    assert abs(found - (r0 + row + 0.5) * scale) < 0.5, row
  for col in (0, 20, 63):
    img = np.zeros((1, h, w, 1), np.float32)
    img[0, :, col] = 1.0
    convex = np.asarray(ultramim.linear_to_convex(img, fan, r0))[0, ..., 0]
    polar = skimage.transform.warp_polar(convex, center=(apex_row, apex_col), radius=radius,
                                         output_shape=(720, int(4 * radius)))
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
  centre = (h / 2 - 0.5, w / 2 - 0.5)  # the official apex: the canvas centre, which the resize keeps
  near, far = warp(bright(h, w, row=0), "official_code"), warp(bright(h, w, row=h - 1), "official_code")
  assert mean_distance(near, centre) > mean_distance(far, centre) + 20
  assert np.all(np.nonzero(near)[0] >= h / 2 - 1)  # the fan fills only the lower half
  assert np.nonzero(warp(bright(h, w, col=0), "official_code") > 0.5)[1].mean() > w / 2  # mirrored
  assert np.nonzero(warp(bright(h, w, col=0), "correct") > 0.5)[1].mean() < w / 2
  # The official band of uint8 value 1 fills the fan inside the inner radius.
  assert near[int(centre[0]) + 4, int(centre[1])] == pytest.approx(1 / 255)


@pytest.mark.parametrize("kwargs,name", [
    (dict(fan_angle_deg=0.0), "fan_angle_deg"), (dict(fan_angle_deg=360.0), "fan_angle_deg"),
    (dict(inner_radius=-1.0), "inner_radius"), (dict(orientation="flipped"), "orientation")])
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
