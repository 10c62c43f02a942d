"""UltraSam training pieces: prompts, losses, selection, instance data, COCO mAP, the job."""

import json
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pycocotools import coco as coco_api

from ultrajax.data import instances
from ultrajax.eval import coco_eval
from ultrajax.train import sam_objectives as so


def _ellipse_masks(rng, n, size):
  yy, xx = np.mgrid[:size, :size]
  masks = []
  for _ in range(n):
    cx, cy = rng.uniform(0.3, 0.7, 2) * size
    a, b = rng.uniform(0.08, 0.3, 2) * size
    masks.append(((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1)
  return np.stack(masks)


# ----------------------------------------------------------------------------- prompts
def test_training_prompts_points_inside_boxes_jitter_bounds_and_determinism():
  rng = np.random.default_rng(0)
  masks = _ellipse_masks(rng, 64, 32)
  keys = jax.random.split(jax.random.key(1), 8)
  prompts = jax.jit(jax.vmap(lambda k: so.training_prompts(k, jnp.asarray(masks))))(keys)
  coords, labels = (
    np.asarray(prompts.coords),
    np.asarray(prompts.labels),
  )  # [8, 64, 2, 2], [8, 64, 2]
  is_box = labels[..., 0] == 2
  assert 0.4 < is_box.mean() < 0.6
  np.testing.assert_array_equal(labels[~is_box], np.broadcast_to([1, -1], labels[~is_box].shape))
  np.testing.assert_array_equal(labels[is_box], np.broadcast_to([2, 3], labels[is_box].shape))
  # Points: the pixel under each point (nearest pixel centre) is inside its mask.
  inst = np.broadcast_to(np.arange(64), is_box.shape)
  for k, i in zip(*np.nonzero(~is_box)):
    x, y = coords[k, i, 0]
    assert masks[i, int(math.floor(y + 0.5)), int(math.floor(x + 0.5))], (k, i, x, y)
  # Boxes: each coordinate within 5% of the box width/height of the exact box, and actually moved.
  ys, xs = [np.array([np.nonzero(m.any(a))[0][[0, -1]] for m in masks]) for a in (1, 0)]
  exact = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], -1).astype(np.float64)
  size = np.stack([xs[:, 1] - xs[:, 0] + 1, ys[:, 1] - ys[:, 0] + 1], -1)
  bound = 0.05 * np.concatenate([size, size], -1)
  moved = coords[is_box].reshape(-1, 4) - exact[inst[is_box]]
  assert np.all(np.abs(moved) <= bound[inst[is_box]] + 1e-4)
  assert (np.abs(moved) / bound[inst[is_box]]).max() > 0.9  # jitter spans its range
  again = so.training_prompts(keys[0], jnp.asarray(masks))  # eager: same draws, fp rounding aside
  np.testing.assert_allclose(np.asarray(again.coords), coords[0], rtol=1e-6, atol=1e-5)
  assert not np.array_equal(coords[0], coords[1])


def test_random_points_uniform_over_mask_pixels():
  mask = np.zeros((1, 8, 8), bool)
  mask[0, [1, 2, 5, 6], [3, 7, 0, 4]] = True
  keys = jax.random.split(jax.random.key(0), 4000)
  xy = np.asarray(jax.jit(jax.vmap(lambda k: so.random_points(k, jnp.asarray(mask))))(keys))[:, 0]
  pix = np.floor(xy + 0.5).astype(int)
  counts = {p: 0 for p in [(3, 1), (7, 2), (0, 5), (4, 6)]}
  for x, y in pix:
    counts[(x, y)] += 1  # KeyError if a point left the mask
  assert all(abs(c - 1000) < 120 for c in counts.values()), counts  # ~4 sigma
  frac = xy - np.floor(xy + 0.5)
  assert frac.min() >= -0.5 and frac.max() < 0.5 and frac.std() > 0.25  # uniform in the pixel


def test_evaluation_prompts_centroid_and_exact_box():
  masks = _ellipse_masks(np.random.default_rng(2), 5, 24)
  masks[0] = False
  masks[0, 3:6, 10:20] = True
  masks[0, 15, 2] = True  # a stray pixel moves the centroid and the box
  c = so.centroid_prompts(jnp.asarray(masks))
  b = so.box_prompts(jnp.asarray(masks))
  for i, m in enumerate(masks):
    ys, xs = np.nonzero(m)
    np.testing.assert_allclose(np.asarray(c.coords[i, 0]), [xs.mean(), ys.mean()], rtol=1e-5)
    np.testing.assert_array_equal(
      np.asarray(b.coords[i]), [[xs.min(), ys.min()], [xs.max(), ys.max()]]
    )
  np.testing.assert_array_equal(np.asarray(c.labels[0]), [1, -1])
  np.testing.assert_array_equal(np.asarray(b.labels[0]), [2, 3])


