"""SAM: parity with segment_anything (random weights), interop round trips, the predictor.

segment_anything's ViT-B (module fixture, no forward) checks the config, key layout and decoder
at full size, and its encoder at 1024 px through its first global block; everything else runs
on a tiny SAM built from segment_anything's own classes, with every parameter
randomised (SAM zero-initialises its position tables, which would hide bugs there).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
segment_anything = pytest.importorskip("segment_anything")
from segment_anything import (
  SamPredictor as TorchPredictor,
  sam_model_registry,
)

from ultrajax.bench.sam import torch_reference as torch_sam
from ultrajax.eval import coco_eval, sam_predictor
from ultrajax.interop import (
  files,
  sam as sam_interop,
)
from ultrajax.models import sam

TINY = dict(
  image_size=128,
  width=64,
  depth=2,
  num_heads=2,
  global_attn_indexes=(1,),
  window_size=3,  # 8 x 8 grid: windows are padded 8 -> 9, as SAM's 64 -> 70
  prompt_dim=32,
  mask_in_chans=8,
  decoder_heads=2,
  decoder_mlp_dim=64,
  iou_head_hidden=32,
)


def randomize(model, names=None, seed=0):
  """Seeded random values for the named parameters (all when names is None); norm scales
  stay around 1 so activations keep their size."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if names is None or any(n in name for n in names):
        noise = torch.randn(p.shape, generator=gen) * (0.2 if p.ndim > 1 else 0.1)
        p.copy_(noise + (1.0 if "norm" in name and name.endswith("weight") else 0.0))


def to_ours(tmodel, config):
  """(our Sam with the PyTorch weights, its pure-dict params); built abstractly, so no time
  goes into a random init that is overwritten."""
  abstract = nnx.eval_shape(lambda: sam.Sam(config, rngs=nnx.Rngs(0)))
  params = sam_interop.sam_from_torch(tmodel.state_dict(), abstract)
  graphdef, state = nnx.split(abstract, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state), params


@functools.partial(jax.jit, static_argnums=0)
def _prompt_and_decode(graphdef, params, embedding, prompts):
  model = nnx.merge(graphdef, params)
  sparse, dense = model.encode_prompts(**prompts)
  return sparse, dense, model.decode(embedding, sparse, dense)


def nhwc(t):
  return t.detach().permute(0, 2, 3, 1).numpy()


def close(ours, theirs, rtol=1e-5):
  """float32 agreement relative to the output's scale."""
  theirs = np.asarray(theirs)
  np.testing.assert_allclose(
    np.asarray(ours), theirs, rtol=0, atol=rtol * max(1.0, float(np.abs(theirs).max()))
  )


