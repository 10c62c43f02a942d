"""Downstream fine-tuning: augmentation, optimizer, losses, tasks and splits, encoder loading,
and the job end to end (smoke presets), including a bitwise resume."""

import csv
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

from ultrajax import configlib
from ultrajax.data import augment, tasks
from ultrajax.eval import downstream
from ultrajax.interop import load as interop_load
from ultrajax.jobs import finetune
from ultrajax.models import heads, mae, vit
from ultrajax.train import checkpoint, losses, optimizer, writers

REPO = pathlib.Path(__file__).resolve().parents[1]


def cls_config(preset="smoke"):
  return configlib.load_config_module(REPO / "configs" / "finetune_cls.py").get_config(preset)


def seg_config(preset="smoke"):
  return configlib.load_config_module(REPO / "configs" / "finetune_seg.py").get_config(preset)


# ----------------------------------------------------------------------------- augmentation
def test_warp_identity_flip_and_quarter_turn_match_numpy():
  image = np.random.default_rng(0).random((9, 9, 3)).astype(np.float32)
  np.testing.assert_allclose(augment.warp(image, jnp.eye(3)), image, atol=1e-6)
  np.testing.assert_allclose(augment.warp(image, augment.hflip(True, 9)), image[:, ::-1], atol=1e-6)
  np.testing.assert_allclose(augment.warp(image, augment.hflip(False, 9)), image, atol=1e-6)
  # Output (r, c) reads input (c, 8 - r) for +90 degrees: numpy's rot90 clockwise (k=-1).
  rotated = augment.warp(image, augment.rotation(math.pi / 2, 9))
  np.testing.assert_allclose(rotated, np.rot90(image, k=-1), atol=1e-5)
  labels = np.random.default_rng(1).integers(0, 3, (9, 9, 1)).astype(np.float32)
  np.testing.assert_array_equal(
    augment.warp(labels, augment.rotation(math.pi / 2, 9), order=0), np.rot90(labels, k=-1)
  )


def test_random_resized_crop_full_scale_is_identity_and_crops_stay_inside():
  m = augment.random_resized_crop(jax.random.key(0), 16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
  np.testing.assert_allclose(m, np.eye(3), atol=1e-5)
  for seed in range(20):
    m = np.asarray(augment.random_resized_crop(jax.random.key(seed), 16, scale=(0.1, 1.0)))
    corners = m @ np.array([[-0.5, -0.5, 1], [15.5, 15.5, 1]]).T  # outer pixel edges
    assert corners[:2].min() >= -0.5 - 1e-4 and corners[:2].max() <= 15.5 + 1e-4


def test_rand_augment_keeps_range_and_is_deterministic():
  image = jnp.asarray(np.random.default_rng(0).random((16, 16, 3)), jnp.float32)
  a = augment.rand_augment_one(jax.random.key(3), image, 2, 9.0)
  b = augment.rand_augment_one(jax.random.key(3), image, 2, 9.0)
  c = augment.rand_augment_one(jax.random.key(4), image, 2, 9.0)
  assert a.shape == image.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_random_erasing_one_rectangle_in_timm_bounds():
  image = jnp.full((32, 24, 3), 7.0)  # no N(0, 1) sample equals 7
  assert jnp.array_equal(augment.random_erasing(jax.random.key(0), image, 0.0), image)
  erase = jax.jit(jax.vmap(lambda k: augment.random_erasing(k, image, 1.0)))
  out = np.asarray(erase(jax.random.split(jax.random.key(1), 400)))
  changed = (out != 7.0).all(-1)  # all channels of an erased pixel are noise
  assert np.array_equal(changed, (out != 7.0).any(-1))
  assert changed.any((1, 2)).mean() > 0.95
  for c in changed:
    rows, cols = np.nonzero(c.any(1))[0], np.nonzero(c.any(0))[0]
    h, w = len(rows), len(cols)
    # One axis-aligned rectangle, strictly smaller than the image, area and aspect in range
    # (up to the rounding of h and w to whole pixels).
    if not h:  # none of the 10 drawn sizes fitted (rare): nothing erased
      continue
    assert c.sum() == h * w and np.ptp(rows) + 1 == h and np.ptp(cols) + 1 == w
    assert h < 32 and w < 24
    assert 0.02 * 768 - h - w <= h * w <= 768 / 3 + h + w
    assert 0.3 * (w - 0.5) - 0.5 <= h <= (w + 0.5) / 0.3 + 0.5
  noise = out[changed]
  assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1.0) < 0.05
  # prob 0.25: about a quarter of the images are erased.
  some = jax.vmap(lambda k: augment.random_erasing(k, image, 0.25))(
    jax.random.split(jax.random.key(2), 2000)
  )
  assert abs(float((some != 7.0).any((1, 2, 3)).mean()) - 0.25) < 0.03