# ----------------------------------------------------------------------------- losses
def test_losses_against_hand_worked_values_and_torchvision():
  logits = jnp.zeros((1, 2, 2))
  target = jnp.asarray([[[1.0, 0.0], [0.0, 0.0]]])
  # p = 0.5 everywhere: CE = ln 2, (1 - p_t)^2 = 1/4, alpha_t = 0.25 (t=1) or 0.75 (t=0).
  np.testing.assert_allclose(
    so.focal_loss(logits, target), [math.log(2) * 0.25 * (0.25 + 3 * 0.75) / 4], rtol=1e-6
  )
  # sum p t = 0.5, sum p^2 = 1, sum t^2 = 1: 1 - 1 / (1 + 1 + 1 + 1).
  np.testing.assert_allclose(so.dice_loss(logits, target), [0.75], rtol=1e-6)
  torch = pytest.importorskip("torch")
  from torchvision.ops import sigmoid_focal_loss

  rng = np.random.default_rng(0)
  x = rng.normal(0, 3, (3, 16, 16)).astype(np.float32)
  t = (rng.random((3, 16, 16)) < 0.3).astype(np.float32)
  ref = sigmoid_focal_loss(torch.from_numpy(x), torch.from_numpy(t), 0.25, 2, "none").mean((1, 2))
  np.testing.assert_allclose(so.focal_loss(jnp.asarray(x), jnp.asarray(t)), ref.numpy(), rtol=1e-5)


def test_mask_losses_weights_iou_target_and_invalid_instances():
  target = np.zeros((3, 4, 4), np.float32)
  target[:, :2, :2] = 1
  logits = np.full((3, 4, 4), -5.0, np.float32)
  logits[:, :2, :] = 5.0  # predicted 8 pixels, 4 of them right: IoU 0.5
  logits[2] = 100.0  # an invalid instance with a huge loss must not count
  iou_pred = np.asarray([0.5, 0.9, 0.0], np.float32)
  valid = np.asarray([True, True, False])
  args = [jnp.asarray(a) for a in (logits, iou_pred, target, valid)]
  out = so.mask_losses(*args)  # the paper's L1 on the IoU prediction by default
  focal = np.asarray(so.focal_loss(jnp.asarray(logits[:2]), jnp.asarray(target[:2]))).mean()
  dice = np.asarray(so.dice_loss(jnp.asarray(logits[:2]), jnp.asarray(target[:2]))).mean()
  iou = (abs(0.5 - 0.5) + abs(0.9 - 0.5)) / 2
  np.testing.assert_allclose(float(out["iou"]), iou, rtol=1e-6)
  np.testing.assert_allclose(float(out["loss"]), 20 * focal + dice + iou, rtol=1e-5)
  mse = so.mask_losses(*args, iou_loss="mse")  # the official code's
  np.testing.assert_allclose(
    float(mse["iou"]), ((0.5 - 0.5) ** 2 + (0.9 - 0.5) ** 2) / 2, rtol=1e-6
  )


def test_select_best_uses_ground_truth_iou_not_predicted_iou():
  target = np.zeros((1, 4, 4), np.float32)
  target[0, :2, :2] = 1
  cands = np.full((1, 3, 4, 4), -1.0, np.float32)
  cands[0, 0, :, :] = 1.0  # IoU 4/16
  cands[0, 1, :2, :2] = 1.0  # IoU 1
  cands[0, 2, :2, :3] = 1.0  # IoU 4/6
  iou_pred = np.asarray([[0.9, 0.1, 0.5]], np.float32)
  logits, pred, actual = so.select_best(
    jnp.asarray(cands), jnp.asarray(iou_pred), jnp.asarray(target)
  )
  np.testing.assert_array_equal(np.asarray(logits), cands[:, 1])
  np.testing.assert_allclose(np.asarray(pred), [0.1])
  np.testing.assert_allclose(np.asarray(actual), [1.0])


def _fake_decoder(weight):
  """A decoder whose four masks are fixed patterns (+ weight x the dense prompt when given)."""
  base = jnp.stack(
    [
      jnp.full((4, 4), 1.0),
      jnp.zeros((4, 4)).at[:2, :2].set(2.0) - 1.0,
      jnp.full((4, 4), -1.0),
      jnp.full((4, 4), 0.5),
    ]
  )
  calls = []

  def decode(prompts, mask_logits):
    calls.append(mask_logits)
    n = prompts.coords.shape[0]
    logits = jnp.broadcast_to(base, (n, 4, 4, 4))
    if mask_logits is not None:
      logits = logits + weight * mask_logits[:, None]
    return so.DecoderOutput(logits, jnp.broadcast_to(jnp.asarray([0.3, 0.2, 0.9, 0.1]), (n, 4)))

  return decode, calls


