"""UltraSam: full fine-tuning of SAM on ultrasound instances with simulated prompts (seed 003).

The script, in order:
  1. check the config; build the mesh and the train / test instance sets (phantom organs and
     lesions, COCO files, or a prepared TFDS dataset's masks split by patient: each connected
     component one instance), with the zero-shot split when asked (train without the target
     categories, evaluate on them only);
  2. build SAM and AdamW (linear warmup, step decay, global-norm clipping), the parameters and
     optimizer states laid out by config.sharding_rules (train/sharding.py), and the compiled
     programs once (`Programs`);
  3. resume: own workdir checkpoint (params, optimizer state, the training images' Grain
     iterator) -> config.init_from (segment_anything file or ultrajax checkpoint) -> scratch;
  4. evaluate the starting model (step 0: untrained or init_from), then train: per step the next
     batch of the Grain iterator (data/instances.py train_batches: order and flips depend only
     on the seed and the stream position, read ahead on threads), prompts drawn from key(seed,
     step), one compiled step (encoder, prompts, two decoder passes with refinement,
     focal:dice:IoU loss, train/sam_objectives.py); a non-finite step stops the run or, with
     on_nonfinite='skip', keeps the previous state (train/divergence.py);
  5. evaluate (centroid point and exact box, with and without refinement: COCO mask mAP and
     mAP@50 with predicted IoU as the score, eval/sam_eval.py), draw a PNG (viz/sam.py),
     checkpoint; a final save at the end;
  6. prompted classification (paper section 2.3, models/prompted_cls.py: frozen E_o = the
     trained encoder, trainable E_g) on the phantom's lesions or the COCO files' instances with
     a `class_label`, against a linear head on the frozen embedding; AUROC, precision, recall
     and F1 (macro and per class) with bootstrap CIs (config.classification.enabled).
Instances are padded per image to data.max_instances with a validity mask, so neither step
nor evaluation ever recompiles.
"""

from __future__ import annotations

import functools
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import periodic_actions
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ultrajax import configlib
from ultrajax.data import instances
from ultrajax.eval import downstream, metrics, sam_eval
from ultrajax.interop import files, sam as sam_interop
from ultrajax.models import prompted_cls, sam as sam_lib, vit
from ultrajax.train import (
  checkpoint,
  divergence,
  loop,
  optimizer,
  resume,
  sam_objectives as so,
  sharding,
  writers,
)
from ultrajax.viz import sam as sam_viz

EVAL_PROMPTS = {"point": so.centroid_prompts, "box": so.box_prompts}
TRAIN_KEYS = ("image", "masks", "valid")  # what the step reads of a batch


# ----------------------------------------------------------------------------- config
# config.model's compute options the image encoder takes (vit.compute_options checks them).
SAM_COMPUTE_OPTIONS = ("remat", "scan_layers", "attention_impl")