def test_balanced_class_weights_match_sklearn_and_weighted_loss_by_hand():
  from sklearn.utils.class_weight import compute_class_weight

  labels = np.array([0] * 7 + [1] * 2 + [2] * 3)
  np.testing.assert_allclose(
    losses.balanced_class_weights(labels, 3),
    compute_class_weight("balanced", classes=np.arange(3), y=labels),
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    losses.balanced_class_weights(np.array([0, 0, 2]), 3), [0.5, 0.0, 1.0]
  )  # 3 / (3 x 2), absent class 0, 3 / (3 x 1)
  logits = jnp.asarray([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
  soft = jnp.asarray([[1.0, 0.0, 0.0], [0.0, 0.3, 0.7]])
  w = jnp.asarray([0.5, 2.0, 1.0])
  logp = np.log(np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(1, keepdims=True))
  want = -(0.5 * logp[0, 0] + 2.0 * 0.3 * logp[1, 1] + 1.0 * 0.7 * logp[1, 2]) / 2
  np.testing.assert_allclose(
    float(losses.weighted_soft_cross_entropy(logits, soft, w)), want, rtol=1e-6
  )
  np.testing.assert_allclose(  # unit weights: optax's cross-entropy
    float(losses.weighted_soft_cross_entropy(logits, soft, jnp.ones(3))),
    float(optax.softmax_cross_entropy(logits, soft).mean()),
    rtol=1e-6,
  )


def test_label_smoothing_and_cutmix_lambda_match_the_pasted_area():
  soft = augment.smooth_one_hot(jnp.array([0, 2]), 4, 0.1)
  np.testing.assert_allclose(soft, [[0.925, 0.025, 0.025, 0.025], [0.025, 0.025, 0.925, 0.025]])
  # Image i is all i, so each mixed pixel says where it came from.
  images = jnp.broadcast_to(jnp.arange(4.0)[:, None, None, None], (4, 8, 8, 1))
  targets = jax.nn.one_hot(jnp.arange(4), 4)
  for seed in range(5):
    out, t = augment.mixup_cutmix(
      jax.random.key(seed), images, targets, mixup_alpha=0.0, cutmix_alpha=1.0
    )
    pasted = float(np.mean(np.asarray(out[0]) == 3.0))  # image 0 takes from image 3
    np.testing.assert_allclose(t[0, 0], 1.0 - pasted, atol=1e-6)
    np.testing.assert_allclose(t[0, 3], pasted, atol=1e-6)
    np.testing.assert_allclose(t.sum(1), 1.0, atol=1e-6)
  out, t = augment.mixup_cutmix(
    jax.random.key(0), images, targets, mixup_alpha=0.8, cutmix_alpha=0.0
  )
  lam = float(t[0, 0])
  np.testing.assert_allclose(out[0], lam * 0.0 + (1 - lam) * 3.0, atol=1e-5)


# ----------------------------------------------------------------------------- optimizer, losses
def test_layer_decay_scales_by_hand_and_equal_per_group_adamw():
  model = vit.ViT(
    width=16,
    depth=2,
    num_heads=2,
    patch_size=4,
    image_size=8,
    pool="gap",
    num_classes=3,
    rngs=nnx.Rngs(0),
  )
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  scales = optimizer.layer_decay_scales(params, depth=2, decay=0.5)
  assert scales["patch_embed"]["kernel"] == 0.125 and scales["cls_token"] == 0.125
  assert scales["blocks"][0]["attn"]["qkv"]["kernel"] == 0.25
  assert scales["blocks"][1]["mlp"]["fc2"]["bias"] == 0.5
  assert scales["head"]["kernel"] == 1.0 and scales["fc_norm"]["scale"] == 1.0
  cfg = cls_config().optim
  cfg.update(layer_decay=0.5, weight_decay=0.05)
  tx = optimizer.finetune_adamw(cfg, params, schedule=1e-2, depth=2)
  grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.3, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # MAE's param groups: the patch embedding's lr is 1e-2 * 0.125, weight decay included.
  ref = optax.adamw(1e-2 * 0.125, b1=cfg.b1, b2=cfg.b2, weight_decay=0.05)
  leaf = params["patch_embed"]["kernel"]
  ref_update, _ = ref.update(grads["patch_embed"]["kernel"], ref.init(leaf), leaf)
  np.testing.assert_allclose(updates["patch_embed"]["kernel"], ref_update, rtol=1e-6)


def test_linear_probe_trains_only_the_head():
  model = vit.ViT(
    width=16,
    depth=1,
    num_heads=2,
    patch_size=4,
    image_size=8,
    pool="cls",
    num_classes=2,
    rngs=nnx.Rngs(0),
  )
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tx = optimizer.finetune_adamw(
    cls_config().optim,
    params,
    schedule=1e-2,
    depth=1,
    trainable=finetune.trainable_mask(params, "linear_probe"),
  )
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(jnp.abs(updates["head"]["kernel"]).sum()) > 0
  others = [v for k, v in updates.items() if k != "head"]
  assert all(float(jnp.abs(x).sum()) == 0 for x in jax.tree.leaves(others))


def test_decoder_levels_sit_at_upernet_strides_for_any_patch_size():
  # Level i is the patch grid resized by 2^k with patch / 2^k = 4, 8, 16, 32 input pixels.
  for patch in (4, 8, 16, 32):
    scales = heads.level_scales(patch, 4)
    assert [patch / 2.0**k for k in scales] == [4, 8, 16, 32]
  assert heads.level_scales(16, 5)[4] == 0  # a fifth level stays on the patch grid
  with pytest.raises(ValueError, match="patch_size 14 is not a power of two"):
    heads.level_scales(14, 4)
  # Transposed convolutions only where a level is finer than the grid; logits at input size.
  for patch, ups in ((16, [2, 1, 0, 0]), (8, [1, 0, 0, 0])):
    seg = heads.Segmenter(
      width=16,
      depth=4,
      num_heads=2,
      patch_size=patch,
      image_size=64,
      num_outputs=3,
      channels=8,
      rngs=nnx.Rngs(0),
    )
    assert [len(u) for u in seg.decoder.up] == ups
    assert seg(jnp.zeros((2, 64, 64, 3))).shape == (2, 64, 64, 3)


def test_seg_loss_matches_numpy_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 5, 1)).astype(np.float32)
  target = rng.integers(0, 2, (2, 5, 5))
  p = 1 / (1 + np.exp(-logits[..., 0]))
  t = target.astype(np.float64)
  bce = -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean()
  dice = 1 - (2 * (p * t).sum((1, 2)) + 1) / (p.sum((1, 2)) + t.sum((1, 2)) + 1)
  np.testing.assert_allclose(losses.seg_loss(logits, target, 1.0), bce + dice.mean(), rtol=1e-5)
  # Three classes: softmax cross-entropy + Dice over classes 1 and 2.
  logits = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
  target = rng.integers(0, 3, (2, 5, 5))
  e = np.exp(logits - logits.max(-1, keepdims=True))
  prob = e / e.sum(-1, keepdims=True)
  onehot = np.eye(3)[target]
  ce = -(onehot * np.log(prob)).sum(-1).mean()
  inter = (prob * onehot)[..., 1:].sum((1, 2))
  total = prob[..., 1:].sum((1, 2)) + onehot[..., 1:].sum((1, 2))
  np.testing.assert_allclose(
    losses.seg_loss(logits, target, 0.5),
    ce + 0.5 * (1 - (2 * inter + 1) / (total + 1)).mean(),
    rtol=1e-5,
  )


