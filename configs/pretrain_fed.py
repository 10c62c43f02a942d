r"""Federated UltraMIM pretraining of an MAE ViT across hospital clients (UltraFedFM).

Launch (paper preset, ViT-B/16 at 224, 16 clients, 300 rounds; TPU VM or GPU node):
  python -m ultrajax.main --config=configs/pretrain_fed.py --workdir=$WORKDIR
On a laptop/CI CPU (2 cores: ~8.5 minutes; loss falls from ~2.1 after round 1 to ~0.66 after 40):
  python -m ultrajax.main --config=configs/pretrain_fed.py:cpu --workdir=/tmp/ufm_cpu
Own data instead of the phantom (one sub-folder per client, or a CSV manifest):
  ... --config.data.source=folder --config.data.root=/data/clients
  ... --config.data.source=manifest --config.data.manifest=/data/labels.csv
  ... --config.data.source=tfds --config.data.tfds_name=busi,hc18 --config.data.tfds_data_dir=/data/tfds
  (prepared TFDS datasets, one client each; docs/datasets.md)

Writes metrics.jsonl, TensorBoard events, reconstruction PNGs and Orbax checkpoints to the
workdir; a restarted command resumes from the last checkpoint there.
"""
import ml_collections

from ultrajax import configlib


def get_config(arg=None):
  knobs = configlib.parse_arg(arg, presets=("paper", "cpu", "smoke"), default_preset="paper")
  c = ml_collections.ConfigDict()
  c.job = "pretrain"
  c.preset = knobs.preset
  c.seed = 0
  # Start from (when the workdir has no checkpoint): an ultrajax workdir/checkpoint, or an
  # official MAE / timm ViT file (.pth or .safetensors; see docs/formats.md).
  c.init_from = ""
  # What the decoder predicts at masked patches: 'pixels' (MAE / UltraMIM) or 'teacher' (URFM:
  # a frozen CLIP-style teacher's tokens; see c.teacher and configs/pretrain_urfm.py).
  c.target = "pixels"

  c.model = ml_collections.ConfigDict(dict(
      variant="B/16",  # Ti/S/B/L/H + '/patch'; or set variant='' and the explicit sizes below.
      width=0, depth=0, num_heads=0, patch_size=0,
      image_size=224,
      decoder_width=512, decoder_depth=8, decoder_heads=16,
      mask_ratio=0.75,
      norm_pix_loss=True,
      drop_path_rate=0.0,
      dtype="bfloat16",  # computation dtype; parameters and optimizer states stay float32.
      pred_dim=0,  # decoder output per patch: 0 = pixels; target='teacher': the teacher token width.
      # Speed and memory only (same parameters, same math): 'dot_product' = jax.nn.dot_product_
      # attention (cuDNN flash attention on GPU; on the CPU the einsum path, faster there) or
      # 'einsum'; remat 'none' | 'dots' (keep matmul outputs) | 'full' (keep block inputs);
      # scan_layers: one compiled block, lax.scan. Remat saves memory only with scan_layers
      # (bench plan, L/16 on 8 devices: 17.1 GiB per device; with scan_layers, 13.7 for 'dots'
      # and 11.3 for 'full'; 17.2 with remat alone; docs/benchmarks.md).
      attention_impl="dot_product", remat="none", scan_layers=False,
  ))

  # Feature targets (used when c.target='teacher'). URFM does not publish the teacher layer,
  # token normalisation or loss details: the defaults marked "ours" are our choices.
  c.teacher = ml_collections.ConfigDict(dict(
      # .safetensors/.pth/.bin in open_clip BiomedCLIP layout (visual.trunk.*, visual.head.proj)
      # or timm ViT layout; '' = a randomly initialised teacher of the shape below (warned).
      file="",
      variant="B/16",  # BiomedCLIP's trunk (timm vit_base_patch16_224); or '' + sizes below.
      width=0, depth=0, num_heads=0, patch_size=0,
      image_size=224,  # teacher input; images are resized to it (antialiased bicubic).
      embed_dim=512,  # BiomedCLIP's projection width (0: the file has none, e.g. timm).
      block=0,  # ours: tokens after this 1-based block, 0 = last.
      final_norm=True,  # ours: after the trunk's final LayerNorm (timm forward_features).
      project=False,  # ours: 768-d trunk tokens, not the 512-d projection.
      align="pool",  # teacher grid -> student grid: 'pool' (exact) | 'interpolate'.
      norm="layernorm",  # ours: target per token: 'none' | 'layernorm' (no affine) | 'l2'.
      loss="mse",  # the paper's MSE; or 'smooth_l1' | 'cosine'.
      smooth_l1_beta=1.0,
      dtype="bfloat16",  # teacher compute dtype (params float32).
      cache_dir="",  # precompute targets here (needs crop_scale=(1, 1), hflip=False).
      cache_dtype="float16",
  ))

  c.ultramim = ml_collections.ConfigDict(dict(
      tgm_mode="intended",  # 'intended' (paper), 'official_code' (shipped double argsort), 'random' (MAE).
      mic=True,  # masked-image corruption of the encoder input.
      p_clean=0.5, p_each=0.5, motion_length=24, motion_angle_deg=45.0,
      gaussian_sigma=1.1, salt_pepper_density=0.1,
      smat=True,  # scan-mode partners (linear <-> convex) of images with a known probe.
      smat_ratio=1.0,  # synthetic partners per real image: 1 = the paper's 1:1 (Fig. 4d), 0 = none,
                       # 0.5 = a seeded half of the images, 2 = each partner twice.
      # linear -> convex draws this fan (the official values); convex -> linear unwarps each
      # image's own fan (phantom / manifest geometry, else estimated from the image).
      fan_angle_deg=160.0,
      inner_radius=120.0,  # pixels at the stored image's scale (the official value).
      smat_orientation="correct",  # or 'official_code' (radially inverted fan).
  ))

  c.data = ml_collections.ConfigDict(dict(
      source="phantom",  # 'phantom' | 'folder' | 'manifest' | 'tfds'
      tfds_name="",  # tfds source: prepared dataset name(s), comma-separated, each a client.
      tfds_data_dir="",  # tfds source: their data_dir ('' = TFDS's default, ~/tensorflow_datasets).
      tfds_split="train",  # tfds source: the split (TFDS slicing allowed, e.g. 'train[:80%]').
      dicom_frames="middle",  # .dcm files: 'middle' | 'all' | 'first:N' | 'every:N' (data/dicom.py)
      root="",  # folder source: root/<client>/**/*.png|jpg|jpeg|bmp
      manifest="",  # manifest source: CSV with an 'image' column (+ optional 'client', 'probe').
      image_column="image", client_column="client",
      probe="",  # probe of real images when no 'probe' column: 'linear' | 'convex' | '' (no SMAT).
      on_bad_image="skip",  # 'skip' (warn, count, use the next image) | 'raise'
      pool_clients=False,  # True: every client's images in one client (centralized training).
      clients="",  # comma-separated client names to keep ('' = all), e.g. one hospital alone.
      fraction=1.0,  # a seeded fraction of each client's images (data-fraction scaling studies).
      num_clients=16,  # phantom: the first k of the 16 Table-1 clients.
      phantom_scale=0.01,  # phantom: client sizes = Table 1 counts * scale (floored).
      phantom_min_images=64,
      phantom_organs="",  # phantom: instead of the Table-1 clients, one client per listed
                          # organ with phantom_min_images images each (e.g. 'breast').
      phantom_image_size=256,  # stored phantom resolution (crops are resized to model.image_size).
      batch_size=64,  # per client and step, over all hosts (the paper: 16 per GPU x 4 GPUs).
      crop_scale=(0.2, 1.0),
      hflip=True,
      num_threads=8,  # Grain reader threads per client.
      # Grain worker processes per client (0: threads only). Decoding and resizing hold the GIL,
      # so threads share one core; W workers use W (docs/benchmarks.md, `bench pipeline`).
      # Same batches as 0, but a checkpoint resumes only with the worker_count it was saved with.
      worker_count=0,
  ))

  c.fed = ml_collections.ConfigDict(dict(
      num_rounds=300,
      local_epochs=1,
      # Any registered strategy but splitavg (docs/federated.md): 'fedavg' (n_k / n, UltraFedFM),
      # 'fedprox', 'fedadam', 'scaffold', 'fedbn', 'personalized', ...; options as Python
      # literals, e.g. strategy_options="mu=0.01" or "server_lr=1e-2, weighting='uniform'".
      strategy="fedavg",
      strategy_options="",
      # Partial participation (fed/participation.py): 0 = every client every round; a count
      # >= 1 or a fraction in (0, 1); sampling 'uniform' | 'volume' (chances ~ n_k) | 'poisson'
      # (each client with probability clients_per_round); dropout: a sampled client fails to
      # report with this probability (it contributes nothing and is logged).
      clients_per_round=0.0,  # a float field, so a count or a fraction fits
      sampling="uniform",
      dropout=0.0,
      reset_client_optimizer=False,  # the official code keeps each client's AdamW state.
      chunk_steps=32,  # local steps per compiled call (data for them is on device at once).
      lanes=0,  # clients trained in parallel; 0 = fewest that keep a round as short as the
                # largest client's epoch (fed/rounds.py); num_clients = all at once.
      # SIMULATION ONLY (robustness checks, docs/privacy.md): '' = off, or 'scale:<factor>':
      # the clients listed in attack_clients ('3' or '1,3') send x + factor * (y_k - x).
      attack="",
      attack_clients="",
  ))

  # Example-level DP-SGD in every client's local steps (Abadi et al. 2016; not in UltraFedFM):
  # per-example gradients clipped to clip_norm, summed, N(0, (noise_multiplier * clip_norm)^2)
  # added, over the batch. Accounted per client (Poisson rate batch / n_k per local step) with
  # dp-accounting ('rdp' | 'pld'); epsilon at delta logged every round (dp_sgd/epsilon: the
  # largest over clients); epsilon_budget > 0 stops the run before a round that would pass it.
  # Composes with any fed.strategy (dp_fedavg included). docs/privacy.md.
  c.dp_sgd = ml_collections.ConfigDict(dict(
      noise_multiplier=0.0,  # 0 = off (the papers)
      clip_norm=1.0,
      delta=1e-5,
      epsilon_budget=0.0,  # 0 = none
      accountant="rdp",
  ))

  # Cross-silo deployment on Flower (ultrajax/fl, docs/deployment.md); the simulation ignores it.
  c.fl = ml_collections.ConfigDict(dict(
      site_id=-1,  # this site's client index in the consortium (seeds its draws); set per site.
      num_sites=0,  # the consortium's size (site ids 0..num_sites-1); robust / DP rules need it.
      min_clients=0,  # replies a round needs to count (weights renormalised); 0 = every site.
      retries=2,  # times a round with fewer replies is sent again before the server stops.
      round_timeout_s=0.0,  # seconds to wait for a round's replies; 0 = no limit.
      keep_site_states=3,  # rounds of optimizer/data state a site keeps (>= rounds per checkpoint).
      secagg=False,  # Flower SecAgg+: the server sees only the sum of the masked updates.
      secagg_clip_range=1.0,  # |weighted update| bound before quantisation.
      secagg_quantization=2**22,  # quantisation levels over [-clip, clip].
      secagg_max_weight=100000.0,  # the largest site's image count (weights are n_k / this).
  ))

  c.optim = ml_collections.ConfigDict(dict(
      base_lr=1.5e-4,  # lr = base_lr * batch_size / 256 (MAE rule, per client batch).
      min_lr=0.0,
      warmup_rounds=40,
      b1=0.9, b2=0.95,
      weight_decay=0.05,
      weight_decay_on="mae",  # 'mae': not on biases/norms (MAE); 'all': every parameter (official code).
      grad_clip_norm=0.0,  # 0 = off (as the paper).
  ))

  c.mesh = ml_collections.ConfigDict(dict(clients=1, data=-1))  # -1: all remaining devices.
  # regex over param paths -> 'replicated' | 'fsdp'; a tuple, so the command line can override it
  # (--config.sharding_rules="(('.*', 'replicated'),)"). paper: every leaf split over the data
  # axis, so the 16 clients' AdamW states do not sit whole on every device (MAE-B: 13 GiB);
  # `python -m ultrajax.bench plan` shows the per-device memory of a layout (docs/benchmarks.md).
  c.sharding_rules = ((".*", "fsdp"),) if knobs.preset == "paper" else ((".*", "replicated"),)

  c.log_every_rounds = 1
  # Trace this round (1-based) with jax.profiler into workdir/profile (a perfetto trace for
  # ui.perfetto.dev) and log its busiest XLA ops and how busy the device was; 0 = never.
  c.profile_round = 0
  c.image_every_rounds = 10
  # PNG of the encoder's last-block cls attention per head (UltraFedFM Figs. 7-8); 0 = off.
  c.attention_every_rounds = 50
  c.ckpt_every_rounds = 10
  c.keep_checkpoints = 3
  # A non-finite loss or gradient: 'stop' the run naming the round and step (the last
  # checkpoint stays the last good one) | 'skip' that step's update and count it.
  c.on_nonfinite = "stop"
  # Resuming checks the config saved with the checkpoint: fields that change the result must
  # match. Comma-separated fields allowed to differ anyway, e.g. 'optim.base_lr'
  # (train/resume.py CHANGEABLE lists those that may always change).
  c.allow_config_change = ""

  # Representation evaluators on the frozen encoder (ultrajax/eval/evaluators.py), run at
  # round 0 (random init), every `every_rounds` (0 = off) and at the last round; logged as
  # eval/<name>/{accuracy,auroc}. Not in the papers: a check of the features while training.
  c.evals = ml_collections.ConfigDict(dict(
      features="gap",  # 'gap' (mean patch token after the final norm) | 'cls'
      batch_size=64,  # images per compiled feature call
      # A classification task with its own seeded split (fields as configs/finetune_cls.py's
      # config.data): the probes fit on its train + val images and are scored on its test.
      task=ml_collections.ConfigDict(dict(
          source="phantom",  # 'phantom' | 'manifest' | 'folders'
          organs="breast", classes="benign,malignant", num_images_per_organ=2000, phantom_seed=0,
          manifest="", root="", image_column="image", label_column="label",
          group_column="group", split_column="split", split_fractions=(0.6, 0.2, 0.2),
          split_seed=0, on_bad_image="raise")),
      linear_probe=ml_collections.ConfigDict(dict(
          every_rounds=50, C=1.0, max_iters=1000)),  # C: inverse L2 strength, as sklearn
      knn=ml_collections.ConfigDict(dict(
          every_rounds=50, k=20, metric="cosine", weights="uniform")),
  ))

  if knobs.preset == "cpu":
    # Small enough for 2 CPU cores in under 10 minutes. Pixel targets (norm_pix_loss=False) so
    # the PNGs show what the model predicts, not the true patch statistics.
    c.model.update(variant="", width=128, depth=4, num_heads=4, patch_size=8, image_size=64,
                   decoder_width=96, decoder_depth=1, decoder_heads=4, norm_pix_loss=False,
                   dtype="float32")
    c.data.update(num_clients=4, phantom_scale=0.001, phantom_min_images=96,
                  phantom_image_size=96, batch_size=32, num_threads=0)
    c.ultramim.inner_radius = 40.0
    c.fed.update(num_rounds=40, chunk_steps=9)
    c.optim.update(base_lr=1e-2, warmup_rounds=3)
    c.image_every_rounds = 10
    c.attention_every_rounds = 10
    c.ckpt_every_rounds = 10
    # The phantom lesions of finetune_cls.py:cpu (same draws and split): 594 images.
    c.evals.task.num_images_per_organ = 1000
    c.evals.linear_probe.every_rounds = c.evals.knn.every_rounds = 10
  elif knobs.preset == "smoke":
    c.model.update(variant="", width=64, depth=2, num_heads=4, patch_size=8, image_size=32,
                   decoder_width=32, decoder_depth=1, decoder_heads=4, dtype="float32")
    c.data.update(num_clients=2, phantom_scale=0.0, phantom_min_images=16,
                  phantom_image_size=48, batch_size=4, num_threads=0)
    c.ultramim.inner_radius = 16.0
    c.fed.update(num_rounds=2, chunk_steps=2)
    c.optim.update(base_lr=1e-3, warmup_rounds=1)
    c.image_every_rounds = 1
    c.attention_every_rounds = 0  # off: the smoke run tests the loop, not the figure
    c.ckpt_every_rounds = 1
    c.evals.task.num_images_per_organ = 100  # 65 lesions: fit on 52, scored on 13
    c.evals.linear_probe.every_rounds = c.evals.knn.every_rounds = 2
    c.evals.knn.k = 5
  return c