def prompt_sets(rng, n, size):
  low = 4 * (size // 16)  # mask prompts are [4g, 4g]
  points = rng.uniform(0, size, (n, 3, 2)).astype(np.float32)
  labels = np.array([[1, 0, 1], [1, -1, -1], [0, 1, 1]])[:n]
  xy0 = rng.uniform(0, size / 2, (n, 2))
  boxes = np.concatenate([xy0, xy0 + rng.uniform(1, size / 2, (n, 2))], 1).astype(np.float32)
  masks = rng.normal(0, 3, (n, low, low)).astype(np.float32)
  return {
    "point": dict(points=points, labels=labels),
    "box": dict(boxes=boxes),
    "point+box": dict(points=points, labels=labels, boxes=boxes),
    "box+mask": dict(boxes=boxes, masks=masks),
    "point+mask": dict(points=points, labels=labels, masks=masks),
  }


def check_decoder(tmodel, model, t_embedding, j_embedding, prompts):
  """Prompt encoder + mask decoder of both models on each prompt kind: embeddings, all four
  masks and IoU predictions (the multimask / single-mask choice is a slice of these)."""
  graphdef, params = nnx.split(model, nnx.Param)
  for kind, p in prompts.items():
    with torch.no_grad():
      t_points = (
        None
        if "points" not in p
        else (torch.from_numpy(p["points"]), torch.from_numpy(p["labels"]))
      )
      t_sparse, t_dense = tmodel.prompt_encoder(
        points=t_points,
        boxes=None if "boxes" not in p else torch.from_numpy(p["boxes"]),
        masks=None if "masks" not in p else torch.from_numpy(p["masks"][:, None]),
      )
      t_masks, t_iou = tmodel.mask_decoder.predict_masks(
        torch.from_numpy(t_embedding).permute(0, 3, 1, 2),
        tmodel.prompt_encoder.get_dense_pe(),
        t_sparse,
        t_dense,
      )
    sparse, dense, out = _prompt_and_decode(graphdef, params, j_embedding, p)
    close(sparse, t_sparse.numpy())
    close(dense, nhwc(t_dense))
    assert out.masks.shape == t_masks.shape, kind
    close(out.masks, t_masks.numpy(), 1e-4)
    close(out.iou, t_iou.numpy(), 1e-4)


# ----------------------------------------------------------------------------- full ViT-B
@pytest.fixture(scope="module")
def vit_b():
  """segment_anything's ViT-B and ours from its state dict; no forward pass here (the tests
  that read the config, the decoder or the key layout need none)."""
  torch.manual_seed(0)
  tmodel = sam_model_registry["vit_b"](checkpoint=None)
  randomize(tmodel, names=("pos_embed", "rel_pos"), seed=1)  # zero-initialised in SAM
  config = sam_interop.config_from_state_dict(tmodel.state_dict())
  model, params = to_ours(tmodel, config)
  return tmodel, model, params


def test_vit_b_config_read_from_state_dict(vit_b):
  tmodel, model, _ = vit_b
  assert model.config == sam.sam_config("vit_b")
  assert len(tmodel.state_dict()) == 314


def test_vit_b_image_embeddings_match(vit_b):
  """ViT-B's own weights at 1024 px through its blocks 0-2 (two windowed blocks, 64 -> 70
  padded into 14 x 14 windows, then its first global block with 127-long relative position
  tables) and the neck: every kind of encoder layer at the real sizes, at a quarter of the
  12-block forward's cost (the later blocks repeat these two kinds; their weights' layout is
  checked by the export test, the config by test_vit_b_config_read_from_state_dict)."""
  tfull, _, _ = vit_b
  config = sam.sam_config("vit_b", depth=3, global_attn_indexes=(2,))
  later = tuple(f"image_encoder.blocks.{i}." for i in range(3, 12))
  tmodel = torch_sam(config)
  tmodel.load_state_dict(
    {k: v for k, v in tfull.state_dict().items() if not k.startswith(later)}, strict=True
  )
  model, _ = to_ours(tmodel, config)
  image = np.random.default_rng(0).normal(size=(1, 1024, 1024, 3)).astype(np.float32)
  with torch.no_grad():
    t_embedding = nhwc(tmodel.image_encoder(torch.from_numpy(image).permute(0, 3, 1, 2)))
  j_embedding = np.asarray(jax.jit(lambda x: model.encode_image(x))(image))
  assert j_embedding.shape == (1, 64, 64, 256)
  close(j_embedding, t_embedding, 1e-4)


def test_vit_b_decoder_matches_for_point_box_and_mask_prompts(vit_b):
  tmodel, model, _ = vit_b
  prompts = prompt_sets(np.random.default_rng(1), 2, 1024)
  prompts = {k: prompts[k] for k in ("point", "point+box", "box+mask")}
  # Both decoders read the same embedding (unit-scale, as the encoder neck's LayerNorm gives),
  # so this checks the prompt encoder and decoder alone.
  embedding = np.random.default_rng(2).normal(size=(1, 64, 64, 256)).astype(np.float32)
  check_decoder(tmodel, model, embedding, jnp.asarray(embedding), prompts)


def test_vit_b_export_keys_shapes_and_exact_round_trip(vit_b, tmp_path):
  tmodel, model, params = vit_b
  exported = sam_interop.sam_to_torch(params)
  reference = tmodel.state_dict()
  assert list(exported) == list(reference)
  assert {k: v.shape for k, v in exported.items()} == {
    k: tuple(v.shape) for k, v in reference.items()
  }
  path = files.save_state_dict(tmp_path / "sam.safetensors", exported)
  again = sam_interop.sam_from_torch(files.load_state_dict(path), model)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  # segment_anything loads the export strictly and gets the same tensors back.
  fresh = sam_model_registry["vit_b"](checkpoint=None)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  assert all(torch.equal(fresh.state_dict()[k], v) for k, v in reference.items())


# ----------------------------------------------------------------------------- tiny SAM
@pytest.fixture(scope="module")
def tiny():
  config = sam.sam_config("tiny", **TINY)
  tmodel = torch_sam(config)
  randomize(tmodel, seed=2)
  model, params = to_ours(tmodel, config)
  return tmodel, model, params


def test_tiny_encoder_with_padded_windows_and_decoder_match(tiny):
  tmodel, model, _ = tiny
  images = np.random.default_rng(3).normal(size=(2, 128, 128, 3)).astype(np.float32)
  with torch.no_grad():
    t_embedding = nhwc(tmodel.image_encoder(torch.from_numpy(images).permute(0, 3, 1, 2)))
  graphdef, params = nnx.split(model, nnx.Param)
  j_embedding, vit_features = jax.jit(
    lambda p, x: nnx.merge(graphdef, p).encode_image(x, return_vit=True)
  )(params, images)
  close(j_embedding, t_embedding, 1e-5)
  assert vit_features.shape == (2, 8, 8, 64)
  prompts = prompt_sets(np.random.default_rng(4), 3, 128)
  # The prompt kinds the ViT-B test leaves out (together they cover all five).
  check_decoder(
    tmodel, model, t_embedding[:1], j_embedding[:1], {k: prompts[k] for k in ("box", "point+mask")}
  )
  # multimask_output picks masks 1..3, else mask 0, as MaskDecoder.forward.
  sparse, dense = model.encode_prompts(**prompts["point"])
  for multimask in (True, False):
    with torch.no_grad():
      t_masks, t_iou = tmodel.mask_decoder(
        torch.from_numpy(t_embedding[:1]).permute(0, 3, 1, 2),
        tmodel.prompt_encoder.get_dense_pe(),
        torch.from_numpy(np.asarray(sparse)),
        torch.from_numpy(np.asarray(dense)).permute(0, 3, 1, 2),
        multimask,
      )
    masks, iou = model.decode_masks(j_embedding[:1], model.dense_pe(), sparse, dense, multimask)
    close(masks, t_masks.numpy(), 1e-4)
    close(iou, t_iou.numpy(), 1e-4)


def test_remat_and_scan_give_the_encoders_embedding_and_gradient():
  """config.model.remat and scan_layers change how the encoder is computed, not what: four
  blocks in the pattern windowed, global, windowed, global (two scan steps of two blocks), drop
  path on (per-block keys and rates replayed), the same embedding and gradients as the loop."""
  config = sam.sam_config(
    "tiny", depth=4, global_attn_indexes=(1, 3), drop_path_rate=0.3, image_size=64
  )
  images = np.random.default_rng(9).normal(size=(2, 64, 64, 3)).astype(np.float32)
  key = jax.random.key(3)
  # A fixed random read-out: the sum of squares of the LayerNorm'd neck is nearly constant, so
  # its gradient would be all cancellation.
  weights = np.random.default_rng(4).normal(size=(2, 4, 4, 32)).astype(np.float32)

  def loss(p, g):
    return jnp.sum(nnx.merge(g, p).encode_image(images, key=key) * weights)

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  graphdef, params = nnx.split(sam.Sam(config, rngs=nnx.Rngs(0)), nnx.Param)
  value, grads = value_and_grad(params, graphdef)
  for options in (dict(remat=True), dict(remat="dots", scan_layers=True)):
    model = sam.Sam(config, **options, rngs=nnx.Rngs(0))
    assert model.image_encoder.period == 2
    other_graphdef, other_params = nnx.split(model, nnx.Param)
    assert jax.tree.structure(other_params) == jax.tree.structure(params)  # names kept
    other_value, other_grads = value_and_grad(params, other_graphdef)
    close(other_value, value, 1e-6)
    jax.tree.map(lambda a, b: close(a, b, 1e-5), other_grads, grads)

  # vit_b repeats every 3 blocks, vit_h every 8; a pattern without a repeat is one scan step.
  def period(name, **kw):
    c = sam.sam_config(name, **kw)
    return nnx.eval_shape(lambda: sam.ImageEncoder(c, dtype=jnp.float32, rngs=nnx.Rngs(0))).period

  periods = {
    "vit_b": period("vit_b"),
    "vit_h": period("vit_h"),
    "tiny": period("tiny", depth=3, global_attn_indexes=(0,)),
  }
  assert periods == {"vit_b": 3, "vit_h": 8, "tiny": 3}


def test_fused_attention_equals_the_einsum_path(monkeypatch):
  """attention_impl='dot_product' off the CPU: vit.fused_attention, in the encoder with the
  decomposed relative terms as its bias, and in the mask decoder. Reported as a GPU here (so
  float32 runs XLA's jax.nn.dot_product_attention and bfloat16 first asks cuDNN, which this
  machine refuses): the same embedding, mask logits and gradients, relative-position tables
  included, as the einsum path, with padded windows (8 -> 9)."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  config = sam.sam_config("tiny", depth=2, global_attn_indexes=(1,), window_size=3)
  rng = np.random.default_rng(2)
  images = rng.normal(size=(2, 128, 128, 3)).astype(np.float32)
  weights = rng.normal(size=(2, 8, 8, 32)).astype(np.float32)

  def build(impl, dtype=jnp.float32):
    model = sam.Sam(config, dtype=dtype, attention_impl=impl, rngs=nnx.Rngs(0))
    for block in model.image_encoder.blocks:  # zero at init (SAM's); random here
      for table in (block.attn.rel_pos_h, block.attn.rel_pos_w):
        table[...] = jnp.asarray(rng.normal(size=table.shape), jnp.float32)
    return nnx.split(model, nnx.Param)

  points = rng.uniform(0, 128, (3, 1, 2)).astype(np.float32)
  mask_weights = rng.normal(size=(3, 4, 32, 32)).astype(np.float32)

  def loss(p, g):
    model = nnx.merge(g, p)
    embedding = model.encode_image(images)
    masks = model.decode(
      embedding[:1], *model.encode_prompts(points, np.ones((3, 1), np.int32))
    ).masks
    return jnp.sum(embedding * weights) + jnp.sum(masks * mask_weights)

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  graphdef, params = build("einsum")
  fused_graphdef, _ = build("dot_product")
  value, grads = value_and_grad(params, graphdef)
  fused_value, fused_grads = value_and_grad(params, fused_graphdef)
  close(fused_value, value, 1e-5)
  jax.tree.map(lambda a, b: close(a, b, 1e-4), fused_grads, grads)
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  rel = [v for k, v in leaves if "rel_pos" in str(k)]
  assert len(rel) == 4 and all(float(jnp.abs(v).max()) > 0 for v in rel)
  decoder_qkv = [v for k, v in leaves if "transformer" in str(k) and "q_proj" in str(k)]
  assert len(decoder_qkv) >= 6 and all(float(jnp.abs(v).max()) > 0 for v in decoder_qkv)
  (g16, _), (f16, _) = build("einsum", jnp.bfloat16), build("dot_product", jnp.bfloat16)
  a, b = (np.asarray(nnx.merge(g, params).encode_image(images)) for g in (g16, f16))
  assert np.linalg.norm(a - b) / np.linalg.norm(a) < 2e-2  # bfloat16 rounding


def test_config_from_state_dict_reads_tiny_and_rejects_other_dicts(tiny):
  tmodel, model, _ = tiny
  assert sam_interop.config_from_state_dict(tmodel.state_dict(), decoder_heads=2) == model.config
  with pytest.raises(ValueError, match="image_encoder.pos_embed"):
    sam_interop.config_from_state_dict({"blocks.0.attn.qkv.weight": np.zeros((3, 1))})


def test_import_names_missing_unexpected_and_misshaped_keys(tiny):
  tmodel, model, _ = tiny
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  del sd["mask_decoder.iou_token.weight"]
  sd["image_encoder.blocks.0.attn.rel_pos_h"] = np.zeros((7, 32), np.float32)
  sd["prompt_encoder.extra"] = np.zeros(1, np.float32)
  with pytest.raises(ValueError) as err:
    sam_interop.sam_from_torch(sd, model)
  message = str(err.value)
  assert "missing keys: [mask_decoder.iou_token.weight]" in message
  assert "unexpected keys: [prompt_encoder.extra]" in message
  assert "image_encoder.blocks.0.attn.rel_pos_h: got (7, 32), expected (5, 32)" in message


def test_box_as_corner_points_and_mask_valid(tiny):
  """A box equals two points labelled 2 and 3 (one static shape for mixed prompt batches);
  mask_valid=False gives the no-mask embedding."""
  _, model, _ = tiny
  boxes = np.array([[10, 20, 60, 90], [5, 5, 100, 70]], np.float32)
  sparse, _ = model.encode_prompts(boxes=boxes)
  as_points = model.prompt_encoder.embed_points(boxes.reshape(2, 2, 2), np.array([[2, 3]] * 2))
  np.testing.assert_array_equal(sparse, as_points)
  masks = np.random.default_rng(6).normal(size=(2, 32, 32)).astype(np.float32)
  _, dense = model.encode_prompts(boxes=boxes, masks=masks, mask_valid=np.array([True, False]))
  _, no_mask = model.encode_prompts(boxes=boxes)
  _, with_mask = model.encode_prompts(boxes=boxes, masks=masks)
  np.testing.assert_array_equal(dense[1], no_mask[1])
  np.testing.assert_array_equal(dense[0], with_mask[0])
  with pytest.raises(ValueError, match=r"\[N, 32, 32\]"):
    model.encode_prompts(boxes=boxes, masks=masks[:, :16, :16])


def test_cls_tokens_hook_shapes_and_export(tiny):
  tmodel, _, _ = tiny
  config = sam.sam_config("tiny", **dict(TINY, num_cls_tokens=2))
  abstract = nnx.eval_shape(lambda: sam.Sam(config, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="no segment_anything key"):  # needs their values
    sam_interop.sam_from_torch(tmodel.state_dict(), abstract)
  graphdef, state = nnx.split(abstract, nnx.Param)
  cls_tokens = np.arange(64, dtype=np.float32).reshape(2, 32)
  values = dict(tiny[2], mask_decoder=dict(tiny[2]["mask_decoder"], cls_tokens=cls_tokens))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, values))
  model = nnx.merge(graphdef, state)
  params = sam_interop.sam_from_torch(tmodel.state_dict(), model)
  out = jax.eval_shape(
    lambda: model.decode(
      jnp.zeros((1, 8, 8, 32)),
      *model.encode_prompts(np.zeros((3, 1, 2), np.float32), np.ones((3, 1))),
    )
  )
  assert out.cls_tokens.shape == (3, 2, 32)
  assert out.mask_tokens.shape == (3, 4, 32) and out.image_tokens.shape == (3, 8, 8, 32)
  np.testing.assert_array_equal(params["mask_decoder"]["cls_tokens"], cls_tokens)
  assert list(sam_interop.sam_to_torch(params)) == list(tmodel.state_dict())


def test_prompted_classifier_against_segment_anything_transformer(tiny):
  """Paper section 2.3: E_g's projected tokens are added to E_o's, a classification token goes
  through segment_anything's two-way transformer after the mask tokens and before the prompt
  tokens, and its output concatenated with z_g feeds the head. Gradients reach E_g; E_o's
  tokens are an input. The frozen variant uses E_o's mean as z_g and adds nothing (built with
  attention_impl='einsum': the decoder's explicit attention gives the same)."""
  from ultrajax.models import prompted_cls, vit

  tmodel, model, params = tiny
  rng = np.random.default_rng(8)

  def build(eg_size, with_eg=True, abstract=False, attention_impl="dot_product"):
    """The classifier with seeded random parameters (numpy: an eager init compiles every
    layer, which costs more than the test)."""

    def make():
      eg = vit.ViT(
        width=16,
        depth=1,
        num_heads=2,
        patch_size=16,
        image_size=eg_size,
        pool="none",
        rngs=nnx.Rngs(1),
      )
      return prompted_cls.PromptedClassifier(
        model.config,
        3,
        global_encoder=eg if with_eg else None,
        attention_impl=attention_impl,
        rngs=nnx.Rngs(2),
      )

    graphdef, state = nnx.split(nnx.eval_shape(make), nnx.Param)
    if not abstract:
      state = jax.tree.map(lambda x: jnp.asarray(0.2 * rng.normal(size=x.shape), x.dtype), state)
    return nnx.merge(graphdef, state)

  clf = build(128)  # E_g's 8 x 8 tokens: E_o's grid
  prompted_cls.load_sam_parts(clf, params)
  graphdef, state = nnx.split(clf, nnx.Param)
  weights = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
  jax.tree.map(
    np.testing.assert_array_equal,
    {k: v for k, v in weights["mask_decoder"].items() if k != "cls_tokens"},
    params["mask_decoder"],
  )
  object_tokens = rng.normal(size=(2, 8, 8, 32)).astype(np.float32)
  images = rng.normal(size=(2, 128, 128, 3)).astype(np.float32)
  coords = rng.uniform(0, 128, (2, 2, 2)).astype(np.float32)
  labels = np.array([[1, -1], [2, 3]], np.int32)  # a click and a box
  forward = lambda g, s, images: nnx.merge(g, s)(object_tokens, images, coords, labels)
  logits, grads = jax.jit(
    lambda s: (
      forward(graphdef, s, images),
      jax.grad(lambda s: forward(graphdef, s, images)[:, 0].sum())(s),
    )
  )(state)

  def reference(image, z_g):
    sparse = np.asarray(model.prompt_encoder.embed_points(coords, labels))
    decoder = weights["mask_decoder"]
    tokens = np.concatenate([decoder["iou_token"], decoder["mask_tokens"], decoder["cls_tokens"]])
    tokens = np.concatenate([np.broadcast_to(tokens, (2, 6, 32)), sparse], axis=1)
    src = image + np.asarray(params["prompt_encoder"]["no_mask"]).reshape(1, 1, 1, 32)
    with torch.no_grad():
      hs, _ = tmodel.mask_decoder.transformer(
        torch.from_numpy(src).permute(0, 3, 1, 2),
        tmodel.prompt_encoder.get_dense_pe(),
        torch.from_numpy(np.asarray(tokens)),
      )
    features = np.concatenate([hs[:, 5].numpy(), z_g], axis=-1)
    return features @ weights["head"]["kernel"] + weights["head"]["bias"]

  eg_graphdef, eg_state = nnx.split(clf.global_encoder, nnx.Param)
  eg_tokens = np.asarray(jax.jit(lambda s: nnx.merge(eg_graphdef, s)(images))(eg_state))
  proj = weights["token_proj"]
  added = (eg_tokens[:, 1:] @ proj["kernel"] + proj["bias"]).reshape(2, 8, 8, 32)
  close(logits, reference(object_tokens + added, eg_tokens[:, 0]), 1e-4)
  grads = nnx.to_pure_dict(grads)
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads["global_encoder"]["blocks"]))
  assert np.abs(grads["mask_decoder"]["cls_tokens"]).max() > 0

  frozen = build(128, with_eg=False, attention_impl="einsum")  # the explicit products, too
  assert frozen.mask_decoder.transformer.final_attn_token_to_image.impl == "einsum"
  prompted_cls.load_sam_parts(frozen, params)
  graphdef, state = nnx.split(frozen, nnx.Param)
  weights = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
  assert set(weights) == {"prompt_encoder", "mask_decoder", "head"}
  close(
    jax.jit(lambda s: forward(graphdef, s, None))(state),
    reference(object_tokens, object_tokens.mean((1, 2))),
    1e-4,
  )
  # E_g on its own grid (4 x 4 at 64 px): tokens are resampled to E_o's 8 x 8.
  graphdef, state = nnx.split(build(64, abstract=True), nnx.Param)
  tokens, z_g = jax.eval_shape(lambda s: nnx.merge(graphdef, s).global_features(images), state)
  assert tokens.shape == (2, 8, 8, 32) and z_g.shape == (2, 16)


