"""Host pipeline: torchvision's RandomResizedCrop, MAE augmentation, per-client Grain batches."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from ultrajax.data import pipeline


class _Source:
  """n records; record i is a constant image of value 10 i + 5 (so it survives any crop)."""

  def __init__(self, n, name="client", shape=(24, 30), probe=""):
    self.n, self.name, self.shape, self.probe = n, name, shape, probe

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": np.full(self.shape, 10 * i + 5, np.uint8), "path": f"{self.name}/{i}"}


class _GradientSource(_Source):
  """Like _Source, but with ramps, so crops and flips show in the pixels."""

  def __getitem__(self, i):
    h, w = self.shape[:2]
    image = ((np.add.outer(np.arange(h) * 3, np.arange(w) * 5) + 7 * i) % 256).astype(np.uint8)
    return {
      "image": np.broadcast_to(image[..., None], self.shape) if len(self.shape) == 3 else image
    }


def _ids(images):
  """uint8 [..., S, S, 3] constant images -> [...] record ids."""
  return (images[..., 0, 0, 0].astype(int) - 5) // 10


def _next(data, active):
  """One batch per active (client, step) slot: clients on their own lanes."""
  active = np.asarray(active, bool)
  return data.next_batches(np.where(active, np.arange(active.shape[0])[:, None], -1))


def _batches(sources, batch_size=4, image_size=8, **kwargs):
  kwargs = dict(seed=0, num_threads=2) | kwargs
  return pipeline.ClientBatches(sources, batch_size, image_size, **kwargs)


# ----------------------------------------------------------------------------- crop params
def test_rrc_params_stay_inside_image_and_in_range():
  rng = np.random.default_rng(0)
  height, width, area = 160, 200, 160 * 200
  for scale in [(0.2, 1.0), (0.5, 0.6), (1.0, 1.0)]:
    for _ in range(300):
      top, left, h, w = pipeline.random_resized_crop_params(rng, height, width, scale)
      assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
      # This image almost never falls back; allow for rounding w and h to integers.
      slack = (w + h) / area
      assert scale[0] - slack <= w * h / area <= scale[1] + slack
      assert 3 / 4 * (1 - 1 / h) <= w / h <= 4 / 3 * (1 + 1 / h)


@pytest.mark.parametrize(
  "height,width,expected",
  [
    (10, 1000, (0, 493, 10, 13)),  # too wide: centred crop at ratio 4/3
    (1000, 10, (493, 0, 13, 10)),  # too tall: centred crop at ratio 3/4
  ],
)
def test_rrc_params_fall_back_to_centre_crop(height, width, expected):
  rng = np.random.default_rng(0)
  assert pipeline.random_resized_crop_params(rng, height, width) == expected


@pytest.mark.parametrize("height,width", [(120, 160), (100, 300)])
def test_rrc_params_match_torchvision_statistics(height, width):
  torch = pytest.importorskip("torch")
  transforms = pytest.importorskip("torchvision.transforms")
  torch.manual_seed(0)
  rng, n = np.random.default_rng(0), 3000
  image = torch.empty(1, height, width)
  ours = np.array([pipeline.random_resized_crop_params(rng, height, width) for _ in range(n)])
  theirs = np.array(
    [transforms.RandomResizedCrop.get_params(image, (0.2, 1.0), (3 / 4, 4 / 3)) for _ in range(n)]
  )
  # (top, left, h, w, area, aspect): means agree within 4 standard errors of the difference.
  stats = lambda p: np.concatenate([p, p[:, 2:3] * p[:, 3:], p[:, 3:] / p[:, 2:3]], axis=1)
  a, b = stats(ours), stats(theirs)
  se = np.sqrt((a.var(0) + b.var(0)) / n)
  assert np.all(np.abs(a.mean(0) - b.mean(0)) < 4 * se), (a.mean(0), b.mean(0))


# ----------------------------------------------------------------------------- augment
@pytest.mark.parametrize("shape", [(30, 40), (30, 40, 1), (30, 40, 3)])
def test_augment_shape_and_dtype(shape):
  image = np.random.default_rng(0).integers(0, 256, shape, np.uint8)
  out = pipeline.augment(image, np.random.default_rng(1), 16)
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  if len(shape) == 2 or shape[-1] == 1:
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])


def test_augment_rejects_other_images():
  with pytest.raises(ValueError, match="uint8"):
    pipeline.augment(np.zeros((8, 8), np.float32), np.random.default_rng(0), 4)
  with pytest.raises(ValueError, match="uint8"):
    pipeline.augment(np.zeros((8, 8, 4), np.uint8), np.random.default_rng(0), 4)


@pytest.mark.parametrize("shape", [(37, 37), (37, 37, 3)])
def test_augment_full_square_crop_is_bicubic_resize(shape):
  image = np.random.default_rng(0).integers(0, 256, shape, np.uint8)
  expected = np.asarray(Image.fromarray(image).convert("RGB").resize((20, 20), Image.BICUBIC))
  for seed in range(5):
    out = pipeline.augment(image, np.random.default_rng(seed), 20, (1.0, 1.0), hflip=False)
    np.testing.assert_array_equal(out, expected)


def test_augment_flips_half_the_time():
  image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
  plain = pipeline.augment(image, np.random.default_rng(0), 16, (1.0, 1.0), hflip=False)
  outs = [pipeline.augment(image, np.random.default_rng(s), 16, (1.0, 1.0)) for s in range(200)]
  flipped = [np.array_equal(o, plain[:, ::-1]) for o in outs]
  assert all(f or np.array_equal(o, plain) for f, o in zip(flipped, outs))
  assert 70 < sum(flipped) < 130


def test_augment_matches_torchvision_on_deterministic_crop():
  pytest.importorskip("torch")
  transforms = pytest.importorskip("torchvision.transforms")
  # 3:1 with scale 1 never fits a ratio in [3/4, 4/3]: both take the centre fallback.
  image = np.random.default_rng(0).integers(0, 256, (30, 90), np.uint8)
  rrc = transforms.RandomResizedCrop(24, scale=(1.0, 1.0), interpolation=3)
  expected = np.asarray(rrc(Image.fromarray(image).convert("RGB")))
  out = pipeline.augment(image, np.random.default_rng(0), 24, (1.0, 1.0), hflip=False)
  np.testing.assert_array_equal(out, expected)


# ----------------------------------------------------------------------------- ClientBatches
def test_client_batches_shapes_and_counts():
  data = _batches([_Source(9, "a"), _Source(20, "b")], batch_size=4, image_size=8)
  assert data.num_images.tolist() == [9, 20] and data.steps_per_epoch.tolist() == [2, 5]
  chunk = _next(data, np.ones((2, 3), bool))
  assert chunk.shape == (2, 3, 4, 8, 8, 3) and chunk.dtype == np.uint8
  assert next(data).shape == (2, 4, 8, 8, 3)
  data.close()


def test_client_batches_errors():
  with pytest.raises(ValueError, match="at least one source"):
    _batches([])
  with pytest.raises(ValueError, match="batch_size=6"):
    _batches([_Source(12)], batch_size=6, process_count=4)
  with pytest.raises(ValueError, match="'tiny' has 3 images"):
    _batches([_Source(8, "big"), _Source(3, "tiny")], batch_size=4)
  data = _batches([_Source(8), _Source(8)])
  with pytest.raises(ValueError, match="client_ids"):
    _next(data, np.ones((3, 2), bool))
  with pytest.raises(ValueError, match="1 clients"):
    data.set_state({"clients": [{"next_index": 0}]})
  data.close()


def test_client_batches_deterministic_across_threads_and_prefetch():
  sources = [_GradientSource(10, "a", (40, 30)), _GradientSource(12, "b", (30, 40, 3))]
  a = _batches(sources, num_threads=1, prefetch_buffer_size=1)
  b = _batches(sources, num_threads=4, prefetch_buffer_size=7)
  active = np.ones((2, 3), bool)
  for _ in range(3):
    np.testing.assert_array_equal(_next(a, active), _next(b, active))
  a.close()
  b.close()


def test_client_batches_augment_each_record_differently():
  data = _batches([_GradientSource(4, shape=(40, 40))], batch_size=4, image_size=16)
  batch = next(data)[0]
  assert all(not np.array_equal(batch[i], batch[j]) for i in range(4) for j in range(i))
  data.close()


def test_client_batches_reshuffle_every_epoch():
  n, batch_size, epochs = 8, 4, 4
  data = _batches([_Source(n, "a"), _Source(n, "b")], batch_size=batch_size)
  ids = _ids(_next(data, np.ones((2, epochs * n // batch_size), bool)))
  orders = ids.reshape(2, epochs, n)  # [client, epoch, position]
  for order in orders.reshape(-1, n):
    assert sorted(order) == list(range(n))
  assert len({tuple(o) for o in orders.reshape(-1, n)}) == 2 * epochs
  data.close()


def test_process_slices_make_up_the_single_process_batch():
  sources = [_GradientSource(10, "a", (30, 30)), _GradientSource(13, "b", (30, 40, 3))]
  whole = _batches(sources, batch_size=6)
  parts = [_batches(sources, batch_size=6, process_index=p, process_count=3) for p in range(3)]
  active = np.ones((2, 4), bool)
  expected = _next(whole, active)
  got = np.concatenate([_next(p, active) for p in parts], axis=2)
  np.testing.assert_array_equal(got, expected)
  for d in [whole, *parts]:
    d.close()


def test_inactive_slots_are_zero_and_consume_nothing():
  sources = [_Source(12, "a"), _Source(12, "b")]
  reference = _next(_batches(sources), np.ones((2, 3), bool))
  data = _batches(sources)
  active = np.array([[True, False, True, False], [False, False, True, False]])
  chunk = _next(data, active)
  assert not chunk[~active].any()
  np.testing.assert_array_equal(chunk[0, [0, 2]], reference[0, :2])
  np.testing.assert_array_equal(chunk[1, 2], reference[1, 0])
  # Client 0 has used two batches, client 1 one.
  np.testing.assert_array_equal(next(data), np.stack([reference[0, 2], reference[1, 1]]))
  data.close()


def test_state_restore_continues_bitwise():
  sources = [_GradientSource(10, "a", (30, 30)), _GradientSource(7, "b", (30, 40, 3))]
  active = np.array([[True, True, True], [True, False, True]])
  data = _batches(sources, batch_size=3, num_threads=3)
  for _ in range(3):
    _next(data, active)
  state = json.loads(json.dumps(data.get_state()))
  expected = [_next(data, active) for _ in range(2)]
  restored = _batches(sources, batch_size=3, num_threads=1)
  restored.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(_next(restored, active), want)
  data.close()
  restored.close()


def test_worker_processes_give_the_same_batches_and_resume_bitwise():
  # One client on two Grain worker processes (they run batches 0, 2, ... and 1, 3, ...).
  sources = [_GradientSource(10, "a", (30, 30))]
  active = np.ones((1, 3), bool)
  reference = _batches(sources, batch_size=3, num_threads=1)
  expected = [_next(reference, active) for _ in range(3)]
  data = _batches(sources, batch_size=3, num_threads=1, worker_count=2)
  np.testing.assert_array_equal(_next(data, active), expected[0])
  state = json.loads(json.dumps(data.get_state()))
  restored = _batches(sources, batch_size=3, num_threads=1, worker_count=2)
  restored.set_state(state)
  for want in expected[1:]:
    np.testing.assert_array_equal(_next(restored, active), want)
  for d in (reference, data, restored):
    d.close()


def test_orbax_checkpoint_round_trip(tmp_path):
  grain = pytest.importorskip("grain")
  ocp = pytest.importorskip("orbax.checkpoint")
  sources = [_Source(9, "a"), _Source(11, "b")]
  active = np.ones((2, 2), bool)
  data = _batches(sources)
  _next(data, active)
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(data)))
    manager.wait_until_finished()
    expected = _next(data, active)
    restored = _batches(sources)
    manager.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  np.testing.assert_array_equal(_next(restored, active), expected)
  data.close()
  restored.close()


# ----------------------------------------------------------------------------- SMAT partners
def _to_convex(record):
  return dict(record, image=255 - record["image"], probe="convex")


def test_scan_mode_partners():
  paired = pipeline.ScanModePartners(_Source(3, "site", probe="linear"), _to_convex)
  assert len(paired) == 6 and paired.name == "site" and paired.probe == ""
  for i in range(3):
    assert paired[i]["image"][0, 0] == 10 * i + 5
    assert paired[3 + i]["image"][0, 0] == 255 - (10 * i + 5)
    assert paired[3 + i]["probe"] == "convex"
  with pytest.raises(IndexError):
    paired[6]
  assert len(pickle.loads(pickle.dumps(paired))) == 6


def test_scan_mode_partner_is_the_record_itself_when_convert_gives_none():
  paired = pipeline.ScanModePartners(_Source(2), lambda r: None)
  assert len(paired) == 4
  for i in range(2):
    np.testing.assert_array_equal(paired[2 + i]["image"], paired[i]["image"])


def test_next_batches_fills_each_client_in_row_major_order():
  sources = [_Source(16, "a"), _Source(16, "b")]
  reference = _next(_batches(sources), np.ones((2, 3), bool))  # [client, step, ...]
  ids = np.array([[0, 0, 1], [1, -1, 0]])
  got = _batches(sources).next_batches(ids)
  for (lane, step), (client, k) in {
    (0, 0): (0, 0),
    (0, 1): (0, 1),
    (1, 2): (0, 2),
    (0, 2): (1, 0),
    (1, 0): (1, 1),
  }.items():
    np.testing.assert_array_equal(got[lane, step], reference[client, k])
  assert not got[1, 1].any()
