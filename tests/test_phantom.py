"""The synthetic phantom against statistics and geometry that hold whatever its tissue models."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.measure import regionprops

from ultrajax.data import phantom

RAYLEIGH_SNR = math.sqrt(math.pi / (4 - math.pi))  # 1.913


def _gen(seed, organ="liver", probe="linear", size=64):
  return phantom.generate(np.random.default_rng(seed), organ, probe, size)


def test_same_seed_same_image_other_seed_other_image():
  a, b, c = _gen(3, "breast", "convex"), _gen(3, "breast", "convex"), _gen(4, "breast", "convex")
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["image"], c["image"])


@pytest.mark.parametrize("probe", phantom.PROBES)
def test_every_organ_shapes_dtypes_and_masks(probe):
  size = 48
  for organ in phantom.ORGANS:
    for seed in range(3):
      r = _gen(seed, organ, probe, size)
      assert r["organ"] == organ and r["probe"] == probe
      for k in ("image", "organ_mask", "lesion_mask"):
        assert r[k].shape == (size, size) and r[k].dtype == np.uint8, (organ, k)
      assert set(np.unique(r["organ_mask"])) <= {0, 1} and set(np.unique(r["lesion_mask"])) <= {
        0,
        1,
      }
      assert r["organ_mask"].any(), organ
      assert isinstance(r["label"], int) and 0 <= r["label"] < len(phantom.LABELS)
      # A lesion exactly when the label says so, and only inside the organ.
      assert r["lesion_mask"].any() == (r["label"] > 0), (organ, seed)
      assert not (r["lesion_mask"] & (1 - r["organ_mask"])).any(), (organ, seed)


def test_every_label_occurs():
  labels = {_gen(s)["label"] for s in range(30)}
  assert labels == {0, 1, 2}


def test_convex_is_black_outside_the_fan_only():
  for organ in ("liver", "fetal_head", "heart"):
    r = _gen(1, organ, "convex", 96)
    img = r["image"]
    assert img[0, 0] == img[0, -1] == img[-1, 0] == img[-1, -1] == 0
    assert img[48, 48] > 0
    # A sector widens with depth: more pixels with data in each deeper row of its upper part.
    width = (img > 0).sum(axis=1)
    assert np.all(np.diff(width[2:40]) >= 0) and width[39] > width[2] + 20
    # Masks never reach outside the scanned region.
    assert not ((r["organ_mask"] | r["lesion_mask"]) & (img == 0)).any()
  # A linear probe has echo data everywhere (grey 0 is reserved for "no data").
  assert _gen(1, "fetal_head", "linear", 96)["image"].min() >= 1


@pytest.mark.parametrize("psf_sigma", [(1.0, 2.0), (2.0, 3.0)])
def test_fully_developed_speckle_is_rayleigh(psf_sigma):
  env = phantom.speckle_envelope(np.random.default_rng(0), (512, 512), psf_sigma).astype(np.float64)
  assert env.shape == (512, 512)
  snr = env.mean() / env.std()
  assert abs(snr - RAYLEIGH_SNR) < 0.05 * RAYLEIGH_SNR, snr
  # Rayleigh envelope <=> exponential intensity: P(I > mean I) = 1/e.
  intensity = env**2
  assert abs((intensity > intensity.mean()).mean() - math.exp(-1)) < 0.02


def test_malignant_lesions_are_less_solid_than_benign():
  solidity = {1: [], 2: []}
  seed = 0
  while min(len(v) for v in solidity.values()) < 10:
    r = _gen(seed, "breast", ("linear", "convex")[seed % 2], 128)
    seed += 1
    if r["label"]:
      mask = r["lesion_mask"].astype(int)
      solidity[r["label"]].append(regionprops(mask)[0].solidity)
  benign, malignant = np.mean(solidity[1]), np.mean(solidity[2])
  assert benign > 0.9 and malignant < benign - 0.15, (benign, malignant)


def test_malignant_lesions_cast_shadows():
  """Behind a malignant lesion the image is darker than beside it at the same depths."""
  contrasts = []
  seed = 0
  while len(contrasts) < 8:
    r = _gen(seed, "liver", "linear", 128)
    seed += 1
    if r["label"] != 2:
      continue
    rows, cols = np.nonzero(r["lesion_mask"])
    below = slice(rows.max() + 3, min(rows.max() + 30, 128))
    lo, hi = cols.min(), cols.max() + 1
    img = r["image"].astype(float)
    beside = np.concatenate(
      [img[below, max(lo - 20, 0) : max(lo - 5, 0)], img[below, hi + 5 : hi + 20]], axis=1
    )
    contrasts.append(img[below, lo:hi].mean() - beside.mean())
  assert np.median(contrasts) < -10, contrasts


def test_log_compression_spans_the_grey_range():
  for organ in ("liver", "breast", "kidney", "lung"):
    for seed in range(3):
      img = _gen(seed, organ, "linear", 128)["image"]
      lo, hi = np.percentile(img, (1, 99))
      assert hi - lo > 120, (organ, lo, hi)
      assert (img == 255).mean() < 0.01, organ  # not clipped white


def test_bad_arguments_name_themselves():
  with pytest.raises(ValueError, match="organ"):
    _gen(0, "spleen")
  with pytest.raises(ValueError, match="probe"):
    _gen(0, "liver", "phased")