def test_trainable_mask_freezes_only_the_fourier_matrix(tiny):
  _, _, params = tiny
  mask = sam.trainable_mask(params)
  assert mask["prompt_encoder"]["pe_gaussian"] is False
  assert sum(not m for m in jax.tree.leaves(mask)) == 1

  graphdef, state = nnx.split(tiny[1], nnx.Param)
  grads = jax.grad(lambda s: nnx.merge(graphdef, s).dense_pe().sum())(state)
  assert not np.any(nnx.to_pure_dict(grads)["prompt_encoder"]["pe_gaussian"])


def test_preprocess_matches_sam(tiny):
  tmodel, _, _ = tiny
  image = np.random.default_rng(7).integers(0, 256, (1, 100, 70, 3)).astype(np.uint8)
  theirs = tmodel.preprocess(torch.from_numpy(image[0]).permute(2, 0, 1).float())
  close(sam.preprocess(image, 128)[0], theirs.permute(1, 2, 0).numpy())
  assert sam.preprocess_shape(100, 70, 128) == (128, 90)
  assert sam_predictor.resize_image(image[0], 128).shape == (128, 90, 3)


@pytest.mark.parametrize("long_side", [1024, 64])
def test_preprocess_shape_matches_resize_longest_side(long_side):
  """Every (h, w) up to 1500 x 1500 (step 7, plus 1 and the .5 ties at long side 64)
  as ResizeLongestSide.get_preprocess_shape, except that its 0 (an empty image, which PIL
  refuses) becomes 1."""
  from segment_anything.utils.transforms import ResizeLongestSide

  sides = sorted({1, 2, 5, 128, 129, *range(3, 1501, 7)})
  for h in sides:
    for w in sides:
      theirs = ResizeLongestSide.get_preprocess_shape(h, w, long_side)
      assert sam.preprocess_shape(h, w, long_side) == tuple(max(1, x) for x in theirs), (h, w)