def validate(config) -> None:
  """Fails at start-up naming the first field whose value cannot work."""
  c = configlib
  c.check_choice(config, "model.variant", ("", *sam_lib.VARIANTS))
  c.check_choice(config, "model.dtype", tuple(vit.DTYPES))
  c.check_range(config, "model.image_size", 16)
  vit.compute_options(config.model, "config.model", SAM_COMPUTE_OPTIONS)
  c.check_choice(config, "data.source", ("phantom", "coco", "tfds"))
  for name in (
    "max_instances",
    "batch_size",
    "phantom_train_images",
    "phantom_test_images",
    "phantom_image_size",
  ):
    c.check_range(config, f"data.{name}", 1)
  c.check_range(config, "prompts.p_box", 0.0, 1.0)
  c.check_range(config, "prompts.max_jitter", 0.0, 0.5)
  c.check_choice(config, "loss.iou_loss", so.IOU_LOSSES)
  c.check_choice(config, "loss.iou_on", so.IOU_ON)
  for name in ("focal", "dice", "iou"):
    c.check_range(config, f"loss.{name}", 0.0)
  c.check_range(config, "optim.lr", 0.0, low_inclusive=False)
  resume.validate(config)
  sharding.check_rules(config.sharding_rules)
  c.check_range(config, "data.num_threads", 1)
  c.check_range(config, "optim.grad_clip_norm", 0.0)
  c.check_range(config, "optim.warmup_steps", 0)
  c.check_range(config, "optim.warmup_start_factor", 0.0, 1.0)
  c.check_range(config, "num_steps", 0)
  for p in config.eval.prompts:
    c.check(p in EVAL_PROMPTS, f"config.eval.prompts has {p!r}; choose from {tuple(EVAL_PROMPTS)}")
  c.check(len(config.eval.prompts) > 0, "config.eval.prompts is empty")
  c.check_range(config, "eval.batch_size", 1)
  c.check_choice(config, "eval.refine_prompt", so.REFINE_PROMPTS)
  c.check_range(config, "eval.every_steps", 1)
  validate_classification(config)
  for name in ("log_every_steps", "ckpt_every_steps", "keep_checkpoints"):
    c.check_range(config, name, 1)
  steps = list(config.optim.decay_at_steps)
  c.check(steps == sorted(steps), f"config.optim.decay_at_steps={tuple(steps)} is not increasing")
  if config.data.source == "coco":
    c.check(
      bool(config.data.train_json) and bool(config.data.test_json),
      "config.data.train_json and config.data.test_json must name COCO files when "
      "data.source='coco'",
    )
  if config.data.source == "tfds":
    c.check_one_tfds_name(config)
    c.check_range(
      config, "data.tfds_test_fraction", 0.0, 1.0, low_inclusive=False, high_inclusive=False
    )
    from ultrajax.data.tfds import source as tfds_source  # needs the [tfds] extra

    name = config.data.tfds_name.strip()
    client = tfds_source.TfdsSource(name, config.data.tfds_data_dir, config.data.tfds_split)
    c.check(client.has_mask, f"config.data.tfds_name={name!r} has no masks, so no instances")
    c.check(
      not config.classification.enabled or config.classification.category in ("", name),
      f"config.classification.category={config.classification.category!r}: TFDS instances "
      f"are of the one category {name!r} (or give '')",
    )


def validate_classification(config) -> None:
  """config.classification: the prompt, E_g's mode and size, the step counts."""
  c, cc = configlib, config.classification
  c.check_choice(config, "classification.prompt", tuple(EVAL_PROMPTS))
  c.check_choice(config, "classification.global_encoder", prompted_cls.GLOBAL_ENCODERS)
  for name in ("num_steps", "batch_size", "bootstrap_samples", "train_images", "test_images"):
    c.check_range(config, f"classification.{name}", 1)
  c.check_range(config, "classification.lr", 0.0, low_inclusive=False)
  if cc.global_encoder == "trainable":
    e = cc.eg
    width, _, heads, patch = vit.model_dims(e, "config.classification.eg")
    vit.compute_options(e, "config.classification.eg")
    c.check(
      width % heads == 0,
      f"config.classification.eg.width={width} is not divisible by "
      f"config.classification.eg.num_heads={heads}",
    )
    c.check(
      e.image_size > 0 and e.image_size % patch == 0,
      f"config.classification.eg.image_size={e.image_size} is not a positive multiple of "
      f"E_g's patch size {patch}",
    )


def sam_config(model_config) -> sam_lib.SamConfig:
  """config.model -> SamConfig: its variant's with the image, patch and window sizes of
  config.model, or (variant '') vit_b's with every size from config.model."""
  m = model_config
  shape = dict(image_size=m.image_size, patch_size=m.patch_size, window_size=m.window_size)
  if m.variant:
    return sam_lib.sam_config(m.variant, **shape)
  return sam_lib.sam_config(
    "vit_b",
    **shape,
    width=m.encoder_width,
    depth=m.encoder_depth,
    num_heads=m.encoder_heads,
    global_attn_indexes=tuple(m.global_attn_indexes),
    prompt_dim=m.prompt_dim,
    decoder_depth=m.decoder_depth,
    decoder_heads=m.decoder_heads,
    decoder_mlp_dim=m.decoder_mlp_dim,
    iou_head_hidden=m.prompt_dim,
  )


def build_model(config, rngs: nnx.Rngs) -> sam_lib.Sam:
  m = config.model
  options = vit.compute_options(m, "config.model", SAM_COMPUTE_OPTIONS)
  try:
    return sam_lib.Sam(sam_config(m), dtype=vit.DTYPES[m.dtype], **options, rngs=rngs)
  except ValueError as e:
    raise configlib.ConfigError(f"config.model: {e}") from None


