r"""Per-hospital benefit report: does joining the federation help each client (issue 20 item 5)?

Launch (paper-scale stages: 16 phantom hospitals, each also pretrained alone for 300 rounds):
  python -m ultrajax.main --config=configs/benefit.py --workdir=$WORKDIR
On a laptop/CI CPU (4 clients, 40 rounds, 3 seeds; not timed: five pretrainings of
configs/pretrain_fed.py:cpu's size (its federated run takes ~8.5 minutes) plus 24 fine-tunings):
  python -m ultrajax.main --config=configs/benefit.py:cpu --workdir=/tmp/benefit
End-to-end check (2 clients, 1 round, 1 epoch; 2.2 CPU minutes, mostly three compiles):
  python -m ultrajax.main --config=configs/benefit.py:smoke --workdir=/tmp/benefit_smoke
Cheaper baseline (a randomly initialised encoder instead of pretraining each client alone; the
outputs then say 'scratch'): --config.local_baseline=scratch. Reuse a finished federated run:
--config.federated_workdir=/tmp/ufm_cpu. Own data: a manifest with client and label columns,
--config.pretrain_overrides.data.source=manifest --config.pretrain_overrides.data.manifest=F.

Writes benefit.csv (per client: test metric from the federated and the local-only encoder, the
gain with a paired bootstrap 95% CI over the client's test images, p-value), benefit_summary.csv
(spread over clients: mean, test-size weighted mean, std, min, bottom 25%, gap, Gini, Jain,
clients with a negative gain), benefit.png, and every stage's outputs under pretrain/ and
finetune/; a restarted command resumes.
"""
import ml_collections

from ultrajax import configlib


def get_config(arg=None):
  knobs = configlib.parse_arg(arg, presets=("paper", "cpu", "smoke"), default_preset="paper")
  c = ml_collections.ConfigDict()
  c.job = "benefit"
  c.preset = knobs.preset
  c.seed = 0
  # Stages: 'file[:preset]'; relative paths from the working directory or the repository.
  c.pretrain_config = "configs/pretrain_fed.py"
  c.finetune_config = "configs/finetune_cls.py"
  # Nested overrides of those configs, e.g. --config.pretrain_overrides.fed.num_rounds=20.
  c.pretrain_overrides = ml_collections.ConfigDict()
  c.finetune_overrides = ml_collections.ConfigDict()
  c.federated_workdir = ""  # a finished federated pretraining to use ('' = run it here).
  # 'pretrain': each client pretrained alone with the same config and rounds (FLamby's "Local i");
  # 'scratch': a random-init encoder instead (cheaper; not the same question, labelled so).
  c.local_baseline = "pretrain"
  # Each client's labelled task. Phantom clients: their own generator's first images_per_client
  # records with a label in `classes`. Manifest clients: their rows' label column (+ group and
  # split columns when present), images resized to the fine-tuning model's size.
  c.task = ml_collections.ConfigDict(dict(
      images_per_client=2000, classes="benign,malignant", label_column="label",
      group_column="group", split_column="split", split_fractions=(0.6, 0.2, 0.2), split_seed=0))
  c.bootstrap_samples = 1000  # resamples of each client's test images for the gain's CI.
  if knobs.preset == "cpu":
    c.pretrain_config = "configs/pretrain_fed.py:cpu"
    c.finetune_config = "configs/finetune_cls.py:cpu"
    c.finetune_overrides = ml_collections.ConfigDict(dict(
        num_seeds=3, train=dict(num_epochs=12)))
    c.task.images_per_client = 600
  elif knobs.preset == "smoke":
    c.pretrain_config = "configs/pretrain_fed.py:smoke"
    c.finetune_config = "configs/finetune_cls.py:smoke"
    # Learning rates large enough that a few rounds and epochs move the tiny model at all.
    c.pretrain_overrides = ml_collections.ConfigDict(dict(
        fed=dict(num_rounds=1), optim=dict(base_lr=0.2, warmup_rounds=1),
        evals=dict(linear_probe=dict(every_rounds=0), knn=dict(every_rounds=0))))
    c.finetune_overrides = ml_collections.ConfigDict(dict(
        num_seeds=1, train=dict(num_epochs=1), optim=dict(base_lr=0.1)))
    c.task.images_per_client = 60
    c.bootstrap_samples = 50
  return c
