"""`python -m ultrajax.bench sam`: SAM image encoder img/s and decoder ms per prompt batch,
ultrajax (jitted JAX) next to segment_anything (PyTorch eager) in the same process (flags below).

Both models hold the same random weights (PyTorch's init, imported into ultrajax), and the
run prints their largest embedding and mask-logit differences, so the timings compare the
same computation. Decoder: `--sam_prompts` single-click prompts on one image embedding,
prompt encoding + two-way decoder + 4 masks at 4g x 4g, as SamPredictor.predict_torch with
a batch of points. On a CPU try --sam_variant=vit_b --sam_image_size=256.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from ultrajax.models import sam as sam_lib

# PyTorch (with torchvision and triton, pulled in by segment_anything) must load before
# TensorFlow, if anything imports it (tensorflow_datasets); the reverse order segfaults.
try:
  import segment_anything  # noqa: F401
  import torch
except ImportError:
  torch = None

_VARIANT = flags.DEFINE_enum(
  "sam_variant",
  "vit_b",
  sorted(sam_lib.VARIANTS),
  "SAM preset (vit_b/l/h as segment_anything, tiny).",
)
_IMAGE_SIZE = flags.DEFINE_integer("sam_image_size", 1024, "Model input side (multiple of 16).")
_BATCH = flags.DEFINE_integer("sam_batch", 1, "Images per encoder call.")
_PROMPTS = flags.DEFINE_integer("sam_prompts", 16, "Prompts per decoder call (one image).")
_DTYPE = flags.DEFINE_enum(
  "sam_dtype", "float32", ["float32", "bfloat16"], "ultrajax compute dtype (PyTorch runs float32)."
)
_TORCH = flags.DEFINE_bool("sam_torch", True, "Also time segment_anything in PyTorch.")


def torch_reference(config: sam_lib.SamConfig):
  """segment_anything's Sam with this architecture and PyTorch's random init (eval mode)."""
  from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
  )

  c, g = config, config.grid
  return Sam(
    image_encoder=ImageEncoderViT(
      img_size=c.image_size,
      patch_size=c.patch_size,
      embed_dim=c.width,
      depth=c.depth,
      num_heads=c.num_heads,
      mlp_ratio=c.mlp_ratio,
      out_chans=c.prompt_dim,
      norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
      use_rel_pos=True,
      window_size=c.window_size,
      global_attn_indexes=c.global_attn_indexes,
    ),
    prompt_encoder=PromptEncoder(
      embed_dim=c.prompt_dim,
      image_embedding_size=(g, g),
      input_image_size=(c.image_size, c.image_size),
      mask_in_chans=c.mask_in_chans,
    ),
    mask_decoder=MaskDecoder(
      num_multimask_outputs=c.num_multimask_outputs,
      transformer_dim=c.prompt_dim,
      iou_head_depth=c.iou_head_depth,
      iou_head_hidden_dim=c.iou_head_hidden,
      transformer=TwoWayTransformer(
        depth=c.decoder_depth,
        embedding_dim=c.prompt_dim,
        mlp_dim=c.decoder_mlp_dim,
        num_heads=c.decoder_heads,
      ),
    ),
  ).eval()


def _timed(fn, steps: int) -> tuple[float, float]:
  """(first call s, mean s of `steps` further calls); fn() must block until done."""
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    fn()
  return first, (time.perf_counter() - t0) / steps


def bench_sam(config_unused, steps: int, clients_unused) -> None:
  from ultrajax.interop import sam as sam_interop

  config = sam_lib.sam_config(_VARIANT.value, image_size=_IMAGE_SIZE.value)
  b, p, s = _BATCH.value, _PROMPTS.value, config.image_size
  dev = jax.devices()[0]
  rng = np.random.default_rng(0)
  images = rng.normal(size=(b, s, s, 3)).astype(np.float32)
  points = rng.uniform(0, s, (p, 1, 2)).astype(np.float32)
  labels = np.ones((p, 1), np.int32)

  if torch is None:
    raise ImportError(
      "the SAM benchmark compares with segment_anything: pip install torch "
      "torchvision segment-anything"
    )
  torch.manual_seed(0)
  reference = torch_reference(config)
  abstract = nnx.eval_shape(
    lambda: sam_lib.Sam(config, dtype=jnp.dtype(_DTYPE.value), rngs=nnx.Rngs(0))
  )
  graphdef, state = nnx.split(abstract, nnx.Param)
  nnx.replace_by_pure_dict(
    state, jax.tree.map(jnp.asarray, sam_interop.sam_from_torch(reference.state_dict(), abstract))
  )
  params = jax.device_put(state, dev)

  @jax.jit
  def encode(params, x):
    return nnx.merge(graphdef, params).encode_image(x)

  @jax.jit
  def decode(params, embedding, points, labels):
    model = nnx.merge(graphdef, params)
    sparse, dense = model.encode_prompts(points, labels)
    return model.decode(embedding, sparse, dense)[:2]

  x = jax.device_put(images, dev)
  emb_holder = {}
  enc_first, enc_s = _timed(
    lambda: emb_holder.update(e=encode(params, x).block_until_ready()), steps
  )
  embedding = emb_holder["e"][:1]
  dec_first, dec_s = _timed(
    lambda: jax.block_until_ready(decode(params, embedding, points, labels)), steps
  )
  n_params = sum(np.size(v) for v in jax.tree.leaves(params))
  print(
    f"# SAM benchmark: {_VARIANT.value} at {s}px ({n_params / 1e6:.1f} M params), "
    f"encoder batch {b}, decoder batch {p} single-click prompts, {steps} timed calls; "
    f"ultrajax dtype {_DTYPE.value} on {jax.device_count()} x {dev.device_kind}"
  )
  print(
    f"{'implementation':<34}{'encoder img/s':>14}{'ms/img':>9}{'decoder ms':>12}"
    f"{'ms/prompt':>11}{'1st call s':>12}"
  )
  row = lambda name, e, d, first: print(
    f"{name:<34}{b / e:>14.2f}{1e3 * e / b:>9.1f}{1e3 * d:>12.2f}{1e3 * d / p:>11.3f}{first:>12.1f}"
  )
  row("ultrajax (jax.jit)", enc_s, dec_s, enc_first + dec_first)
  if not _TORCH.value:
    return
  with torch.no_grad():
    t_images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    t_points = (torch.from_numpy(points), torch.from_numpy(labels))
    holder = {}
    t_enc_first, t_enc_s = _timed(lambda: holder.update(e=reference.image_encoder(t_images)), steps)
    t_embedding = holder["e"][:1]

    def t_decode():
      sparse, dense = reference.prompt_encoder(points=t_points, boxes=None, masks=None)
      holder["m"] = reference.mask_decoder.predict_masks(
        t_embedding, reference.prompt_encoder.get_dense_pe(), sparse, dense
      )

    t_dec_first, t_dec_s = _timed(t_decode, steps)
  name = f"segment_anything (torch, {torch.get_num_threads()} thr)"
  row(name, t_enc_s, t_dec_s, t_enc_first + t_dec_first)
  ours_masks = np.asarray(decode(params, embedding, points, labels)[0])
  emb_diff = np.abs(np.asarray(emb_holder["e"]) - holder["e"].permute(0, 2, 3, 1).numpy())
  mask_diff = np.abs(ours_masks - holder["m"][0].numpy())
  print(
    f"speed-up ultrajax / torch: encoder {t_enc_s / enc_s:.2f}x, decoder "
    f"{t_dec_s / dec_s:.2f}x. Same weights: max |embedding diff| {emb_diff.max():.2e}, "
    f"max |mask logit diff| {mask_diff.max():.2e} (own decoder inputs)."
  )
