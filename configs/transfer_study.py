r"""Cross-organ transfer matrix: pretrain on one organ at a time, fine-tune on every organ's task.

Launch (paper-scale stages: the `paper` presets of pretrain_central.py and finetune_cls.py):
  python -m ultrajax.main --config=configs/transfer_study.py --workdir=$WORKDIR
On a laptop/CI CPU (3 organs, 3 seeds; about 20 minutes on 2 cores):
  python -m ultrajax.main --config=configs/transfer_study.py:cpu --workdir=/tmp/transfer
End-to-end check (seconds per stage):
  python -m ultrajax.main --config=configs/transfer_study.py:smoke --workdir=/tmp/transfer_smoke

Real datasets as organs (prepared TFDS datasets, docs/datasets.md; segmentation, since HC18
has masks but no labels):
  python -m ultrajax.main --config=configs/transfer_study.py:cpu --workdir=/tmp/transfer_tfds \
      --config.data.source=tfds --config.organs=busi,hc18 --config.data.tfds_data_dir=/data/tfds \
      --config.finetune_config=configs/finetune_seg.py:cpu

Writes transfer_matrix.csv (pretraining organ x task: mean test AUROC, 95% CI, gain over
scratch and its p-values: paired t-test over seeds, per-seed paired bootstrap and DeLong),
transfer_matrix.png and transfer_gain.png, and every stage's own outputs under
pretrain/<organ> and finetune/<task>; a restarted command resumes.
"""
import ml_collections

from ultrajax import configlib


def get_config(arg=None):
  knobs = configlib.parse_arg(arg, presets=("paper", "cpu", "smoke"), default_preset="paper")
  c = ml_collections.ConfigDict()
  c.job = "transfer_study"
  c.preset = knobs.preset
  c.seed = 0
  c.organs = "breast,thyroid,liver,kidney,heart,fetal_head"  # pretraining sources = tasks
  c.include_scratch = True
  # Organs: phantom organs, or with source='tfds' prepared TFDS datasets (each one an organ).
  c.data = ml_collections.ConfigDict(dict(
      source="phantom",  # 'phantom' | 'tfds'
      tfds_data_dir="",  # tfds: the datasets' data_dir ('' = TFDS's default).
      tfds_split="train",  # tfds: the split pretraining reads and fine-tuning splits by patient.
  ))
  # Stages: 'file[:preset]'; relative paths from the working directory or the repository.
  c.pretrain_config = "configs/pretrain_central.py"
  c.finetune_config = "configs/finetune_cls.py"
  # Nested overrides of those configs, e.g. --config.pretrain_overrides.fed.num_rounds=20.
  c.pretrain_overrides = ml_collections.ConfigDict()
  c.finetune_overrides = ml_collections.ConfigDict()
  if knobs.preset == "cpu":
    c.organs = "breast,thyroid,liver"
    c.pretrain_config = "configs/pretrain_central.py:cpu"
    c.finetune_config = "configs/finetune_cls.py:cpu"
    c.pretrain_overrides = ml_collections.ConfigDict(dict(
        fed=dict(num_rounds=30), data=dict(phantom_min_images=256, batch_size=32)))
    c.finetune_overrides = ml_collections.ConfigDict(dict(
        num_seeds=3, data=dict(num_images_per_organ=600), train=dict(num_epochs=12)))
  elif knobs.preset == "smoke":
    c.organs = "breast,thyroid"
    c.pretrain_config = "configs/pretrain_central.py:smoke"
    c.finetune_config = "configs/finetune_cls.py:smoke"
    # One encoder block in both stages; the pretraining evaluators are off (the study reads
    # only the pretrained checkpoints).
    c.pretrain_overrides = ml_collections.ConfigDict(dict(
        fed=dict(num_rounds=1), model=dict(depth=1),
        evals=dict(linear_probe=dict(every_rounds=0), knn=dict(every_rounds=0))))
    c.finetune_overrides = ml_collections.ConfigDict(dict(
        num_seeds=1, model=dict(depth=1), train=dict(num_epochs=1)))
  return c