# ----------------------------------------------------------------------------- data
def instance_sources(config, phantom: str, phantom_images: tuple[int, int]):
  """(train, test) instance sources of config.data: phantom images ('<phantom>_train' /
  '_test', phantom_images of each), the COCO files, or data.tfds_name's masks split by patient."""
  d = config.data
  if d.source == "phantom":
    return tuple(
      instances.PhantomInstances(f"{phantom}_{split}", n, d.phantom_image_size, config.seed)
      for split, n in zip(("train", "test"), phantom_images)
    )
  if d.source == "tfds":
    return instances.tfds_instances(
      d.tfds_name.strip(), d.tfds_data_dir, d.tfds_split, d.tfds_test_fraction, d.split_seed
    )
  root = d.image_root or None
  return instances.CocoInstances(d.train_json, root), instances.CocoInstances(d.test_json, root)


def datasets(config):
  """(train, test) InstanceDatasets; the zero-shot categories leave training for the test."""
  d = config.data
  train, test = instance_sources(config, "sam", (d.phantom_train_images, d.phantom_test_images))
  zero_shot = tuple(d.zero_shot_categories)
  size, m = config.model.image_size, d.max_instances
  return (
    instances.InstanceDataset(train, size, m, drop_categories=zero_shot),
    instances.InstanceDataset(test, size, m, keep_categories=zero_shot),
  )


# ----------------------------------------------------------------------------- programs
def _flat(x):
  """[B, M, ...] -> [B * M, ...]."""
  return x.reshape((-1,) + x.shape[2:])


def make_train_step(graphdef, tx, config):
  """(params, opt_state, batch, key) -> (params, opt_state, metrics): one optimizer step.

  metrics['loss'] is NaN where the loss or a gradient was not finite; with
  config.on_nonfinite='skip' such a step returns the params and optimizer state it was given.
  """
  weights = (config.loss.focal, config.loss.dice, config.loss.iou)
  prompt_fn = functools.partial(
    so.training_prompts, p_box=config.prompts.p_box, max_jitter=config.prompts.max_jitter
  )

  def loss_fn(params, batch, key):
    model = nnx.merge(graphdef, params)
    embeddings = model.encode_image(sam_lib.preprocess(batch["image"], config.model.image_size))
    masks = batch["masks"]
    prompts = jax.tree.map(_flat, so.prompts_for_batch(prompt_fn, key, masks > 0))
    targets = so.low_res_targets(masks, model.config.low_res_size)
    decode = so.instance_decoder(model, embeddings, masks.shape[1])
    return so.sam_loss(
      decode,
      prompts,
      _flat(targets),
      _flat(batch["valid"]),
      refine=config.loss.refine,
      weights=weights,
      iou_loss=config.loss.iou_loss,
      iou_on=config.loss.iou_on,
    )

  def step(params, opt_state, batch, key):
    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
    finite, grad_norm = divergence.finite_and_norm(loss, grads)
    new_params, new_opt = divergence.apply_update(
      tx, grads, opt_state, params, finite, config.on_nonfinite
    )
    out["loss"] = jnp.where(finite, loss, jnp.nan)
    out["grad_norm"] = grad_norm
    return new_params, new_opt, out

  return step


def make_predict(graphdef, config):
  """(params, images uint8 [B,S,S,3], masks [B,M,S,S]) -> {name: (logits [B,M,s,s], score
  [B,M])} for every evaluation prompt x refinement setting, sharing one image encoding."""
  settings = [(p, r) for p in config.eval.prompts for r in config.eval.refine]

  def predict(params, images, masks):
    model = nnx.merge(graphdef, params)
    embeddings = model.encode_image(sam_lib.preprocess(images, config.model.image_size))
    decode = so.instance_decoder(model, embeddings, masks.shape[1])
    b, m = masks.shape[:2]
    out = {}
    for prompt, refine in settings:
      prompts = jax.tree.map(_flat, so.prompts_for_batch(EVAL_PROMPTS[prompt], None, masks > 0))
      logits, score = so.predict_masks(
        decode,
        prompts,
        refine=refine,
        multimask=not config.loss.refine,
        refine_prompt=config.eval.refine_prompt,
        input_size=config.model.image_size,
      )
      name = f"{prompt}_refined" if refine else prompt
      out[name] = (logits.reshape((b, m) + logits.shape[1:]), score.reshape(b, m))
    return out

  return predict


