r"""Federated UltraMIM pretraining on the real ultrasound of ../shared/data/real_us (issue 14).

Each dataset is a hospital client (BUSI breast, HC18 and the rest of HC18 fetal head), the
architecture of configs/pretrain_fed.py:cpu (ViT width 128, depth 4, patch 8, 64 x 64) so the
`cpu` fine-tuning presets load it. The manifests come from docs/scripts/prepare_real_study.py,
which leaves every test image of the downstream tasks out of pretraining:
  python docs/scripts/prepare_real_study.py --real_us ../shared/data/real_us --out $STUDY/manifests
  python -m ultrajax.main --config=configs/pretrain_real.py:study=$STUDY --workdir=$STUDY/pre_ultrajax
The linear probe / k-NN evaluators score BUSI 3-class diagnosis on its *validation* images
(busi_probe.csv) every 5 rounds, so choices about pretraining never read a test image.
Whole study (pretraining, PyTorch MAE peer, fine-tuning, baselines): docs/scripts/real_study.sh;
results and the choices behind this preset: docs/reproductions.md section 6.
"""
import pathlib

from ultrajax import configlib


def get_config(arg=None):
  knobs = configlib.parse_arg(arg, presets=("cpu",), default_preset="cpu", study="")
  fed = configlib.load_config_module(pathlib.Path(__file__).with_name("pretrain_fed.py"))
  c = fed.get_config("cpu")
  c.preset = "real"
  manifests = pathlib.Path(knobs.study, "manifests") if knobs.study else None
  c.data.update(source="manifest", manifest=str(manifests / "pretrain.csv") if manifests else "",
                client_column="client", probe="")
  # SMAT off: BUSI and HC18 frames carry no probe geometry and HC18's are cropped from the fan.
  c.ultramim.smat = False
  # MAE's normalised-pixel targets (its reported setting; reproductions section 1 measures both).
  c.model.norm_pix_loss = True
  # 30 rounds of ~1,900 images (about 1,770 client steps at batch 32): peak lr 5e-4 (see
  # reproductions section 1 for the lr measurements), 3 warm-up rounds, cosine to 0.
  c.fed.num_rounds = 30
  c.optim.update(base_lr=4e-3, warmup_rounds=3, min_lr=0.0)
  c.evals.task.update(source="manifest",
                      manifest=str(manifests / "busi_probe.csv") if manifests else "",
                      classes="normal,benign,malignant", group_column="group",
                      split_column="split")
  c.evals.linear_probe.every_rounds = c.evals.knn.every_rounds = 5
  c.image_every_rounds = c.attention_every_rounds = c.ckpt_every_rounds = 10
  return c