def test_refinement_feeds_first_logits_back_and_adds_both_losses():
  target = jnp.zeros((2, 4, 4)).at[:, :2, :2].set(1.0)
  valid = jnp.asarray([True, True])
  prompts = so.centroid_prompts(target > 0)
  decode, calls = _fake_decoder(0.0)
  loss, _ = jax.jit(
    lambda p: so.sam_loss(decode, p, target, valid, refine=True, iou_on="selected")
  )(prompts)
  assert calls[0] is None and calls[1].shape == (2, 4, 4)
  first = decode(prompts, None)
  single = so.mask_losses(first.logits[:, 0], first.iou_pred[:, 0], target, valid)
  best = so.mask_losses(first.logits[:, 1], first.iou_pred[:, 1], target, valid)  # token 1 fits
  np.testing.assert_allclose(float(loss), float(single["loss"] + best["loss"]), rtol=1e-6)
  # iou_on='all': candidate IoUs 1, 0, 4/16 against predictions 0.2, 0.9, 0.1 (L1; MSE).
  _, m = jax.jit(lambda p: so.sam_loss(decode, p, target, valid, refine=False))(prompts)
  np.testing.assert_allclose(float(m["iou"]), (0.8 + 0.9 + 0.15) / 3, rtol=1e-5)
  _, m = jax.jit(lambda p: so.sam_loss(decode, p, target, valid, refine=False, iou_loss="mse"))(
    prompts
  )
  np.testing.assert_allclose(float(m["iou"]), (0.8**2 + 0.9**2 + 0.15**2) / 3, rtol=1e-5)

  # The dense prompt is not detached: pass 2's loss depends on pass 1's logits.
  def total(w):
    d, _ = _fake_decoder(w)
    return so.sam_loss(d, prompts, target, valid, refine=True)[0]

  assert abs(float(jax.jit(jax.grad(total))(0.0))) > 0
  # Evaluation picks by predicted IoU among the multimask outputs (token 2 here, 0.9).
  logits, score = so.predict_masks(decode, prompts, refine=False)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(first.logits[:, 2]))
  np.testing.assert_allclose(np.asarray(score), [0.9, 0.9])
  # A model trained with refinement is read, without it, at its single-mask output (token 0).
  logits, score = so.predict_masks(decode, prompts, refine=False, multimask=False)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(first.logits[:, 0]))
  np.testing.assert_allclose(np.asarray(score), [0.3, 0.3])


def test_test_time_refinement_turns_a_click_into_the_box_of_the_first_mask():
  # Official UltraSam test-time refinement: pass 2 prompts a point's instance with the box of
  # pass 1's mask (low-res pixel i covers input pixels [4i, 4i + 4) at 16 / 4), a box stays.
  first = np.full((3, 4, 4), -1.0, np.float32)
  first[0, 1:3, 0:2] = 1.0  # rows 1-2, cols 0-1
  first[1, 0, 3] = 1.0
  point = so.centroid_prompts(jnp.ones((1, 16, 16), bool))
  box = so.box_prompts(jnp.zeros((1, 16, 16), bool).at[0, 2:5, 3:9].set(True))
  prompts = so.Prompts(
    jnp.concatenate([point.coords, box.coords, point.coords]),
    jnp.concatenate([point.labels, box.labels, point.labels]),
  )
  got = so.predicted_box_prompts(prompts, jnp.asarray(first), 16)
  np.testing.assert_allclose(np.asarray(got.coords[0]), [[0, 4], [7, 11]])
  np.testing.assert_array_equal(np.asarray(got.labels[0]), so.BOX_LABELS)
  np.testing.assert_array_equal(np.asarray(got.coords[1]), np.asarray(box.coords[0]))  # box kept
  np.testing.assert_array_equal(np.asarray(got.coords[2]), np.asarray(point.coords[0]))  # empty
  np.testing.assert_array_equal(np.asarray(got.labels[2]), so.POINT_LABELS)

  seen = []

  def decode(p, mask_logits):
    seen.append(p)
    n = p.coords.shape[0]
    logits = jnp.broadcast_to(jnp.asarray(first)[:, None], (n, 4, 4, 4))
    return so.DecoderOutput(logits, jnp.broadcast_to(jnp.asarray([0.1, 0.2, 0.9, 0.3]), (n, 4)))

  so.predict_masks(decode, prompts, refine=True, input_size=16)
  np.testing.assert_allclose(np.asarray(seen[1].coords), np.asarray(got.coords))
  so.predict_masks(decode, prompts, refine=True, refine_prompt="same")
  np.testing.assert_array_equal(np.asarray(seen[3].coords), np.asarray(prompts.coords))
  with pytest.raises(ValueError, match="input_size"):
    so.predict_masks(decode, prompts, refine=True)
  with pytest.raises(ValueError, match="refine_prompt"):
    so.predict_masks(decode, prompts, refine=True, refine_prompt="mask")


