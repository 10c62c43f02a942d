r"""Downstream diagnosis: fine-tune (or linearly probe) a pretrained ViT and test it with CIs.

Launch (paper preset: ViT-B/16 at 224, MAE/UltraFedFM recipe, 5 seeds):
  python -m ultrajax.main --config=configs/finetune_cls.py --workdir=$WORKDIR \
      --config.init_from=$PRETRAIN_WORKDIR
On a laptop/CI CPU, from the `cpu` federated pretraining (phantom breast lesions, benign vs
malignant; 5 seeds in about 2.5 minutes on 2 cores; prints test AUROC etc. with 95% CIs):
  python -m ultrajax.main --config=configs/finetune_cls.py:cpu --workdir=/tmp/ft_cls \
      --config.init_from=/tmp/ultrajax_cpu
Real images, e.g. BUSI (a CSV with image,label columns; seeded split by patient):
  ... --config.data.source=manifest --config.data.manifest=../shared/data/real_us/busi_cls256/labels.csv
Studies: --config.fractions='(1.0,0.8,0.6,0.4,0.2,0.1)' (label efficiency) and
  --config.variants='scratch=,mae=/tmp/mae,ultramim=/tmp/ufm' (pretraining comparison).
URFM's fine-tuning recipe (seed 002, Table 5; 10 repeats as the paper): the `urfm` preset.

Writes <variant>/frac_<f>/seed_<s>/{results.json, metrics.jsonl, test_outputs.npz, roc.png,
pr.png, confusion.png, tsne.png (first cell of a variant), blur.png (eval.blur_sigmas)} and
summary.csv (with p-values against scratch) + label_efficiency.png to the workdir; a restarted
command resumes.
"""
import ml_collections

from ultrajax import configlib

PRESETS = ("paper", "urfm", "cpu", "smoke")