def lr_schedule(o):
  """mmdet's LinearLR warmup (from lr * start_factor) then MultiStepLR (x decay_factor)."""
  milestones = jnp.asarray(list(o.decay_at_steps) or [np.iinfo(np.int32).max], jnp.int32)

  def schedule(step):
    warm = o.warmup_start_factor + (1 - o.warmup_start_factor) * jnp.minimum(
      step / max(o.warmup_steps, 1), 1.0
    )
    decays = (step >= milestones).sum() if o.decay_at_steps else 0
    return o.lr * warm * o.decay_factor**decays

  return schedule


def make_optimizer(config, params) -> optax.GradientTransformation:
  """AdamW with clipping; SAM's fixed Fourier matrix gets neither updates nor decay.
  params: the parameter tree (arrays or ShapeDtypeStructs: only the paths are read)."""
  o = config.optim
  trainable = sam_lib.trainable_mask(params)
  steps = optimizer.adamw_steps(o, lr_schedule(o), trainable)
  steps.append(optax.masked(optax.set_to_zero(), jax.tree.map(lambda t: not t, trainable)))
  return optax.chain(*steps)


class Programs:
  """A run's layouts and compiled functions, built once.

  params / opt: NamedShardings of the parameters and the optimizer state from
  config.sharding_rules ('fsdp' splits a leaf's largest divisible dimension over the mesh's
  'data' axis, as pretraining); batch: images split over 'data'. train_step (donating params and
  optimizer state), predict and init_opt keep those layouts.
  """

  def __init__(self, config, mesh, graphdef, abstract_params):
    rules = [tuple(r) for r in config.sharding_rules]
    self.replicated = sharding.replicated(mesh)
    self.batch = NamedSharding(mesh, P("data"))
    self.tx = make_optimizer(config, abstract_params)
    self.abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    self.params = sharding.tree_shardings(abstract_params, mesh, rules, False)
    self.opt = sharding.tree_shardings(self.abstract_opt, mesh, rules, False)
    self.init_opt = jax.jit(self.tx.init, out_shardings=self.opt)
    self.train_step = jax.jit(
      make_train_step(graphdef, self.tx, config),
      donate_argnums=(0, 1),
      out_shardings=(self.params, self.opt, self.replicated),
    )
    self.predict = jax.jit(make_predict(graphdef, config), out_shardings=self.replicated)


# ----------------------------------------------------------------------------- classification
def class_data(config) -> tuple[dict, dict, np.ndarray]:
  """(train, test, class values) for prompted classification: instances.classified_instances
  of phantom lesions drawn for it, or of the COCO files' (TFDS masks') instances of
  classification.category with a `class_label`. values: the sorted class values, >= 2."""
  cc, d = config.classification, config.data
  keep = (cc.category,) if cc.category else ()
  sets = [
    instances.classified_instances(
      instances.InstanceDataset(
        source, config.model.image_size, d.max_instances, keep_categories=keep
      )
    )
    for source in instance_sources(config, "cls", (cc.train_images, cc.test_images))
  ]
  values = np.unique(np.concatenate([s["classes"] for s in sets]))
  configlib.check(
    len(values) >= 2,
    f"classification needs >= 2 classes; the instances of "
    f"config.classification.category={cc.category!r} have only {values.tolist()}",
  )
  return sets[0], sets[1], values


def global_encoder(config, rngs: nnx.Rngs) -> vit.ViT | None:
  """E_g from config.classification (None for global_encoder='frozen')."""
  cc = config.classification
  if cc.global_encoder == "frozen":
    return None
  e = cc.eg
  width, depth, heads, patch = vit.model_dims(e, "config.classification.eg")
  return vit.ViT(
    width=width,
    depth=depth,
    num_heads=heads,
    patch_size=patch,
    image_size=e.image_size,
    pool="none",
    dtype=vit.DTYPES[config.model.dtype],
    **vit.compute_options(e, "config.classification.eg"),
    rngs=rngs,
  )


def make_classifier_programs(graphdef, tx, logits_of):
  """(train_step, probs) of one classifier, compiled once each.

  logits_of(model, emb, images, masks, key | None) -> [N, K]; train_step(params, opt, emb,
  images, masks, labels, key) -> (params, opt, loss); probs(params, emb, images, masks) ->
  softmax [N, K] (evaluation prompts)."""

  @jax.jit
  def train_step(params, opt, emb, images, masks, labels, key):
    def loss(p):
      logits = logits_of(nnx.merge(graphdef, p), emb, images, masks, key)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, value

  @jax.jit
  def probs(params, emb, images, masks):
    return jax.nn.softmax(logits_of(nnx.merge(graphdef, params), emb, images, masks, None))

  return train_step, probs