# ----------------------------------------------------------------------------- data
def _records():
  source = instances.PhantomInstances("test", 6, 40, seed=3)
  return [source[i] for i in range(len(source))]


def test_coco_round_trip_rle_exact_and_polygon_close(tmp_path):
  records = _records()
  for fmt in ("rle", "polygon"):
    path = instances.write_coco(
      str(tmp_path / f"{fmt}.json"), records, instances.PHANTOM_CATEGORIES, mask_format=fmt
    )
    loaded = instances.CocoInstances(path)
    reference = coco_api.COCO(path)
    assert len(loaded) == len(records)
    for i, rec in enumerate(records):
      got = loaded[i]
      np.testing.assert_array_equal(got["image"], rec["image"])
      np.testing.assert_array_equal(got["category_ids"], rec["category_ids"])
      np.testing.assert_array_equal(got["classes"], rec["classes"])
      anns = reference.loadAnns(reference.getAnnIds(imgIds=[rec["image_id"]]))
      ref_masks = [reference.annToMask(a) for a in anns]
      for m, ref, orig in zip(got["masks"], ref_masks, rec["masks"]):
        np.testing.assert_array_equal(m, ref)
        if fmt == "rle":
          np.testing.assert_array_equal(m, orig)
        else:
          assert (m & orig).sum() / (m | orig).sum() > 0.9


def test_empty_images_skipped_and_counted(tmp_path, caplog):
  records = _records()
  labels = [int(r["classes"].max(initial=0)) for r in records]
  assert 0 < labels.count(0) < len(records)
  records[1] = dict(
    records[1],
    masks=records[1]["masks"][:0],
    category_ids=records[1]["category_ids"][:0],
    classes=records[1]["classes"][:0],
  )
  path = instances.write_coco(str(tmp_path / "a.json"), records, instances.PHANTOM_CATEGORIES)
  with caplog.at_level(logging.INFO):
    everything = instances.InstanceDataset(instances.CocoInstances(path), 32, 4)
    lesions = instances.InstanceDataset(
      instances.CocoInstances(path), 32, 4, keep_categories=("lesion",)
    )
  assert everything.skipped_images == 1 and len(everything) == len(records) - 1
  expect = sum(1 for i, r in enumerate(records) if i == 1 or not (r["category_ids"] == 2).any())
  assert lesions.skipped_images == expect
  assert "skipped" in caplog.text
  batch = lesions.batch(range(len(lesions)))
  assert batch["valid"].sum(1).tolist() == [1] * len(lesions)
  assert set(batch["classes"][batch["valid"]].tolist()) <= {1, 2}


def test_prepare_resizes_long_side_pads_and_flips():
  image = np.zeros((40, 20), np.uint8)
  image[:, :10] = 200
  mask = np.zeros((2, 40, 20), np.uint8)
  mask[0, 8:16, 2:6] = 1
  mask[1, 20:40, 10:20] = 1
  rec = dict(image=image, masks=mask, category_ids=np.asarray([1, 2]), classes=np.asarray([0, 2]))
  out = instances.prepare(rec, 32, 3)
  assert out["image"].shape == (32, 32, 3) and tuple(out["hw"]) == (32, 16)
  assert out["image"][:, 16:].max() == 0 and out["masks"][:, :, 16:].max() == 0
  np.testing.assert_array_equal(out["valid"], [True, True, False])
  np.testing.assert_array_equal(out["classes"], [2 * 0, 2, 0])
  np.testing.assert_array_equal(np.nonzero(out["masks"][0].any(1))[0][[0, -1]], [6, 12])
  flipped = instances.prepare(rec, 32, 3, hflip=True)
  np.testing.assert_array_equal(flipped["masks"][:, :, :16], out["masks"][:, :, 15::-1])
  with pytest.raises(instances.InstanceDataError, match="masks are"):
    instances.prepare(dict(rec, masks=mask[:, :30]), 32, 3)


def test_clear_errors_name_the_annotation_or_file(tmp_path):
  records = _records()[:2]
  path = instances.write_coco(str(tmp_path / "a.json"), records, instances.PHANTOM_CATEGORIES)
  data = json.loads(open(path).read())

  def broken(edit, name):
    d = json.loads(json.dumps(data))
    edit(d)
    p = tmp_path / name
    p.write_text(json.dumps(d))
    return str(p)

  p = broken(lambda d: d["annotations"][0].update(image_id=999), "bad_id.json")
  with pytest.raises(
    instances.InstanceDataError, match=r"bad_id.json: annotation id 1 .*image_id 999"
  ):
    instances.CocoInstances(p)
  p = broken(lambda d: d["images"][1].update(file_name="images/gone.png"), "gone.json")
  with pytest.raises(
    instances.InstanceDataError, match=r"gone.json: image id .*gone.png does not exist"
  ):
    instances.CocoInstances(p)
  p = broken(lambda d: d["annotations"][0]["segmentation"].update(size=[20, 40]), "size.json")
  with pytest.raises(instances.InstanceDataError, match=r"annotation id 1: mask size \[20, 40\]"):
    instances.CocoInstances(p)[0]
  p = broken(lambda d: d["images"][0].update(height=41), "hw.json")
  with pytest.raises(
    instances.InstanceDataError, match=r"is 40x40 \(h x w\) but the json says 41x40"
  ):
    instances.CocoInstances(p)[0]
  with pytest.raises(instances.InstanceDataError, match="category 'vessel' is not in"):
    instances.InstanceDataset(instances.CocoInstances(path), 32, 4, drop_categories=("vessel",))


