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

from ultrajax.models import sam as sam_lib, vit

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
  "sam_dtype",
  "float32",
  ["float32", "bfloat16"],
  "ultrajax compute dtype (PyTorch: float32 on a CPU, bf16 autocast on CUDA for bfloat16).",
)
_TORCH = flags.DEFINE_bool("sam_torch", True, "Also time segment_anything in PyTorch.")
_ATTENTION = flags.DEFINE_enum(
  "sam_attention_impl",
  "dot_product",
  list(vit.ATTENTION_IMPLS),
  "ultrajax attention (image encoder and mask decoder): dot_product (cuDNN's fused kernel on a "
  "GPU) or einsum (explicit products).",
)


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


def _programs(config: sam_lib.SamConfig, dtype: str, attention_impl: str):
  """(abstract Sam, its abstract params, encode(params, images [B, S, S, 3]) -> embedding,
  decode(params, embedding, points [P, 1, 2], labels [P, 1]) -> (masks, iou)), both jitted."""
  abstract = nnx.eval_shape(
    lambda: sam_lib.Sam(
      config, dtype=jnp.dtype(dtype), attention_impl=attention_impl, rngs=nnx.Rngs(0)
    )
  )
  graphdef, state = nnx.split(abstract, nnx.Param)

  @jax.jit
  def encode(params, x):
    return nnx.merge(graphdef, params).encode_image(x)

  @jax.jit
  def decode(params, embedding, points, labels):
    model = nnx.merge(graphdef, params)
    sparse, dense = model.encode_prompts(points, labels)
    return model.decode(embedding, sparse, dense)[:2]

  return abstract, state, encode, decode


def compile_for(
  device, variant: str, image_size: int, batch: int, prompts: int, dtype: str, attention_impl: str
) -> dict:
  """The encoder (`batch` images) and the decoder (`prompts` prompts on one embedding)
  compiled for `device`, possibly a compile-only one (`plan.target_devices`), from abstract
  inputs: nothing is allocated or run. {'encoder': compiled, 'decoder': compiled}."""
  config = sam_lib.sam_config(variant, image_size=image_size)
  mesh = jax.sharding.Mesh(np.array([device]), ("data",))
  on = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=on)  # noqa: E731
  with jax.set_mesh(mesh):  # the model picks its kernels by the mesh's platform
    _, state, encode, decode = _programs(config, dtype, attention_impl)
    params = jax.tree.map(lambda a: spec(a.shape, a.dtype), state)
    s = config.image_size
    encoder = encode.lower(params, spec((batch, s, s, 3), jnp.float32)).compile()
    embedding = encoder.out_info  # [batch, g, g, C]; the decoder takes one image's
    decoder = decode.lower(
      params,
      spec((1, *embedding.shape[1:]), embedding.dtype),
      spec((prompts, 1, 2), jnp.float32),
      spec((prompts, 1), jnp.int32),
    ).compile()
  return dict(encoder=encoder, decoder=decoder)


def _profile_encoder(encode, params, x, steps: int, mean_s: float, trace_dir: str) -> list[str]:
  """train/perf.py's profile lines for `steps` traced encoder calls, the first naming the
  trace; a failure gives one line saying so (the timings are already taken)."""
  from ultrajax.train import perf

  try:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(steps):
        jax.block_until_ready(encode(params, x))
    hlo_text = encode.lower(params, x).compile().as_text()
    what = f"{steps} encoder call(s)"
    trace, lines = perf.profile_report(trace_dir, hlo_text, steps * mean_s, what)
  except Exception as e:  # noqa: BLE001 (a profiler or trace-format problem ends the profile only)
    return [f"failed, {type(e).__name__}: {e}"]
  return [f"{lines[0]}; trace {trace}", *lines[1:]]