def run_classification(
  config, graphdef, params, data, workdir: pathlib.Path, writer, step: int, replicated
) -> dict:
  """Prompted classification (models/prompted_cls.py: frozen E_o = the trained UltraSam encoder,
  E_g trainable unless classification.global_encoder='frozen') against a linear head on the
  mean frozen embedding; AUROC, precision, recall, F1 with bootstrap CIs on the test instances.
  data: class_data(config); replicated: the run mesh's replicated sharding, where the
  classifiers' parameters and optimizer states live (one layout, so each step compiles once)."""
  cc = config.classification
  train, test, values = data
  labels = {n: np.searchsorted(values, d["classes"]) for n, d in (("train", train), ("test", test))}
  logging.info(
    "Classification: %d train / %d test instances, classes %s: %s / %s.",
    len(labels["train"]),
    len(labels["test"]),
    values.tolist(),
    np.bincount(labels["train"], minlength=len(values)).tolist(),
    np.bincount(labels["test"], minlength=len(values)).tolist(),
  )

  size, bsz = config.model.image_size, cc.batch_size
  encode = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_image(sam_lib.preprocess(x, size)))

  def embed(images):
    return downstream.padded_batches(lambda rows: encode(params, images[rows]), len(images), bsz)

  emb = dict(train=embed(train["images"]), test=embed(test["images"]))

  rngs = nnx.Rngs(config.seed + 1)
  prompted = prompted_cls.PromptedClassifier(
    sam_config(config.model),
    len(values),
    global_encoder=global_encoder(config, rngs),
    dtype=vit.DTYPES[config.model.dtype],
    attention_impl=config.model.attention_impl,
    rngs=rngs,
  )
  prompted_cls.load_sam_parts(prompted, params)
  prompt_eval = EVAL_PROMPTS[cc.prompt]
  prompt_fn = functools.partial(
    so.training_prompts, p_box=config.prompts.p_box, max_jitter=config.prompts.max_jitter
  )

  def prompted_logits(model, emb, images, masks, key):
    prompts = prompt_fn(key, masks > 0) if key is not None else prompt_eval(masks > 0)
    return model(emb, sam_lib.preprocess(images, size), prompts.coords, prompts.labels)

  def plain_logits(model, emb, images, masks, key):
    return model(emb.mean((1, 2)))

  plain = nnx.Linear(config.model.prompt_dim, len(values), rngs=rngs)
  classifiers = dict(prompted=(prompted, prompted_logits), plain=(plain, plain_logits))

  def rows_of(split, rows):
    """The instances at `rows`: their image's E_o tokens, the image, the mask."""
    data = train if split == "train" else test
    index = data["image_index"][rows]
    return emb[split][index], data["images"][index], data["masks"][rows]

  results, test_probs = {}, {}
  for k, (name, (model, logits_of)) in enumerate(classifiers.items()):
    g, p = nnx.split(model, nnx.Param)
    p = jax.device_put(nnx.to_pure_dict(p), replicated)
    # SAM's fixed Fourier matrix gets no decay (trainable_mask); its gradient is zero anyway.
    tx = optax.adamw(cc.lr, weight_decay=cc.weight_decay, mask=sam_lib.trainable_mask(p))
    opt = jax.device_put(tx.init(p), replicated)
    train_step, probs_of = make_classifier_programs(g, tx, logits_of)
    rng = np.random.default_rng([config.seed, step, k])
    key = jax.random.fold_in(jax.random.key(config.seed), k)
    for i in range(cc.num_steps):
      rows = rng.integers(0, len(labels["train"]), bsz)
      p, opt, value = train_step(
        p, opt, *rows_of("train", rows), labels["train"][rows], jax.random.fold_in(key, i)
      )
    probs = downstream.padded_batches(
      lambda rows: probs_of(p, *rows_of("test", rows)), len(labels["test"]), bsz
    )
    test_probs[name] = probs
    for metric, fn in sam_eval.class_metric_fns(len(values)).items():
      out = f"cls/{name}/{metric}"
      if "/" in metric:  # per class: '<metric>/class_<the source's class value>', no CI
        base, j = metric.split("/")
        results[f"cls/{name}/{base}/class_{values[int(j)]}"] = fn(labels["test"], probs)
      else:
        results[out], results[out + "_low"], results[out + "_high"] = metrics.bootstrap_ci(
          fn, labels["test"], probs, num_samples=cc.bootstrap_samples, seed=config.seed
        )
    results[f"cls/{name}/final_train_loss"] = float(value)
    logging.info(
      "Classification %-8s AUROC %.3f, precision %.3f, recall %.3f, F1 %.3f (macro)"
      ", last train loss %.3f",
      name,
      *(results[f"cls/{name}/{m}"] for m in ("auroc", "precision", "recall", "f1")),
      float(value),
    )
  writer.write_scalars(step, results)
  if jax.process_index() == 0 and len(values) == 2:
    sam_viz.classifier_rocs(
      workdir / "classification_roc.png",
      labels["test"] == 1,
      {k: v[:, 1] for k, v in test_probs.items()},
      {k: results[f"cls/{k}/auroc"] for k in test_probs},
      f"class {values[1]} vs {values[0]} (phantom: malignant vs benign)",
    )
  return results