def test_write_csv_formats_floats_and_keeps_every_column(tmp_path):
  rows = [{"a": 0.123456, "b": "x"}, {"a": 1, "c": 2.5}]
  downstream.write_csv(tmp_path / "new" / "t.csv", rows)  # the folder is created
  with open(tmp_path / "new" / "t.csv", newline="") as f:
    reader = csv.DictReader(f)
    assert reader.fieldnames == ["a", "b", "c"]  # every row's keys, in order of appearance
    assert list(reader) == [{"a": "0.1235", "b": "x", "c": ""}, {"a": "1", "b": "", "c": "2.5000"}]
  downstream.write_csv(tmp_path / "raw.csv", rows, decimals=None)
  assert (tmp_path / "raw.csv").read_text().splitlines()[1] == "0.123456,x,"


# ----------------------------------------------------------------------------- tasks and splits
def test_split_by_group_keeps_patients_whole_and_subsets_nest():
  groups = np.repeat(np.arange(50).astype(str), 3)
  splits = tasks.split_by_group(groups, (0.6, 0.2, 0.2), seed=1)
  for g in np.unique(groups):
    assert len(set(splits[groups == g])) == 1
  counts = {s: len(np.unique(groups[splits == s])) for s in tasks.SPLITS}
  assert counts == {"train": 30, "val": 10, "test": 10}
  np.testing.assert_array_equal(splits, tasks.split_by_group(groups, (0.6, 0.2, 0.2), seed=1))
  labels = np.repeat(np.arange(50) % 2, 3).astype(np.int32)
  data = tasks.TaskData(
    np.zeros((150, 4, 4, 3), np.uint8), labels, groups, splits, ("a", "b"), "cls"
  )
  small = tasks.train_subset(data, 0.2, seed=0)
  large = tasks.train_subset(data, 0.6, seed=0)
  assert set(small) <= set(large) <= set(data.indices("train"))
  assert len(np.unique(groups[small])) == 6  # 15 patients per class, 20% each
  assert set(labels[small]) == {0, 1}
  with pytest.raises(configlib.ConfigError, match="outside"):
    tasks.train_subset(data, 1.5, seed=0)
  with pytest.raises(configlib.ConfigError, match="split_fractions"):
    tasks.split_by_group(groups, (0.5, 0.2, 0.2), seed=0)