def test_train_batches_follow_seeded_epochs_resume_and_split_over_processes():
  """Grain batches against the stream built by hand: position p is image perm_e[p mod n] of
  epoch e = p // n (numpy's permutation from (seed, e)), flipped by the draw from (seed, 'hflip',
  p); a restored iterator continues bitwise; two processes' halves make up the batch."""
  import zlib

  ds = instances.InstanceDataset(instances.PhantomInstances("t", 5, 32, 0), 32, 2)
  seed, bsz, n = 7, 4, len(ds)

  def want(b):
    positions = range(b * bsz, (b + 1) * bsz)
    index = [np.random.default_rng([seed, p // n]).permutation(n)[p % n] for p in positions]
    flips = [
      np.random.default_rng([seed, zlib.crc32(b"hflip"), p]).random() < 0.5 for p in positions
    ]
    return ds.batch(index, flips)

  it = instances.train_batches(ds, bsz, seed, True, num_threads=2)
  got = [next(it) for _ in range(3)]  # 12 positions: crosses two epoch boundaries
  for b in range(3):
    for k, v in want(b).items():
      np.testing.assert_array_equal(got[b][k], v, err_msg=f"batch {b} {k}")
  assert any(
    want(b)["image"].tobytes() != ds.batch(range(b * bsz, b * bsz + bsz))["image"].tobytes()
    for b in range(3)
  )  # flips and shuffling actually happen
  state = it.get_state()
  fourth = next(it)
  again = instances.train_batches(ds, bsz, seed, True, num_threads=1)
  again.set_state(state)
  for k, v in next(again).items():
    np.testing.assert_array_equal(v, fourth[k])
  halves = [
    instances.train_dataset(ds, bsz, seed, True, process_index=i, process_count=2)[3]
    for i in range(2)
  ]
  for k, v in fourth.items():
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), v)
  it.close(), again.close()


# ----------------------------------------------------------------------------- COCO mAP
def _square(size, y0, x0, h, w):
  m = np.zeros((size, size), np.uint8)
  m[y0 : y0 + h, x0 : x0 + w] = 1
  return m


def test_mask_map_against_hand_worked_cases():
  gt_a, gt_b = _square(20, 0, 0, 10, 10), _square(20, 10, 10, 8, 8)
  perfect = coco_eval.mask_map([np.stack([gt_a, gt_b])], [np.stack([gt_a, gt_b])], [[0.9, 0.8]])
  assert perfect["mAP"] == pytest.approx(1.0) and perfect["mAP50"] == pytest.approx(1.0)
  # IoU exactly 0.5 (a 10x10 square vs its 10x5 half): a match at threshold 0.50 only.
  half = _square(20, 0, 0, 10, 5)
  r = coco_eval.mask_map([gt_a[None]], [half[None]], [[0.7]])
  assert r["mAP50"] == pytest.approx(1.0) and r["mAP"] == pytest.approx(0.1)
  # Two instances, one perfect, one at IoU 0.5. Above 0.5 only the perfect one matches: with it
  # ranked first precision is 1 up to recall 0.5 (51 of COCO's 101 recall points); ranked
  # second the interpolated precision there is 0.5.
  gts, preds = [gt_a[None], gt_b[None]], [gt_a[None], _square(20, 10, 10, 8, 4)[None]]
  good = coco_eval.mask_map(gts, preds, [[0.9], [0.1]])
  bad = coco_eval.mask_map(gts, preds, [[0.1], [0.9]])
  assert good["mAP"] == pytest.approx((1 + 9 * 51 / 101) / 10, abs=1e-6)
  assert bad["mAP"] == pytest.approx((1 + 9 * 0.5 * 51 / 101) / 10, abs=1e-6)
  assert good["mAP50"] == bad["mAP50"] == pytest.approx(1.0)


def test_mask_ious_match_sklearn_jaccard():
  from sklearn.metrics import jaccard_score

  from ultrajax.eval import sam_eval

  rng = np.random.default_rng(0)
  gt, pred = rng.random((5, 7, 6)) < 0.3, rng.random((5, 7, 6)) < 0.4
  gt[4], pred[4] = False, False  # both empty: 0 (nothing to reward)
  want = [jaccard_score(g.ravel(), p.ravel(), zero_division=0.0) for g, p in zip(gt, pred)]
  np.testing.assert_allclose(sam_eval.mask_ious(gt, pred), want, rtol=1e-12)


def test_logits_to_masks_undoes_resize_and_padding():
  orig = np.zeros((40, 20), np.uint8)
  orig[10:30, 4:16] = 1
  prepared = instances.prepare(
    dict(image=orig * 100, masks=orig[None], category_ids=np.asarray([1]), classes=np.asarray([0])),
    32,
    1,
  )
  # Logits at the input resolution come back exactly; at a quarter of it (the decoder's), up to
  # the low-res grid's quantisation.
  for low_size, min_iou in ((32, 1.0), (8, 0.75)):
    low = np.asarray(so.low_res_targets(jnp.asarray(prepared["masks"]), low_size)) * 20 - 10
    back = coco_eval.logits_to_masks(low, 32, prepared["hw"], orig.shape)
    assert back.shape == (1, 40, 20)
    assert (back[0] & orig).sum() / (back[0] | orig).sum() >= min_iou


# ----------------------------------------------------------------------------- the job
def _config(preset="smoke"):
  from ultrajax import configlib

  return configlib.load_config_module("configs/sam_ultrasound.py").get_config(preset)


def test_config_errors_name_the_field_and_zero_shot_split():
  from flax import nnx

  from ultrajax import configlib
  from ultrajax.jobs import sam as job

  for field, value, match in (
    ("loss.iou_loss", "l2", "config.loss.iou_loss='l2'"),
    ("data.source", "coco", "data.train_json"),
    ("prompts.p_box", 1.5, "config.prompts.p_box=1.5"),
    ("classification.global_encoder", "shared", "config.classification.global_encoder='shared'"),
    ("classification.eg.image_size", 30, "config.classification.eg.image_size=30"),
    ("classification.eg.variant", "B16", "config.classification.eg.variant"),
    ("sharding_rules", ((".*", "shard"),), "kind 'shard'"),
    ("on_nonfinite", "ignore", "config.on_nonfinite='ignore'"),
    ("data.num_threads", 0, "config.data.num_threads=0"),
    ("model.remat", "some", "config.model.remat='some'"),
    ("model.attention_impl", "flash", "config.model.attention_impl='flash'"),
    ("classification.eg.attention_impl", "flash", "config.classification.eg.attention_impl"),
  ):
    c = _config()
    c.update_from_flattened_dict({field: value})
    with pytest.raises(configlib.ConfigError, match=match.replace(".", r"\.")):
      job.validate(c)
  c = _config()
  c.classification.eg.update(remat="dots", scan_layers=True, attention_impl="einsum")
  eg = nnx.eval_shape(lambda: job.global_encoder(c, nnx.Rngs(0)))
  assert (eg.remat, eg.scan_layers, eg.blocks[0].attn.impl) == ("dots", True, "einsum")
  c = _config()
  c.data.update(zero_shot_categories=("lesion",), phantom_train_images=6, phantom_test_images=6)
  train, test = job.datasets(c)
  train_cats = np.concatenate([train.record(i)["category_ids"] for i in range(len(train))])
  test_cats = np.concatenate([test.record(i)["category_ids"] for i in range(len(test))])
  assert set(train_cats.tolist()) == {1} and set(test_cats.tolist()) == {2}


def _sharded_config():
  """The smoke config on two devices: encoder kernels split ('fsdp', as pretraining), the rest
  replicated; steps with a non-finite loss skipped."""
  config = _config()
  config.sharding_rules = ((".*image_encoder/.*kernel", "fsdp"), (".*", "replicated"))
  config.on_nonfinite = "skip"
  config.mesh.data = 2
  return config


def test_sharding_rules_lay_out_sam_params_and_adamw_moments():
  """config.sharding_rules place SAM's params and AdamW moments as in pretraining (encoder
  kernels split over two devices here). The smoke run checks that steps keep this layout and
  that on_nonfinite='skip' returns the state it was given."""
  from flax import nnx

  from ultrajax.jobs import sam as job
  from ultrajax.train import sharding, tree

  config = _sharded_config()
  graphdef, abstract = nnx.split(
    nnx.eval_shape(lambda: job.build_model(config, nnx.Rngs(0))), nnx.Param
  )
  mesh = sharding.make_mesh(1, config.mesh.data)
  programs = job.Programs(config, mesh, graphdef, nnx.to_pure_dict(abstract))  # compiles nothing
  specs = {}
  tree.map_with_path(
    lambda path, s: specs.setdefault(path, tuple(s.spec)), (programs.params, programs.opt)
  )
  qkv = "image_encoder/blocks/0/attn/qkv/kernel"  # [32, 96]: the 96 outputs split
  assert specs[f"0/{qkv}"] == (None, "data")
  assert [v for k, v in specs.items() if k.endswith("mu/" + qkv)] == [(None, "data")]
  assert specs["0/mask_decoder/iou_token"] == (None, None)
  assert all("data" not in v for k, v in specs.items() if "image_encoder" not in k)


def test_class_metrics_match_sklearn():
  """Table 4's precision, recall, F1 (macro and per class) and AUROC, binary and 3-class."""
  from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

  from ultrajax.eval import sam_eval

  rng = np.random.default_rng(0)
  for k in (2, 3):
    labels = rng.integers(0, k, 60)
    probs = rng.dirichlet(np.ones(k), 60) + 0.4 * np.eye(k)[labels]
    probs /= probs.sum(1, keepdims=True)
    preds = probs.argmax(1)
    got = {name: fn(labels, probs) for name, fn in sam_eval.class_metric_fns(k).items()}
    for average in ("macro", None):
      want = precision_recall_fscore_support(labels, preds, average=average, zero_division=0)
      for name, value in zip(("precision", "recall", "f1"), want[:3]):
        if average:
          assert got[name] == pytest.approx(value, abs=1e-12)
        else:
          np.testing.assert_allclose([got[f"{name}/{j}"] for j in range(k)], value, atol=1e-12)
    want_auc = (
      roc_auc_score(labels, probs[:, 1])
      if k == 2
      else roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    )
    assert got["auroc"] == pytest.approx(want_auc, abs=1e-12)


def test_classification_data_from_coco_equals_the_phantom(tmp_path):
  """Prompted classification reads COCO instances with a `class_label` (here the phantom's
  own lesions written as COCO files): the same images, masks and classes as the phantom."""
  from ultrajax.jobs import sam as job

  config = _config()
  phantom = job.class_data(config)
  for split, count in (
    ("train", config.classification.train_images),
    ("test", config.classification.test_images),
  ):
    source = instances.PhantomInstances(
      f"cls_{split}", count, config.data.phantom_image_size, config.seed
    )
    records = [source[i] for i in range(count)]
    j = next(i for i, r in enumerate(records) if r["classes"].any())  # unlabel the first one
    records[j] = dict(records[j], classes=np.zeros_like(records[j]["classes"]))
    config.data[f"{split}_json"] = instances.write_coco(
      str(tmp_path / split / "instances.json"), records, instances.PHANTOM_CATEGORIES
    )
  config.data.source = "coco"
  coco = job.class_data(config)
  np.testing.assert_array_equal(coco[2], phantom[2])
  for want, got in zip(phantom[:2], coco[:2]):
    first = want["image_index"] == 0  # the lesion whose label was dropped
    assert got["classes"].tolist() == want["classes"][~first].tolist()
    assert set(got["classes"].tolist()) <= {1, 2} and len(got["classes"]) > 0
    np.testing.assert_array_equal(got["masks"], want["masks"][~first])
    np.testing.assert_array_equal(
      got["images"][got["image_index"]], want["images"][want["image_index"][~first]]
    )
  config.classification.category = "organ"  # organs carry no class
  with pytest.raises(instances.InstanceDataError, match="instances.json: no instance .* class"):
    job.class_data(config)


def _reuse_programs(monkeypatch):
  """job.run builds (and compiles) its Programs at every start; here a start with the same
  config (classification aside: Programs do not read it) and mesh gets the first start's object,
  so the smoke test's four starts compile the training step once (a compilation-cache hit still
  costs about a third of a compile). Returns {key: Programs}."""
  from ultrajax.jobs import sam as job

  built, build = {}, job.Programs

  def programs(config, mesh, graphdef, abstract_params):
    fields = {k: v for k, v in config.to_dict().items() if k != "classification"}
    key = (json.dumps(fields, sort_keys=True, default=repr), mesh, graphdef)
    if key not in built:
      built[key] = build(config, mesh, graphdef, abstract_params)
    return built[key]

  monkeypatch.setattr(job, "Programs", programs)
  return built


def _check_layout_and_skip(config, params, programs):
  """The run's params (after 4 steps) keep the rules' layout, and differ from the initial ones
  (finite steps update under 'skip'); the run's step, given a NaN loss, returns the params and
  optimizer state it was given, in that layout."""
  from flax import nnx

  from ultrajax.jobs import sam as job
  from ultrajax.train import loop

  for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(programs.params)):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
  initial = nnx.to_pure_dict(nnx.state(job.build_model(config, nnx.Rngs(config.seed)), nnx.Param))
  bad = jax.tree.map(np.array, jax.device_get(params))
  assert not np.array_equal(
    bad["image_encoder"]["patch_embed"]["bias"], initial["image_encoder"]["patch_embed"]["bias"]
  )  # it trained
  bad["image_encoder"]["patch_embed"]["bias"][0] = np.nan
  bad = loop.put_global(bad, programs.params)
  opt = programs.init_opt(bad)
  given = jax.device_get((bad, opt))
  batch = instances.train_dataset(job.datasets(config)[0], 4, 0, True)[0]
  batch = {k: loop.put_global(batch[k], programs.batch) for k in job.TRAIN_KEYS}
  after = programs.train_step(bad, opt, batch, jax.random.key(4))
  assert np.isnan(after[2]["loss"])
  for x, s in zip(jax.tree.leaves(after[:2]), jax.tree.leaves((programs.params, programs.opt))):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(after[:2]), given)