# ----------------------------------------------------------------------------- run
def _load_init(config, model_template, params):
  """params replaced by config.init_from: a segment_anything file or an ultrajax checkpoint."""
  path = pathlib.Path(config.init_from)
  if not path.exists():
    raise FileNotFoundError(
      f"config.init_from={config.init_from!r}: nothing there (expected a "
      "segment_anything .pth/.safetensors file or an ultrajax workdir)"
    )
  if path.is_dir():
    return checkpoint.load_params(path, params)
  state_dict = files.load_state_dict(path)
  try:
    loaded = sam_interop.sam_from_torch(state_dict, model_template)
  except ValueError as e:
    raise ValueError(f"config.init_from={config.init_from!r}: {e}") from None
  return jax.tree.map(
    lambda a, like: jax.device_put(jnp.asarray(a, like.dtype), like.sharding), loaded, params
  )


def run(config: ml_collections.ConfigDict, workdir: str, *, stop_after_steps: int | None = None):
  """Trains to config.num_steps, resuming from workdir. Returns (params, eval results).

  stop_after_steps: return after that step as if killed there (tests of resuming).
  One process per workdir: a second one stops at the workdir lock (train/resume.py).
  """
  validate(config)
  with resume.WorkdirLock(workdir):
    return _run(config, pathlib.Path(workdir), stop_after_steps)


def _train_batches(config, dataset):
  """The Grain iterator of this process's training batches (data/instances.py)."""
  processes = jax.process_count()
  configlib.check(
    config.data.batch_size % processes == 0,
    f"config.data.batch_size={config.data.batch_size} is not divisible by the "
    f"{processes} processes",
  )
  return instances.train_batches(
    dataset,
    config.data.batch_size,
    config.seed,
    config.data.hflip,
    num_threads=config.data.num_threads,
    process_index=jax.process_index(),
    process_count=processes,
  )


