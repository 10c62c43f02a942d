r"""Downstream segmentation: a pyramid decoder on ViT blocks 4/6/8/12, Dice / IoU / HD95 with CIs.

Launch (paper preset: ViT-B/16 at 224, 5 seeds):
  python -m ultrajax.main --config=configs/finetune_seg.py --workdir=$WORKDIR \
      --config.init_from=$PRETRAIN_WORKDIR
On a laptop/CI CPU, from the `cpu` federated pretraining (phantom breast lesion masks; 3 seeds in
about 2 minutes on 2 cores; prints test Dice, IoU and HD95 with 95% CIs):
  python -m ultrajax.main --config=configs/finetune_seg.py:cpu --workdir=/tmp/ft_seg \
      --config.init_from=/tmp/ultrajax_cpu
Real images (CSV with image and mask columns; binary masks 0/1, 0/255 or JPEG 0/255, or class
ids with --config.data.mask_mode=class_ids --config.data.classes=background,...; by patient):
  ... --config.data.source=manifest --config.data.manifest=../shared/data/real_us/hc18/labels.csv \
      --config.data.group_column=subject_id
Multi-class phantom maps (organ and lesion): --config.data.seg_target=organ_and_lesion.

Writes <variant>/frac_<f>/seed_<s>/{results.json, metrics.jsonl, overlays.png} and summary.csv
to the workdir; a restarted command resumes.
"""

import pathlib

from ultrajax import configlib

_CLS = configlib.load_config_module(pathlib.Path(__file__).with_name("finetune_cls.py"))


def get_config(arg=None):
  knobs = configlib.parse_arg(arg, presets=("paper", "cpu", "smoke"), default_preset="paper")
  c = _CLS.base_config("seg", knobs.preset)
  # Segmentation keeps the whole field of view: flips, small rotations and zoom only.
  c.aug.update(randaug_ops=0, reprob=0.0, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0)
  # The lr as given, not scaled by the batch: MAE/BEiT's UPerNet recipe (1e-4 at batch 16).
  c.optim.update(base_lr=1e-4, scale_lr_by_batch=False, layer_decay=0.65)
  if knobs.preset == "paper":
    c.train.update(batch_size=16, num_epochs=100)
  elif knobs.preset == "cpu":
    # Fits 10 minutes on 2 cores: validation Dice plateaus by epoch ~12 (docs/reproductions.md);
    # a narrower decoder (with its fusion at stride 4 it takes about a sixth of the step, 28 of
    # 176 ms). lr 2e-3: chosen on the validation split of two real tasks (docs/reproductions.md
    # section 6; 5e-4 underfit both).
    c.optim.update(base_lr=2e-3, layer_decay=0.75)
    c.model.decoder_channels = 32
    c.train.num_epochs = 12
    c.num_seeds = 3
  else:
    c.optim.update(base_lr=5e-4, layer_decay=0.75)
  return c