@pytest.mark.parametrize("original_hw", [(100, 70), (300, 200), (128, 3)])
def test_postprocess_masks_matches_sam(tiny, original_hw):
  """Numpy and jax logits, and the evaluation's thresholded masks, against
  Sam.postprocess_masks: an image smaller than the input (resized down at the end) or larger."""
  tmodel, _, _ = tiny
  logits = np.random.default_rng(9).normal(0, 5, (2, 3, 32, 32)).astype(np.float32)
  input_hw = sam.preprocess_shape(*original_hw, 128)
  with torch.no_grad():
    theirs = tmodel.postprocess_masks(torch.from_numpy(logits), input_hw, original_hw).numpy()
  ours = sam.postprocess_masks(logits, input_hw, original_hw, 128)
  assert isinstance(ours, np.ndarray) and ours.shape == logits.shape[:2] + original_hw
  close(ours, theirs)
  close(sam.postprocess_masks(jnp.asarray(logits), input_hw, original_hw, 128), theirs)
  masks = coco_eval.logits_to_masks(logits[0], 128, np.int32(input_hw), original_hw)
  assert masks.dtype == np.uint8
  assert np.mean(masks == (theirs[0] > 0)) > 0.999


# ----------------------------------------------------------------------------- predictor
@pytest.fixture(scope="module")
def predictors(tiny):
  tmodel, model, _ = tiny
  image = np.random.default_rng(8).integers(0, 256, (100, 70, 3)).astype(np.uint8)
  ours, theirs = sam_predictor.SamPredictor(model), TorchPredictor(tmodel)
  ours.set_image(image)
  theirs.set_image(image)
  return ours, theirs