def base_config(task_type: str, preset: str) -> ml_collections.ConfigDict:
  """Fields shared by configs/finetune_cls.py and configs/finetune_seg.py (paper values)."""
  c = ml_collections.ConfigDict()
  c.job = "finetune"
  c.task_type = task_type
  c.preset = preset
  c.seed = 0
  c.num_seeds = 5  # repeats (seeds seed .. seed + num_seeds - 1); mean and t-interval over them.
  c.fractions = (1.0,)  # label efficiency: fractions of the training patients.
  # Start from: an ultrajax pretraining workdir / checkpoint, or a timm / official MAE file.
  c.init_from = ""
  # Several pretraining variants on the same task: 'name=path,...' ('scratch=' for none);
  # overrides init_from.
  c.variants = ""
  c.mode = "finetune"  # 'finetune' | 'linear_probe' (only the head trains)

  c.model = ml_collections.ConfigDict(dict(
      variant="B/16", width=0, depth=0, num_heads=0, patch_size=0,
      image_size=224,
      pool="gap",  # 'gap': global average pool + fc_norm (MAE fine-tuning) | 'cls'
      drop_path_rate=0.1,
      dtype="bfloat16",
      feature_blocks=(),  # segmentation: blocks feeding the decoder; () = 4/6/8/12 of 12.
      decoder_channels=256,
      # How the step is computed, not what (as config.model of pretrain_fed.py): attention_impl
      # 'dot_product' | 'einsum'; remat 'none' | 'dots' | 'full'; scan_layers.
      attention_impl="dot_product", remat="none", scan_layers=False,
  ))

  c.data = ml_collections.ConfigDict(dict(
      source="phantom",  # 'phantom' | 'manifest' | 'folders' | 'tfds'
      tfds_name="",  # tfds: one prepared dataset (docs/datasets.md), split by its patient_id.
      tfds_data_dir="",  # tfds: its data_dir ('' = TFDS's default).
      tfds_split="train",  # tfds: the published split the task's train/val/test are drawn from.
      organs="breast",  # phantom: comma list; several organs share one head.
      # cls: the class order; a label outside it is an error. '' = the labels found, sorted and
      # logged with counts (the phantom: benign,malignant). seg: the class names (mask_mode).
      classes="",
      # seg masks: 'binary' (0/1, 0/255 or JPEG 0/255; foreground from 128) | 'class_ids'
      # (pixel = class id, with every class named in `classes`); ultrajax/data/tasks.py.
      mask_mode="binary",
      seg_target="lesion",  # phantom segmentation: 'lesion' | 'organ' | 'organ_and_lesion'
      num_images_per_organ=2000,  # phantom draws per organ (each its own patient).
      phantom_seed=0,
      manifest="", root="",
      image_column="image", mask_column="mask", label_column="label",
      group_column="group",  # patient / subject id (e.g. subject_id for HC18)
      split_column="split",  # train/val/test per row; absent -> seeded split by group.
      split_fractions=(0.6, 0.2, 0.2),  # train, val, test shares of the patients.
      split_seed=0,  # fixed across seeds: seeds vary initialisation, order and augmentation.
      on_bad_image="raise",  # 'raise' | 'skip'
  ))

  c.aug = ml_collections.ConfigDict(dict(
      crop_scale=(0.08, 1.0), hflip=True,
      randaug_ops=2, randaug_magnitude=9.0,  # timm 'rand-m9-mstd0.5-inc1'
      reprob=0.25,  # random erasing (MAE fine-tuning's timm RandomErasing, mode 'pixel')
      mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=1.0,
      label_smoothing=0.1,
      rotate_deg=15.0, scale_jitter=1.2,  # segmentation: rotation and zoom ranges.
  ))

  c.optim = ml_collections.ConfigDict(dict(
      base_lr=5e-4,  # lr = base_lr * batch / 256 when scale_lr_by_batch (MAE rule).
      scale_lr_by_batch=True,
      min_lr=1e-6,
      warmup_epochs=5,
      b1=0.9, b2=0.999,
      weight_decay=0.05,
      weight_decay_on="mae",
      layer_decay=0.75,
      grad_clip_norm=0.0,
  ))
  c.loss = ml_collections.ConfigDict(dict(
      dice_weight=1.0,  # segmentation: CE/BCE + w * Dice
      # classification: 'none' | 'balanced' (each class weighted n / (K n_k) over the training
      # images, scikit-learn's rule; for imbalanced sets such as BUSI's 3 classes).
      class_weights="none",
  ))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=64, num_epochs=100, eval_every_epochs=1,
      # At least this many optimizer steps: a small training set (a few hundred images) makes
      # each epoch of several passes (jobs/finetune.py passes_per_epoch), so warmup, evaluation
      # and checkpoints keep counting epochs. 2000 = the 100 epochs above over a training split
      # of about 1,300 images at batch 64; larger sets are not affected. 0 = epochs only.
      min_steps=2000,
      select_metric="auroc" if task_type == "cls" else "dice",  # on the validation split
  ))
  # nsd_tolerance: surface Dice tolerance, mm where the manifest gives pixel_size_mm, else pixels.
  c.eval = ml_collections.ConfigDict(dict(
      bootstrap_samples=1000, nsd_tolerance=2.0,
      # Stability under test-time Gaussian blur (UltraFedFM Fig. 5e-f): the tested model is
      # scored again on the test images blurred with each sigma (input pixels); () = off.
      blur_sigmas=(),
  ))
  c.mesh = ml_collections.ConfigDict(dict(data=-1))
  # (regex over parameter paths, 'replicated' | 'fsdp') as in pretraining (train/sharding.py);
  # also lays out the optimizer state. paper: every leaf split over the data devices.
  c.sharding_rules = ((".*", "fsdp"),) if preset in ("paper", "urfm") else ((".*", "replicated"),)
  c.ckpt_every_epochs = 5
  # A non-finite loss or gradient: 'stop' the run naming the epoch and step (the last
  # checkpoint stays the last good one) | 'skip' that step's update and count it.
  c.on_nonfinite = "stop"
  # Resuming checks the config saved with the checkpoint: fields that change the result must
  # match. Comma-separated fields allowed to differ anyway, e.g. 'optim.base_lr'
  # (train/resume.py CHANGEABLE lists those that may always change).
  c.allow_config_change = ""

  if preset in ("cpu", "smoke"):
    # The architecture of configs/pretrain_fed.py:cpu, so its workdir loads.
    c.model.update(variant="", width=128, depth=4, num_heads=4, patch_size=8, image_size=64,
                   dtype="float32", decoder_channels=64)
    c.data.update(num_images_per_organ=1000)
    # RandAugment off and base lr 8e-3: the recipe chosen on the validation split of the real
    # BUSI task (docs/reproductions.md section 6; with RandAugment the f1.0 run did not train).
    c.aug.update(crop_scale=(0.35, 1.0), randaug_ops=0, randaug_magnitude=5.0, mixup_alpha=0.0,
                 cutmix_alpha=0.0, reprob=0.0)
    c.optim.update(base_lr=8e-3, warmup_epochs=2, layer_decay=0.75)
    # min_steps 200: the phantom tasks (about 18 batches per pass) keep one pass per epoch; a
    # real sample of ~100 training images (3 batches) gets 4 passes per epoch.
    c.train.update(batch_size=32, num_epochs=20, eval_every_epochs=2, min_steps=200)
  if preset == "smoke":
    c.model.update(width=64, depth=2, image_size=32)
    c.data.update(num_images_per_organ=60)
    c.num_seeds = 2
    c.aug.randaug_ops = 2  # so the tests run the job's RandAugment path
    c.optim.update(base_lr=1e-3, warmup_epochs=1)
    c.train.update(batch_size=8, num_epochs=2, eval_every_epochs=1, min_steps=0)
    c.eval.bootstrap_samples = 50
    c.ckpt_every_epochs = 1
  return c


def get_config(arg=None):
  knobs = configlib.parse_arg(arg, presets=PRESETS, default_preset="paper")
  c = base_config("cls", knobs.preset)
  if knobs.preset == "urfm":
    # URFM (seed 002) Table 5: AdamW 5e-4, layer decay 0.75, batch 16, RandAug(9, 0.5),
    # label smoothing 0.1, mixup 0.8, cutmix 1.0, drop path 0.1. The lr is given as is.
    c.optim.update(base_lr=5e-4, scale_lr_by_batch=False, warmup_epochs=5, b1=0.9, b2=0.999,
                   weight_decay=0.05, layer_decay=0.75)
    c.aug.update(randaug_ops=2, randaug_magnitude=9.0, label_smoothing=0.1, mixup_alpha=0.8,
                 cutmix_alpha=1.0)
    c.model.drop_path_rate = 0.1
    c.train.batch_size = 16
    c.num_seeds = 10  # "repeated 10 times" (seed 002, fine-tuning)
  return c
