r"""UltraSam: promptable SAM segmentation fully fine-tuned on ultrasound instances (seed 003).

Launch (paper preset: SAM ViT-B at 1024, 30k steps of 32 images; GPU node / TPU VM):
  python -m ultrajax.main --config=configs/sam_ultrasound.py --workdir=$WORKDIR \
      --config.init_from=/weights/sam_vit_b_01ec64.pth \
      --config.data.source=coco --config.data.train_json=/data/us43d/train.json \
      --config.data.test_json=/data/busbra/test.json
On a laptop/CI CPU (2 cores, about 33 minutes; tiny SAM on phantom organ + lesion instances):
  python -m ultrajax.main --config=configs/sam_ultrasound.py:cpu --workdir=/tmp/ultrasam_cpu
  Expected: point- and box-prompt mask mAP well above the untrained model's (docs/reproductions.md
  section 3 has the measured numbers), then prompted vs plain lesion classification AUROC,
  precision, recall and F1.
Loss: focal : dice : IoU = 20 : 1 : 1 with the paper's L1 on the predicted IoU; the official
code's MSE is --config.loss.iou_loss=mse (section 3's measured runs used MSE).
A prepared TFDS dataset's masks as instances (docs/datasets.md), split by patient:
  ... --config.data.source=tfds --config.data.tfds_name=busi --config.data.tfds_data_dir=/data/tfds \
      --config.classification.category=busi  # (its one category; its labels are the classes)
Zero-shot protocol (train without a structure, evaluate on it):
  ... --config.data.zero_shot_categories="('lesion',)"

Writes metrics.jsonl (train losses; eval/<prompt>[_refined]/mAP and mAP50 at step 0 = untrained
and after training; classification AUROC, precision, recall, F1 with 95% CIs and per-class
precision, recall, F1), TensorBoard events, a PNG of predicted
masks per evaluation and Orbax checkpoints to the workdir; a restarted command resumes there.
"""
import ml_collections

from ultrajax import configlib