def _run(config: ml_collections.ConfigDict, workdir: pathlib.Path, stop_after_steps: int | None):
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(1, config.mesh.data)
  num_data = mesh.shape["data"]
  for name in ("data.batch_size", "eval.batch_size"):
    configlib.check(
      configlib.get_field(config, name) % num_data == 0,
      f"config.{name}={configlib.get_field(config, name)} is not divisible by the "
      f"mesh's {num_data} data devices",
    )
  train_set, test_set = datasets(config)
  logging.info(
    "Instances: %d training images (%d skipped), %d test images (%d skipped).",
    len(train_set),
    train_set.skipped_images,
    len(test_set),
    test_set.skipped_images,
  )
  # Gathered now, so that data without classes fails before training rather than after.
  cls_data = class_data(config) if config.classification.enabled else None
  train_iter = _train_batches(config, train_set)

  graphdef, params = nnx.split(build_model(config, nnx.Rngs(config.seed)), nnx.Param)
  params = nnx.to_pure_dict(params)
  programs = Programs(config, mesh, graphdef, jax.eval_shape(lambda: params))
  params = loop.put_global(params, programs.params)

  def init():
    p = params
    if config.init_from:
      p = _load_init(config, nnx.merge(graphdef, p), p)
      logging.info("Initialised from %s.", config.init_from)
    return p, dict(opt=programs.init_opt(p))

  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  start, params, train = loop.resume_or_init(
    ckpt,
    checkpoint.abstract_like(params, programs.params),
    dict(opt=checkpoint.abstract_like(programs.abstract_opt, programs.opt)),
    init,
    config=config,
    data_iterator=train_iter,
  )
  opt_state = train["opt"]
  del train
  if jax.process_index() == 0:
    writers.truncate_jsonl(workdir / "metrics.jsonl", start, key="step")
  writer = writers.create_writer(workdir)
  writers.log_parameter_overview(params)
  if start == 0:
    writer.write_hparams(config.to_dict())  # nested: TensorBoard gets 'model.width', ...

  results = {}

  def run_eval(step):
    t0 = time.perf_counter()
    res, shown = sam_eval.evaluate_instances(
      programs.predict,
      params,
      test_set,
      batch_size=config.eval.batch_size,
      max_images=config.eval.max_images,
      batch_sharding=programs.batch,
    )
    writer.write_scalars(step, {f"eval/{k}": v for k, v in res.items()})
    scores = "  ".join(f"{k} {v:.3f}" for k, v in res.items())
    logging.info("step %d eval (%.1f s): %s", step, time.perf_counter() - t0, scores)
    if jax.process_index() == 0:
      title = ", ".join(
        f"{k} {v:.2f}" for k, v in res.items() if k.count("/") == 1 and k.endswith("/mAP")
      )
      sam_viz.mask_previews(
        workdir / "images" / f"step_{step:06d}.png", shown, f"step {step}: {title}"
      )
    return res

  if start == 0:
    results[0] = run_eval(0)
  last = config.num_steps if stop_after_steps is None else min(config.num_steps, stop_after_steps)
  progress = periodic_actions.ReportProgress(
    num_train_steps=config.num_steps, every_steps=config.log_every_steps
  )
  schedule = lr_schedule(config.optim)
  base_key = jax.random.key(config.seed)
  meta = dict(config=config.to_json_best_effort())
  # Step metrics stay on the device until a log, evaluation or save reads them, so the host
  # never waits for a step it does not need.
  t0, pending = time.perf_counter(), []
  for step in range(start, last):
    batch = next(train_iter)
    batch = {
      k: jax.make_array_from_process_local_data(programs.batch, batch[k]) for k in TRAIN_KEYS
    }
    params, opt_state, out = programs.train_step(
      params, opt_state, batch, jax.random.fold_in(base_key, step)
    )
    pending.append(out)
    done = step + 1
    log_now = loop.itstime(done, config.log_every_steps, last)
    eval_now = loop.itstime(done, config.eval.every_steps, config.num_steps)
    save_now = loop.itstime(done, config.ckpt_every_steps, config.num_steps)
    if log_now or eval_now or save_now:
      rows = jax.device_get(pending)
      first = done - len(rows) + 1
      valid = divergence.screen(
        np.array([r["loss"] for r in rows]),
        np.ones(len(rows), bool),
        where="UltraSam training",
        mode=config.on_nonfinite,
        describe=lambda i: f"step {first + i[-1]}",
      )
    if log_now:
      row = {k: float(v) for k, v in rows[np.flatnonzero(valid)[-1]].items()}  # the last good
      seconds = time.perf_counter() - t0
      row.update(lr=float(schedule(step)), img_per_s=len(rows) * config.data.batch_size / seconds)
      if config.on_nonfinite == "skip":
        row["skipped_steps"] = int(len(rows) - valid.sum())
      writer.write_scalars(done, row)
      logging.info(
        "step %d/%d  loss %.4f  %.1f img/s", done, config.num_steps, row["loss"], row["img_per_s"]
      )
      t0, pending = time.perf_counter(), []
    progress(done)
    if eval_now:
      results[done] = run_eval(done)
    if save_now:
      ckpt.save(done, params, dict(opt=opt_state), train_iter, dict(meta, step=done))
  if last == config.num_steps and config.classification.enabled:
    results["classification"] = run_classification(
      config, graphdef, params, cls_data, workdir, writer, config.num_steps, programs.replicated
    )
  writer.close()  # its event file's last events, and its thread
  ckpt.close()
  train_iter.close()
  return params, results