def test_predictor_matches_segment_anything(predictors):
  ours, theirs = predictors
  close(ours.get_image_embedding(), nhwc(theirs.get_image_embedding()))
  click = dict(point_coords=np.array([[30.0, 40.0]]), point_labels=np.array([1]))
  both = dict(
    point_coords=np.array([[30.0, 40.0], [60, 90]]),
    point_labels=np.array([1, 0]),
    box=np.array([10, 20, 65, 95]),
  )
  for prompt, multimask in ((click, True), (click, False), (both, True)):
    logits, iou, low = ours.predict(**prompt, multimask_output=multimask, return_logits=True)
    t_logits, t_iou, t_low = theirs.predict(
      **prompt, multimask_output=multimask, return_logits=True
    )
    assert logits.shape == t_logits.shape == ((3 if multimask else 1), 100, 70)
    close(logits, t_logits, 1e-4)
    close(iou, t_iou, 1e-4)
    close(low, t_low, 1e-4)
  masks, _, low = ours.predict(**click)
  t_masks, _, _ = theirs.predict(**click)
  assert masks.dtype == bool and np.mean(masks == t_masks) > 0.999
  # The low-res logits go back in as a mask prompt.
  again, _, _ = ours.predict(**both, mask_input=low[:1], return_logits=True)
  t_again, _, _ = theirs.predict(**both, mask_input=low[:1].copy(), return_logits=True)
  close(again, t_again, 1e-4)