def get_config(arg=None):
  knobs = configlib.parse_arg(arg, presets=("paper", "cpu", "smoke"), default_preset="paper")
  c = ml_collections.ConfigDict()
  c.job = "sam"
  c.preset = knobs.preset
  c.seed = 0
  # When the workdir has no checkpoint: a segment_anything state-dict file (sam_vit_b_01ec64.pth,
  # the paper's starting point) or an ultrajax workdir/checkpoint of this job.
  c.init_from = ""

  c.model = ml_collections.ConfigDict(dict(
      variant="vit_b",  # vit_b | vit_l | vit_h (segment_anything's), or '' and the sizes below.
      encoder_width=0, encoder_depth=0, encoder_heads=0, global_attn_indexes=(),
      window_size=14, patch_size=16,
      image_size=1024,  # model input S: long side resized to S, then padded to S x S.
      prompt_dim=256, decoder_depth=2, decoder_heads=8, decoder_mlp_dim=2048,
      dtype="bfloat16",  # computation dtype; parameters and optimizer states stay float32.
      # Encoder blocks in the backward pass: remat 'none' | 'dots' (keep matmul outputs) |
      # 'full' (recompute each block: least memory, ~1/3 slower); scan_layers: one compiled
      # group of blocks (windowed, windowed, global for vit_b) in a lax.scan; attention_impl,
      # the encoder's and the mask decoder's (the prompted classifier's too): 'dot_product'
      # (cuDNN's flash attention on a GPU, the encoder's relative terms as its bias) | 'einsum'.
      remat="none", scan_layers=False, attention_impl="dot_product",
  ))

  c.data = ml_collections.ConfigDict(dict(
      source="phantom",  # 'phantom' | 'coco' | 'tfds'
      train_json="", test_json="",  # coco: instance files (RLE or polygon masks)
      image_root="",  # coco: folder file_names are relative to ('' = each json's folder)
      # tfds: one prepared dataset with masks (docs/datasets.md); each connected component of an
      # image's mask is an instance of a category named after the dataset (its label, if any,
      # is the instance's class); train / test by patient_id.
      tfds_name="", tfds_data_dir="", tfds_split="train",
      tfds_test_fraction=0.2,  # tfds: the patients held out for evaluation.
      split_seed=0,  # tfds: seeds that patient split.
      phantom_train_images=2048, phantom_test_images=256,
      phantom_image_size=512,  # phantom images are generated at this size, then resized to S.
      max_instances=20,  # instances per image, padded with a validity mask (the official 20).
      batch_size=32,  # images per step over all devices (the paper: 8 per GPU x 4 GPUs).
      hflip=True,  # horizontal flip, p = 0.5 (the official pipeline's only augmentation).
      num_threads=8,  # Grain threads decoding and resizing training images (and batches ahead).
      # Zero-shot protocol: these category names are dropped from training and the evaluation
      # keeps only them (UltraSam*: US-43d without the target structure).
      zero_shot_categories=(),
  ))

  c.prompts = ml_collections.ConfigDict(dict(
      p_box=0.5,  # per instance: a box with this probability, else a point inside the mask.
      max_jitter=0.05,  # box corners move by up to this fraction of the box width / height.
  ))

  c.loss = ml_collections.ConfigDict(dict(
      focal=20.0, dice=1.0, iou=1.0,  # focal : dice : IoU = 20 : 1 : 1
      # Error of the predicted IoU: 'l1' (the paper, section 2.2) | 'mse' (the official code;
      # docs/reproductions.md section 3's measured runs used it).
      iou_loss="l1",
      # 'all': every multimask candidate's predicted IoU is trained (SAM; test-time selection
      # by predicted IoU needs it) | 'selected': only the best one's (UltraSam's code).
      iou_on="all",
      refine=True,  # one refinement pass: first mask logits fed back as the dense prompt.
  ))

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-4, weight_decay=1e-4, b1=0.9, b2=0.999,
      grad_clip_norm=0.1,  # global L2 norm (official config).
      warmup_steps=500, warmup_start_factor=0.001,  # linear warmup from lr * factor.
      decay_at_steps=(20000, 28000),  # x decay_factor at each (the paper; the code has 28888).
      decay_factor=0.1,
  ))

  c.num_steps = 30000

  c.eval = ml_collections.ConfigDict(dict(
      prompts=("point", "box"),  # centroid point and exact box
      # Evaluate without and with the refinement pass. Without it, a model trained with
      # loss.refine is read at its single-mask output (what its first pass learns), else at the
      # best multimask output by predicted IoU.
      refine=(False, True),
      # Pass 2's sparse prompt: 'predicted_box' (official code: a point becomes the box around
      # pass 1's mask) | 'same' (keep the click).
      refine_prompt="predicted_box",
      max_images=0,  # 0 = every test image
      batch_size=8,
      every_steps=5000,  # and at step 0 (the untrained / init_from model) and at the end.
  ))

  # Prompted classification (paper section 2.3) after segmentation training: the frozen
  # UltraSam encoder E_o, a trainable encoder E_g whose tokens are added to E_o's, and a
  # classification token decoded jointly with the prompt tokens and the image tokens; its output
  # and E_g's global embedding z_g give the class (ultrajax/models/prompted_cls.py). Against a
  # linear head on the mean frozen embedding. Data: the phantom's benign (1) vs malignant (2)
  # lesions, or, with data.source='coco', the train / test files' instances of `category` that
  # carry a `class_label` (> 0). Reports AUROC, precision, recall and F1 (macro and per class).
  c.classification = ml_collections.ConfigDict(dict(
      enabled=False,
      category="lesion",  # instances of this category carry the class ('' = every category).
      train_images=512, test_images=256,  # phantom images drawn (COCO: every image of the files)
      # 'trainable': the paper's E_g | 'frozen': no E_g (z_g = mean of E_o's tokens; the
      # variant ultrajax had before, measured in docs/reproductions.md section 3).
      global_encoder="trainable",
      # E_g, a ViT trained from scratch with the head (the paper gives neither its architecture
      # nor its initialisation: ours): variant 'B/16' etc., or '' and the sizes below. Its input
      # is the model's image resized to image_size; its tokens are resampled to E_o's grid.
      # E_g's step as config.model's of finetune_cls.py: attention_impl, remat, scan_layers.
      eg=ml_collections.ConfigDict(dict(variant="B/16", width=0, depth=0, num_heads=0,
                                        patch_size=0, image_size=224,
                                        attention_impl="dot_product", remat="none",
                                        scan_layers=False)),
      num_steps=2000, batch_size=32, lr=1e-4, weight_decay=1e-4,
      prompt="point",  # 'point' (centroid) | 'box'
      bootstrap_samples=1000,
  ))

  c.mesh = ml_collections.ConfigDict(dict(data=-1))  # -1: every device; batch split over them.
  # regex over param paths -> 'replicated' | 'fsdp' (split a leaf's largest divisible dimension
  # over the data devices, with its AdamW moments), first match wins, as in pretraining; e.g.
  # "(('.*image_encoder/.*', 'fsdp'), ('.*', 'replicated'))" for ViT-H on small devices.
  c.sharding_rules = ((".*", "replicated"),)
  c.log_every_steps = 50
  c.ckpt_every_steps = 2000
  c.keep_checkpoints = 3
  # A non-finite loss or gradient: 'stop' the run naming the step (the last checkpoint stays the
  # last good one) | 'skip' that step's update and count it (train/divergence.py).
  c.on_nonfinite = "stop"
  # Resuming checks the config saved with the checkpoint: fields that change the result must
  # match. Comma-separated fields allowed to differ anyway, e.g. 'optim.base_lr'
  # (train/resume.py CHANGEABLE lists those that may always change).
  c.allow_config_change = ""

  if knobs.preset == "cpu":
    # Patch 4: 16 x 16 tokens and 64 x 64 mask logits, so a lesion of ~30 pixels is not one
    # logit. Phantoms drawn at 128 and resized to 64 have finer speckle, like a real scan
    # resized to the model, and 4096 of them keep the model from memorising the training set
    # (docs/reproductions.md section 3 measures each change).
    c.model.update(variant="", encoder_width=96, encoder_depth=4, encoder_heads=4,
                   global_attn_indexes=(1, 3), window_size=4, patch_size=4, image_size=64,
                   prompt_dim=64, decoder_depth=2, decoder_heads=4, decoder_mlp_dim=256,
                   dtype="float32")
    c.data.update(phantom_train_images=4096, phantom_test_images=64, phantom_image_size=128,
                  max_instances=2, batch_size=16, num_threads=2)
    c.optim.update(lr=1e-3, warmup_steps=30, decay_at_steps=(2500, 2800), grad_clip_norm=1.0)
    c.num_steps = 3000  # point prompts keep improving to the end (docs/reproductions.md section 3)
    c.eval.update(every_steps=1000, batch_size=16)
    c.classification.update(enabled=True, train_images=384, test_images=128, num_steps=300,
                            batch_size=32, lr=1e-3, bootstrap_samples=500)
    # A tiny E_g on the model's 64 px input, patch 4: its 16 x 16 grid is E_o's.
    c.classification.eg.update(variant="", width=64, depth=2, num_heads=4, patch_size=4,
                               image_size=64)
    c.mesh.data = 1
    c.log_every_steps = 50
    c.ckpt_every_steps = 1000
  elif knobs.preset == "smoke":
    # One (global-attention) encoder block: the job's loop is under test here; windowed and
    # global blocks are checked against segment_anything in tests/test_sam_model.py.
    c.model.update(variant="", encoder_width=32, encoder_depth=1, encoder_heads=2,
                   global_attn_indexes=(0,), window_size=2, patch_size=8, image_size=32,
                   prompt_dim=32, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=64,
                   dtype="float32")
    c.data.update(phantom_train_images=8, phantom_test_images=4, phantom_image_size=32,
                  max_instances=2, batch_size=4, num_threads=2)
    c.optim.update(lr=1e-3, warmup_steps=1, decay_at_steps=(3,))
    c.loss.refine = False  # one decoder pass: half the compile time (tests cover refinement)
    c.num_steps = 4
    c.eval.update(every_steps=4, batch_size=4, prompts=("point",), refine=(False,))
    c.classification.update(enabled=True, train_images=12, test_images=12, num_steps=3,
                            batch_size=4, bootstrap_samples=20)
    c.classification.eg.update(variant="", width=32, depth=1, num_heads=2, patch_size=8,
                               image_size=32)
    c.mesh.data = 1
    c.log_every_steps = 2
    c.ckpt_every_steps = 2
  return c