def _write_manifest(root: pathlib.Path, rows, header):
  with open(root / "labels.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return root / "labels.csv"


def test_manifest_task_reads_relative_paths_and_rejects_bad_input(tmp_path):
  (tmp_path / "img").mkdir()
  rows = []
  for i in range(12):
    Image.fromarray(np.full((20, 30), 10 * i, np.uint8)).save(tmp_path / "img" / f"{i}.png")
    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 5:15] = 255
    Image.fromarray(mask).save(tmp_path / "img" / f"{i}_m.png")
    rows.append([f"img/{i}.png", f"img/{i}_m.png", "benign" if i % 2 else "malignant", i // 2])
  path = _write_manifest(tmp_path, rows, ["image", "mask", "label", "subject"])
  data = tasks.manifest_task(
    str(path), "cls", 16, group_column="subject", classes="benign,malignant"
  )
  assert data.images.shape == (12, 16, 16, 3) and data.class_names == ("benign", "malignant")
  assert data.targets.tolist() == [1, 0] * 6 and data.groups[3] == "1"
  seg = tasks.manifest_task(str(path), "seg", 16)
  assert seg.targets.shape == (12, 16, 16) and set(np.unique(seg.targets)) == {0, 1}
  with pytest.raises(ValueError, match="not among"):
    tasks.manifest_task(str(path), "cls", 16, classes="benign,normal")
  Image.fromarray(np.zeros((7, 7), np.uint8)).save(tmp_path / "img" / "0_m.png")
  with pytest.raises(ValueError, match="line 2: mask .* is 7x7 but image .* is 30x20"):
    tasks.manifest_task(str(path), "seg", 16)
  cfg = cls_config().data
  cfg.update(
    source="manifest", manifest=str(path), group_column="subject", split_fractions=(0.9, 0.1, 0.0)
  )
  with pytest.raises(ValueError, match="'test' split is empty"):
    tasks.load_task(cfg, "cls", 16)


def test_phantom_tasks_have_the_requested_labels():
  data = tasks.phantom_task(
    "cls", ("breast", "thyroid"), 30, 32, 0, classes=("normal", "malignant")
  )
  assert set(np.unique(data.targets)) == {0, 1}
  assert {g.split("/")[0] for g in data.groups} == {"breast", "thyroid"}
  seg = tasks.phantom_task("seg", ("breast",), 10, 32, 0, seg_target="organ_and_lesion")
  assert seg.class_names == ("background", "organ", "lesion") and seg.targets.max() <= 2
  with pytest.raises(configlib.ConfigError, match="spleen"):
    tasks.phantom_task("cls", ("spleen",), 10, 32, 0)


# ----------------------------------------------------------------------------- encoder loading
def test_load_encoder_from_pretraining_checkpoint_and_timm_file(tmp_path):
  timm = pytest.importorskip("timm")
  torch = pytest.importorskip("torch")

  from ultrajax.interop import files

  dims = dict(width=32, depth=2, num_heads=2, patch_size=8, image_size=32)
  pretrained = mae.MAE(**dims, decoder_width=16, decoder_depth=1, decoder_heads=2, rngs=nnx.Rngs(1))
  mae_params = nnx.to_pure_dict(nnx.state(pretrained, nnx.Param))
  ckpt = checkpoint.Checkpointer(tmp_path / "pre")
  ckpt.save(3, mae_params, {"round": jnp.asarray(3)}, None, {"round": 3})
  ckpt.close()
  target = nnx.to_pure_dict(
    nnx.state(vit.ViT(**dims, pool="gap", num_classes=2, rngs=nnx.Rngs(2)), nnx.Param)
  )
  loaded = interop_load.load_encoder(tmp_path / "pre", target)
  np.testing.assert_array_equal(
    loaded["blocks"][1]["mlp"]["fc1"]["kernel"],
    mae_params["encoder"]["blocks"][1]["mlp"]["fc1"]["kernel"],
  )
  np.testing.assert_array_equal(loaded["head"]["kernel"], target["head"]["kernel"])  # fresh
  seg = nnx.to_pure_dict(
    nnx.state(heads.Segmenter(**dims, num_outputs=1, rngs=nnx.Rngs(3)), nnx.Param)
  )
  seg_loaded = interop_load.load_encoder(tmp_path / "pre", seg, prefix=("encoder",))
  np.testing.assert_array_equal(
    seg_loaded["encoder"]["norm"]["scale"], mae_params["encoder"]["norm"]["scale"]
  )
  # A timm ViT file (classifier head dropped) loads the same tensors as timm's own converter.
  torch.manual_seed(0)
  ref = timm.create_model(
    "vit_tiny_patch16_224",
    pretrained=False,
    img_size=32,
    patch_size=8,
    embed_dim=32,
    depth=2,
    num_heads=2,
    num_classes=5,
  )
  files.save_state_dict(tmp_path / "timm.safetensors", ref.state_dict())
  from_file = interop_load.load_encoder(tmp_path / "timm.safetensors", target)
  np.testing.assert_allclose(
    from_file["blocks"][0]["attn"]["qkv"]["kernel"],
    ref.blocks[0].attn.qkv.weight.detach().numpy().T,
  )
  # The wrong architecture names the key and both shapes.
  wrong = nnx.to_pure_dict(nnx.state(vit.ViT(**{**dims, "width": 48}, rngs=nnx.Rngs(0)), nnx.Param))
  with pytest.raises(ValueError, match=r"cls_token: got \(1, 1, 32\), expected \(1, 1, 48\)"):
    interop_load.load_encoder(tmp_path / "pre", wrong)


# ----------------------------------------------------------------------------- the job
def test_finetune_cls_smoke_resumes_bitwise_after_a_crash(tmp_path, monkeypatch):
  config = cls_config()
  config.num_seeds = 1
  config.loss.class_weights = "balanced"  # the paths off in the smoke preset
  config.aug.reprob = 0.25
  config.eval.blur_sigmas = (1.5,)
  config.train.min_steps = 16  # more than 2 epochs of one pass each: epochs of 2 passes
  config.sharding_rules = ((".*", "fsdp"),)  # params and optimizer state split over 8 devices
  rows = finetune.run(config, str(tmp_path / "full"))
  cell = tmp_path / "full" / "scratch" / "frac_1" / "seed_0"
  result = json.loads((cell / "results.json").read_text())
  batches = result["num_train"] // config.train.batch_size  # per pass over the training images
  # 2 epochs of 1 pass are fewer than 16 steps: each epoch makes the fewest whole passes that reach
  # 16 (2 batches per pass here: 4 passes, 16 steps).
  passes = result["train_steps"] // (2 * batches)
  assert result["train_steps"] == 2 * passes * batches and 2 * batches < 16
  assert 2 * (passes - 1) * batches < 16 <= 2 * passes * batches
  assert set(result["test"]) == set(downstream.CLS_METRICS)
  for name in ("roc.png", "confusion.png", "pr.png", "tsne.png", "blur.png", "test_outputs.npz"):
    assert (cell / name).exists(), name
  assert set(result["blur"]["1.5"]) == set(downstream.CLS_METRICS)
  assert {r["metric"] for r in rows} == {
    *downstream.CLS_METRICS,
    *(f"{m}@blur1.5" for m in downstream.CLS_METRICS),
  }
  assert (tmp_path / "full" / "summary.csv").exists()

  original = checkpoint.Checkpointer.save

  def crash_on_epoch_2(self, epoch, *args, **kwargs):
    if epoch == 2:
      raise KeyboardInterrupt("killed")
    return original(self, epoch, *args, **kwargs)

  monkeypatch.setattr(checkpoint.Checkpointer, "save", crash_on_epoch_2)
  with pytest.raises(KeyboardInterrupt):
    finetune.run(config, str(tmp_path / "crashed"))
  monkeypatch.setattr(checkpoint.Checkpointer, "save", original)
  finetune.run(config, str(tmp_path / "crashed"))
  resumed = json.loads(
    (tmp_path / "crashed" / "scratch" / "frac_1" / "seed_0" / "results.json").read_text()
  )
  assert resumed["test"] == result["test"]
  rows = writers.read_jsonl(
    tmp_path / "crashed" / "scratch" / "frac_1" / "seed_0" / "metrics.jsonl"
  )
  assert [r["epoch"] for r in rows] == [1, 2]


def test_finetune_seg_smoke_from_a_pretraining_checkpoint(tmp_path):
  config = seg_config()
  config.num_seeds = 1
  config.train.num_epochs = 1
  dims = dict(width=64, depth=2, num_heads=4, patch_size=8, image_size=32)
  pretrained = mae.MAE(**dims, decoder_width=32, decoder_depth=1, decoder_heads=4, rngs=nnx.Rngs(1))
  ckpt = checkpoint.Checkpointer(tmp_path / "pre")
  ckpt.save(1, nnx.to_pure_dict(nnx.state(pretrained, nnx.Param)), {"r": jnp.asarray(1)}, None, {})
  ckpt.close()
  config.variants = f"scratch=,mae={tmp_path / 'pre'}"
  rows = finetune.run(config, str(tmp_path / "ft"))
  assert {(r["variant"], r["metric"]) for r in rows} == {
    (v, m) for v in ("scratch", "mae") for m in downstream.SEG_METRICS
  }
  result = json.loads((tmp_path / "ft" / "mae" / "frac_1" / "seed_0" / "results.json").read_text())
  assert 0.0 <= result["test"]["dice"][0] <= 1.0
  # Each variant is tested against scratch on the same test images (paired bootstrap per seed).
  for r in rows:
    if r["variant"] == "mae":
      assert r["reference"] == "scratch" and 0.0 < float(r["p_bootstrap"]) <= 1.0
  assert (tmp_path / "ft" / "mae" / "frac_1" / "seed_0" / "overlays.png").exists()


def test_min_steps_makes_epochs_of_several_passes():
  # ceil(min_steps / (batches per pass x epochs)), at least one pass.
  assert finetune.passes_per_epoch(7, 100, 0) == 1
  assert finetune.passes_per_epoch(7, 100, 700) == 1
  assert finetune.passes_per_epoch(7, 100, 701) == 2
  assert finetune.passes_per_epoch(3, 20, 200) == 4  # 60 steps -> 240
  order = finetune.epoch_order(seed=3, epoch=5, num_images=10, batch=4, passes=3)
  assert order.shape == (6, 4)  # 2 whole batches per pass (drop_last), 3 passes
  rng = np.random.default_rng([3, 5])  # one generator per (seed, epoch): one pass is the old order
  for p in range(3):
    np.testing.assert_array_equal(order[2 * p : 2 * p + 2].ravel(), rng.permutation(10)[:8])


def test_compute_options_reach_the_finetuning_encoder():
  """config.model.remat / scan_layers / attention_impl, as in pretraining: the classifier's and
  the segmenter's encoders take them; a bad value fails validation naming the field."""
  config = cls_config()
  config.model.update(remat="dots", scan_layers=True, attention_impl="einsum")
  for task_type in ("cls", "seg"):
    config.task_type = task_type
    model = nnx.eval_shape(lambda: finetune.build_model(config, 3, 0))
    encoder = model if task_type == "cls" else model.encoder
    attn = encoder.blocks[0].attn
    assert (encoder.remat, encoder.scan_layers, attn.impl) == ("dots", True, "einsum")
  for field, value in (("remat", "all"), ("attention_impl", "flash")):
    config = cls_config()
    config.model[field] = value
    with pytest.raises(configlib.ConfigError, match=rf"config\.model\.{field}={value!r}"):
      finetune.validate(config)


def test_bad_finetune_configs_fail_naming_the_field(tmp_path):
  for value in (-1, -5):
    config = cls_config()
    config.train.min_steps = value
    with pytest.raises(configlib.ConfigError, match="train.min_steps"):
      finetune.validate(config)
  config = cls_config()
  config.sharding_rules = ((".*", "tensor"),)
  with pytest.raises(configlib.ConfigError, match="sharding_rules"):
    finetune.validate(config)
  config = cls_config()
  config.fractions = (0.5, 1.2)
  with pytest.raises(configlib.ConfigError, match="fractions"):
    finetune.run(config, str(tmp_path))
  config = cls_config()
  config.loss.class_weights = "inverse"
  with pytest.raises(configlib.ConfigError, match="loss.class_weights"):
    finetune.validate(config)
  config = cls_config()
  config.variants = "mae"
  with pytest.raises(configlib.ConfigError, match="name=path"):
    finetune.variants(config)
  config = cls_config()
  config.init_from = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="missing"):
    finetune.run(config, str(tmp_path / "w"))