def test_predictors_of_one_architecture_share_compiled_programs(predictors, tiny):
  """A second SamPredictor on the same architecture reuses the first one's compiled encoder and
  decoder (no new entries in jit's caches) and gives the same masks for the same input."""
  ours, _ = predictors
  image = np.random.default_rng(8).integers(0, 256, (100, 70, 3)).astype(np.uint8)
  box = np.array([10, 10, 60, 40])
  expected, _, _ = ours.predict(box=box)
  sizes = sam_predictor._encode._cache_size(), sam_predictor._decode._cache_size()
  fresh = sam_predictor.SamPredictor(tiny[1])
  fresh.set_image(image)
  masks, _, _ = fresh.predict(box=box)
  assert (sam_predictor._encode._cache_size(), sam_predictor._decode._cache_size()) == sizes
  np.testing.assert_array_equal(masks, expected)


def test_predictor_rejects_bad_prompts(predictors, tiny):
  ours, _ = predictors
  with pytest.raises(
    ValueError,
    match=r"point 1 at \(x, y\) = \(80.0, 10.0\) is outside the "
    r"image \(width 70, height 100\)",
  ):
    ours.predict(point_coords=np.array([[5, 5], [80, 10]]), point_labels=np.array([1, 1]))
  with pytest.raises(ValueError, match="x1 < x0"):
    ours.predict(box=np.array([50, 10, 20, 40]))
  with pytest.raises(ValueError, match="box corner 1 .* is outside"):
    ours.predict(box=np.array([10, 10, 20, 140]))
  with pytest.raises(ValueError, match=r"mask_input must be \[1, 32, 32\]"):
    ours.predict(box=np.array([10, 10, 20, 40]), mask_input=np.zeros((1, 256, 256)))
  with pytest.raises(ValueError, match="come together"):
    ours.predict(point_coords=np.array([[5, 5]]))
  with pytest.raises(ValueError, match="point_labels must be"):
    ours.predict(point_coords=np.array([[5, 5]]), point_labels=np.array([3]))
  fresh = sam_predictor.SamPredictor(tiny[1])
  with pytest.raises(RuntimeError, match="set_image"):
    fresh.predict(box=np.array([1, 1, 5, 5]))
  with pytest.raises(ValueError, match="uint8"):
    fresh.set_image(np.zeros((10, 10, 3), np.float32))