def run(
  variant: str,
  image_size: int,
  batch: int,
  prompts: int,
  dtype: str,
  steps: int,
  torch_peer: bool = True,
  attention_impl: str = "dot_product",
  profile_dir: str = "",
) -> dict:
  """Times ultrajax's SAM and, with torch_peer, segment_anything's with the same weights.

  Returns {'ultrajax': times, 'torch': times | None, 'embedding_diff', 'mask_diff',
  'params', 'device', 'torch_device', 'profile'}; times = {'encoder_s', 'decoder_s',
  'first_s'}: the mean seconds per encoder call (`batch` images) and per decoder call
  (`prompts` prompts), and the first calls' (compilation). The peer runs on CUDA when torch
  has it, under bf16 autocast there for dtype='bfloat16'; on a CPU in float32.
  attention_impl: Sam's. profile_dir: also trace `steps` encoder calls there (jax.profiler)
  and return, under 'profile', train/perf.py's lines on where their time went (or why not)."""
  from ultrajax.interop import sam as sam_interop

  config = sam_lib.sam_config(variant, image_size=image_size)
  b, p, s = batch, prompts, config.image_size
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
  abstract, state, encode, decode = _programs(config, dtype, attention_impl)
  nnx.replace_by_pure_dict(
    state, jax.tree.map(jnp.asarray, sam_interop.sam_from_torch(reference.state_dict(), abstract))
  )
  params = jax.device_put(state, dev)

  x = jax.device_put(images, dev)
  emb_holder = {}
  enc_first, enc_s = _timed(
    lambda: emb_holder.update(e=encode(params, x).block_until_ready()), steps
  )
  embedding = emb_holder["e"][:1]
  profile = _profile_encoder(encode, params, x, steps, enc_s, profile_dir) if profile_dir else []
  dec_first, dec_s = _timed(
    lambda: jax.block_until_ready(decode(params, embedding, points, labels)), steps
  )
  result = {
    "ultrajax": {"encoder_s": enc_s, "decoder_s": dec_s, "first_s": enc_first + dec_first},
    "torch": None,
    "profile": profile,
    "params": sum(np.size(v) for v in jax.tree.leaves(params)),
    "device": f"{jax.device_count()} x {dev.device_kind}",
  }
  if not torch_peer:
    return result
  on_cuda = torch.cuda.is_available()
  t_dev = torch.device("cuda" if on_cuda else "cpu")
  reference = reference.to(t_dev)
  sync = torch.cuda.synchronize if on_cuda else (lambda: None)
  autocast = torch.autocast(
    t_dev.type, dtype=torch.bfloat16, enabled=on_cuda and dtype == "bfloat16"
  )
  with torch.no_grad(), autocast:
    t_images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(t_dev)
    t_points = (torch.from_numpy(points).to(t_dev), torch.from_numpy(labels).to(t_dev))
    holder = {}

    def t_encode():
      holder["e"] = reference.image_encoder(t_images)
      sync()

    t_enc_first, t_enc_s = _timed(t_encode, steps)
    t_embedding = holder["e"][:1]

    def t_decode():
      sparse, dense = reference.prompt_encoder(points=t_points, boxes=None, masks=None)
      holder["m"] = reference.mask_decoder.predict_masks(
        t_embedding, reference.prompt_encoder.get_dense_pe(), sparse, dense
      )
      sync()

    t_dec_first, t_dec_s = _timed(t_decode, steps)
  ours_masks = np.asarray(decode(params, embedding, points, labels)[0], np.float32)
  theirs = lambda t: t.float().cpu().numpy()
  result.update(
    torch={"encoder_s": t_enc_s, "decoder_s": t_dec_s, "first_s": t_enc_first + t_dec_first},
    torch_device=f"{t_dev.type}, {torch.get_num_threads()} threads"
    if not on_cuda
    else torch.cuda.get_device_name(),
    embedding_diff=float(
      np.abs(
        np.asarray(emb_holder["e"], np.float32) - theirs(holder["e"].permute(0, 2, 3, 1))
      ).max()
    ),
    mask_diff=float(np.abs(ours_masks - theirs(holder["m"][0])).max()),
  )
  return result


def bench_sam(config_unused, steps: int, clients_unused, profile_dir: str = "") -> None:
  b, p, s = _BATCH.value, _PROMPTS.value, _IMAGE_SIZE.value
  r = run(_VARIANT.value, s, b, p, _DTYPE.value, steps, _TORCH.value, _ATTENTION.value, profile_dir)
  print(
    f"# SAM benchmark: {_VARIANT.value} at {s}px ({r['params'] / 1e6:.1f} M params), "
    f"encoder batch {b}, decoder batch {p} single-click prompts, {steps} timed calls; "
    f"ultrajax dtype {_DTYPE.value}, attention {_ATTENTION.value}, on {r['device']}"
  )
  print(
    f"{'implementation':<34}{'encoder img/s':>14}{'ms/img':>9}{'decoder ms':>12}"
    f"{'ms/prompt':>11}{'1st call s':>12}"
  )
  row = lambda name, t: print(
    f"{name:<34}{b / t['encoder_s']:>14.2f}{1e3 * t['encoder_s'] / b:>9.1f}"
    f"{1e3 * t['decoder_s']:>12.2f}{1e3 * t['decoder_s'] / p:>11.3f}{t['first_s']:>12.1f}"
  )
  row("ultrajax (jax.jit)", r["ultrajax"])
  for line in r["profile"]:
    print(f"profile sam encoder {line}")
  if r["torch"] is None:
    return
  row(f"segment_anything ({r['torch_device']})"[:33], r["torch"])
  print(
    f"speed-up ultrajax / torch: encoder {r['torch']['encoder_s'] / r['ultrajax']['encoder_s']:.2f}x, "
    f"decoder {r['torch']['decoder_s'] / r['ultrajax']['decoder_s']:.2f}x. Same weights: max "
    f"|embedding diff| {r['embedding_diff']:.2e}, max |mask logit diff| {r['mask_diff']:.2e} "
    "(own decoder inputs)."
  )


def bench_sam_target(device) -> None:
  """`bench sam --target=...`: the encoder and decoder compiled for one GPU of that kind on this
  host, their kernels priced by a roofline (`plan.gpu_roofline`) instead of timed."""
  from ultrajax.bench import plan as plan_lib

  b, p, s = _BATCH.value, _PROMPTS.value, _IMAGE_SIZE.value
  t0 = time.perf_counter()
  programs = compile_for(device, _VARIANT.value, s, b, p, _DTYPE.value, _ATTENTION.value)
  print(
    f"# SAM {_VARIANT.value} at {s}px compiled for {device.device_kind} (GEMMs by cuBLAS, not "
    f"autotuned; nothing run) in {time.perf_counter() - t0:.1f} s: encoder batch {b}, decoder "
    f"batch {p} prompts, dtype {_DTYPE.value}, attention {_ATTENTION.value}"
  )
  for name, per, unit in (("encoder", b, "image"), ("decoder", p, "prompt")):
    compiled = programs[name]
    r = plan_lib.gpu_roofline(compiled, device)
    temps = compiled.memory_analysis().temp_size_in_bytes / 2**30
    print(
      f"{name}: {r['launches']} kernels, {r['bytes'] / 1e9:.2f} GB moved, "
      f"{r['gemm_flops'] / 1e12:.2f} TFLOP in library GEMMs, temporaries {temps:.2f} GiB; "
      f"roofline {1e3 * r['seconds']:.2f} ms per call, {1e3 * r['seconds'] / per:.3f} ms per "
      f"{unit}, at most {per / r['seconds']:.0f} {unit}s/s (no launch costs)"
    )
    print("\n".join(plan_lib.heaviest_lines(r["heaviest"], 1, "call")))