def test_smoke_run_trains_evaluates_classifies_and_resumes(
  tmp_path, monkeypatch, closes_event_files
):
  from ultrajax.jobs import sam as job
  from ultrajax.train import writers

  built = _reuse_programs(monkeypatch)
  config = _sharded_config()
  whole = tmp_path / "whole"
  params, results = job.run(config, str(whole))
  (programs,) = built.values()
  _check_layout_and_skip(config, params, programs)
  assert set(results) == {0, 4, "classification"}
  for step in (0, 4):
    # Pooled (class-agnostic, UltraSam's protocol) and per category.
    assert set(results[step]) == {
      f"point/{c}{k}" for c in ("", "organ/", "lesion/") for k in ("mAP", "mAP50", "mIoU")
    }
    assert all(0.0 <= v <= 1.0 for v in results[step].values())
  rows = writers.read_jsonl(whole / "metrics.jsonl")
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 2 and all(np.isfinite(losses))
  assert {"focal", "dice", "iou", "grad_norm", "lr"} <= set(rows[1])
  cls = results["classification"]
  for name in ("prompted", "plain"):
    for metric in ("auroc", "precision", "recall", "f1"):
      low, value, high = (cls[f"cls/{name}/{metric}{s}"] for s in ("_low", "", "_high"))
      assert 0 <= low <= value <= high <= 1, (name, metric)
    for metric in ("precision", "recall", "f1"):  # per class (benign 1, malignant 2), macro mean
      per_class = [cls[f"cls/{name}/{metric}/class_{k}"] for k in (1, 2)]
      assert cls[f"cls/{name}/{metric}"] == pytest.approx(np.mean(per_class))
  rows = {k for r in writers.read_jsonl(whole / "metrics.jsonl") for k in r}
  assert {"cls/prompted/f1", "cls/prompted/recall/class_2"} <= rows
  assert (whole / "images" / "step_000004.png").stat().st_size > 0
  assert (whole / "classification_roc.png").stat().st_size > 0  # viz/sam.py, two classes
  # A second start resumes from the final checkpoint: nothing is trained or evaluated again.
  config.classification.enabled = False
  again, results2 = job.run(config, str(whole))
  assert results2 == {}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again), jax.device_get(params))
  # Stopped after step 2's checkpoint and restarted: the Grain iterator's position comes back
  # with the checkpoint, so steps 3-4 see the same images (a new epoch's order, not the first
  # batch again): the same logged losses and bitwise the same params as the uninterrupted run.
  part = tmp_path / "part"
  job.run(config, str(part), stop_after_steps=2)
  resumed, _ = job.run(config, str(part))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(params))
  assert len(built) == 1  # every start ran the same programs
  train_rows = lambda d: [
    {k: v for k, v in r.items() if k != "img_per_s"}
    for r in writers.read_jsonl(d / "metrics.jsonl")
    if "loss" in r
  ]
  assert train_rows(part) == train_rows(whole)


def test_init_from_segment_anything_file_and_mismatch_names_keys(tmp_path):
  pytest.importorskip("torch")  # a .pth file, as segment_anything's checkpoints
  from flax import nnx

  from ultrajax.interop import files, sam as sam_interop
  from ultrajax.jobs import sam as job

  config = _config()
  source = job.build_model(config, nnx.Rngs(5))
  tensors = sam_interop.sam_to_torch(nnx.to_pure_dict(nnx.state(source, nnx.Param)))
  path = files.save_state_dict(tmp_path / "sam_tiny.pth", tensors)
  target = job.build_model(config, nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(target, nnx.Param))
  config.init_from = str(path)
  loaded = job._load_init(config, target, params)
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(loaded),
    nnx.to_pure_dict(nnx.state(source, nnx.Param)),
  )
  tensors["mask_decoder.iou_token.weight"] = tensors["mask_decoder.iou_token.weight"][:, :8]
  files.save_state_dict(path, tensors)
  with pytest.raises(ValueError, match="mask_decoder.iou_token.weight"):
    job._load_init(config, target, params)