# ----------------------------------------------------------------------------- commands
def test_workdir_checkpoint_loads_exports_and_segments(tiny, tmp_path):
  """A SAM run's Orbax checkpoint -> load_model (architecture from shapes, heads from the
  saved config) -> `export --format=sam` loads strictly into segment_anything; the segment
  command writes an overlay from a segment_anything file."""
  import json

  from PIL import Image

  from ultrajax import export, segment
  from ultrajax.train import checkpoint

  tmodel, model, params = tiny
  ckpt = checkpoint.Checkpointer(tmp_path / "run")
  ckpt.save(
    3,
    params,
    dict(step=np.int32(3)),
    None,
    dict(config=json.dumps(dict(model=dict(decoder_heads=2)))),
  )
  ckpt.close()
  loaded, config = sam_predictor.load_model(tmp_path / "run")
  assert config == model.config
  for a, b in zip(
    jax.tree.leaves(nnx.to_pure_dict(nnx.state(loaded, nnx.Param))), jax.tree.leaves(params)
  ):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  done = export.export(tmp_path / "run", "sam", tmp_path / "sam.pth")
  assert done["keys"] == len(tmodel.state_dict())
  # The sidecar names segment_anything's own preprocessing (its non-persistent buffers).
  pre = json.loads((tmp_path / "sam.json").read_text())["preprocessing"]
  np.testing.assert_allclose(pre["pixel_mean"], tmodel.pixel_mean.flatten().numpy())
  np.testing.assert_allclose(pre["pixel_std"], tmodel.pixel_std.flatten().numpy())
  assert pre["image_size"] == tmodel.image_encoder.img_size
  fresh = torch_sam(config)
  fresh.load_state_dict(torch.load(tmp_path / "sam.pth", weights_only=True), strict=True)
  assert all(torch.equal(fresh.state_dict()[k], v) for k, v in tmodel.state_dict().items())

  image = np.random.default_rng(9).integers(0, 256, (60, 80), dtype=np.uint8)
  Image.fromarray(image).save(tmp_path / "scan.png")
  done = segment.segment(
    tmp_path / "run", tmp_path / "scan.png", tmp_path / "o.png", points=[(20, 30)]
  )
  predictor = sam_predictor.SamPredictor(model)
  predictor.set_image(np.repeat(image[..., None], 3, axis=-1))
  masks, iou, _ = predictor.predict(np.array([[20, 30]]), np.array([1]))
  assert done["iou"] == pytest.approx(float(iou.max()), abs=1e-5)
  assert done["area"] == masks[np.argmax(iou)].sum()
  written = np.array(Image.open(tmp_path / "o.png"))
  assert written.shape == (60, 80, 3)
  tinted = np.any(written != image[..., None], axis=-1)
  assert tinted[masks[np.argmax(iou)]].all()  # every mask pixel is drawn over

  # --refine: single mask, then a multimask pass prompted by its box and its logits.
  mask = np.zeros((6, 7), bool)
  mask[2:5, 1:4] = True
  assert segment.mask_box(mask) == [1, 2, 3, 4] and segment.mask_box(mask & False) is None
  done = segment.segment(
    tmp_path / "run", tmp_path / "scan.png", tmp_path / "r.png", points=[(20, 30)], refine=True
  )
  first, _, low = predictor.predict(np.array([[20, 30]]), np.array([1]), multimask_output=False)
  box = segment.mask_box(first[0])
  second = (
    predictor.predict(box=np.array(box), mask_input=low[:1])
    if box is not None
    else predictor.predict(np.array([[20, 30]]), np.array([1]), mask_input=low[:1])
  )
  assert done["candidates"] == pytest.approx([float(v) for v in second[1]], abs=1e-5)
