"""URFM: CLIP-style teacher parity with open_clip/timm, feature losses, alignment, the job."""

import functools
import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ultrajax import configlib
from ultrajax.interop import files, open_clip as oc_interop
from ultrajax.models import mae, teacher as teacher_lib

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)


def tiny_teacher(embed_dim=16, **kw):
  args = dict(width=64, depth=2, num_heads=4, patch_size=8, image_size=32, embed_dim=embed_dim)
  args.update(kw)
  return nnx.eval_shape(lambda: teacher_lib.Teacher(**args, rngs=nnx.Rngs(0)))


def real_teacher(params, **kw):
  model = teacher_lib.Teacher(
    **{**dict(width=64, depth=2, num_heads=4, patch_size=8, image_size=32, embed_dim=16), **kw},
    rngs=nnx.Rngs(0),
  )
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model


@pytest.fixture(scope="module")
def open_clip_visual():
  """open_clip's own TimmModel (BiomedCLIP's vision tower: pool='', proj='linear', no proj
  bias) around a tiny timm ViT, random weights, no hub access."""
  from open_clip import timm_model

  create = timm_model.timm.create_model
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(timm_model.timm, "create_model", functools.partial(create, **TINY))
    torch.manual_seed(0)
    model = timm_model.TimmModel(
      "vit_base_patch16_224",
      embed_dim=16,
      image_size=32,
      pool="",
      proj="linear",
      proj_bias=False,
      pretrained=False,
    )
  with torch.no_grad():  # timm zero-inits some tensors; make every parameter matter
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def torch_tokens(trunk, images01, block=None, final_norm=True):
  """timm forward_features, or the residual stream after `block` blocks (1-based)."""
  x = torch.from_numpy(np.array(teacher_lib.clip_normalize(images01))).permute(0, 3, 1, 2)
  with torch.no_grad():
    if block is None:
      return trunk.forward_features(x).numpy()
    x = trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(x)))
    for blk in trunk.blocks[:block]:
      x = blk(x)
    return (trunk.norm(x) if final_norm else x).numpy()


def test_open_clip_teacher_matches_pytorch(open_clip_visual, tmp_path):
  state_dict = {f"visual.{k}": v for k, v in open_clip_visual.state_dict().items()}
  # A full open_clip checkpoint also holds the text tower and logit_scale: ignored.
  state_dict.update({"text.proj.0.weight": torch.zeros(8, 8), "logit_scale": torch.zeros(())})
  path = files.save_state_dict(
    tmp_path / "biomedclip_tiny.pth", {k: v.numpy() for k, v in state_dict.items()}
  )
  model = real_teacher(oc_interop.load_teacher(path, tiny_teacher()))
  images = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  x = torch.from_numpy(np.array(teacher_lib.clip_normalize(images))).permute(0, 3, 1, 2)
  with torch.no_grad():
    want_embedding = open_clip_visual(x).numpy()
  embedding = model.proj(model.tokens(images)[:, 0])  # open_clip's image features
  np.testing.assert_allclose(embedding, want_embedding, atol=2e-5, rtol=1e-4)
  trunk = open_clip_visual.trunk
  np.testing.assert_allclose(
    model.tokens(images), torch_tokens(trunk, images), atol=2e-5, rtol=1e-4
  )
  np.testing.assert_allclose(
    model(images, block=1, final_norm=False),
    torch_tokens(trunk, images, 1, False)[:, 1:],
    atol=2e-5,
    rtol=1e-4,
  )
  projected = model(images, project=True)
  with torch.no_grad():
    want = open_clip_visual.head(torch.from_numpy(torch_tokens(trunk, images)[:, 1:])).numpy()
  np.testing.assert_allclose(projected, want, atol=2e-5, rtol=1e-4)
  # Round trip: our export is the same state dict.
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  exported = oc_interop.teacher_to_state_dict(params)
  assert set(exported) == {k for k in state_dict if k.startswith("visual.")}
  for k, v in exported.items():
    np.testing.assert_array_equal(v, state_dict[k].numpy())


def test_open_clip_vision_transformer_teacher_matches_pytorch(tmp_path):
  """open_clip's own VisionTransformer (CLIP ViT layout: conv1 without bias, class and
  positional embeddings, ln_pre, transformer.resblocks.*, ln_post, proj), random weights."""
  from open_clip.transformer import VisionTransformer

  torch.manual_seed(2)
  visual = VisionTransformer(
    image_size=32,
    patch_size=8,
    width=64,
    layers=2,
    heads=4,
    mlp_ratio=4.0,
    output_dim=16,
    output_tokens=True,
  )
  with torch.no_grad():  # LayerNorms start at identity; make every parameter matter
    for p in visual.parameters():
      p.add_(0.05 * torch.randn_like(p))
  visual.eval()
  state_dict = {f"visual.{k}": v for k, v in visual.state_dict().items()}
  state_dict.update({"token_embedding.weight": torch.zeros(8, 4), "logit_scale": torch.zeros(())})
  path = files.save_state_dict(
    tmp_path / "clip_tiny.pth", {k: v.numpy() for k, v in state_dict.items()}
  )
  abstract = tiny_teacher(tower="open_clip")
  params = oc_interop.load_teacher(path, abstract)
  graphdef, state = nnx.split(abstract, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  images = np.random.default_rng(2).uniform(size=(2, 32, 32, 3)).astype(np.float32)

  def embedding_and_tokens(s):
    model = nnx.merge(graphdef, s)
    return model.proj(model.tokens(images)[:, 0]), model(images)

  embedding, tokens = jax.jit(embedding_and_tokens)(state)
  x = torch.from_numpy(np.array(teacher_lib.clip_normalize(images))).permute(0, 3, 1, 2)
  with torch.no_grad():
    want_embedding, want_tokens = visual(x)
  np.testing.assert_allclose(embedding, want_embedding.numpy(), atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(tokens, want_tokens.numpy(), atol=2e-5, rtol=1e-4)
  exported = oc_interop.teacher_to_state_dict(params, layout="open_clip_vit")
  assert set(exported) == {k for k in state_dict if k.startswith("visual.")}
  for k, v in exported.items():
    np.testing.assert_array_equal(v, state_dict[k].numpy())
  with pytest.raises(
    ValueError, match="open_clip_vit layout, which needs a teacher with tower='open_clip'"
  ):
    oc_interop.load_teacher(path, tiny_teacher())


def test_timm_layout_teacher_matches_pytorch(tmp_path):
  torch.manual_seed(1)
  vit = timm.models.vision_transformer.VisionTransformer(**TINY, num_classes=10).eval()
  path = files.save_state_dict(
    tmp_path / "vit.safetensors", {k: v.numpy() for k, v in vit.state_dict().items()}
  )
  model = real_teacher(oc_interop.load_teacher(path, tiny_teacher(embed_dim=0)), embed_dim=0)
  images = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(model.tokens(images), torch_tokens(vit, images), atol=2e-5, rtol=1e-4)


def test_biomedclip_vit_b_key_layout_matches_open_clip():
  """The ViT-B/16 teacher's key map is exactly open_clip's BiomedCLIP vision tower (151 keys)."""
  from open_clip import timm_model

  visual = timm_model.TimmModel(
    "vit_base_patch16_224",
    embed_dim=512,
    image_size=224,
    pool="",
    proj="linear",
    proj_bias=False,
    pretrained=False,
  )
  want = {f"visual.{k}": tuple(v.shape) for k, v in visual.state_dict().items()}
  model = nnx.eval_shape(
    lambda: teacher_lib.Teacher(
      width=768,
      depth=12,
      num_heads=12,
      patch_size=16,
      image_size=224,
      embed_dim=512,
      rngs=nnx.Rngs(0),
    )
  )
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  from ultrajax.interop import timm_vit

  rules = oc_interop.teacher_rules(
    params, prefix="visual.trunk.", proj_key="visual.head.proj.weight"
  )
  assert timm_vit.torch_shapes(params, rules) == want
  assert len(want) == 151


def test_wrong_architecture_teacher_file_names_key_and_shapes(tmp_path):
  torch.manual_seed(0)
  vit = timm.models.vision_transformer.VisionTransformer(**dict(TINY, embed_dim=32), num_classes=0)
  path = files.save_state_dict(
    tmp_path / "small.pth", {f"visual.trunk.{k}": v.numpy() for k, v in vit.state_dict().items()}
  )
  with pytest.raises(ValueError) as info:
    oc_interop.load_teacher(path, tiny_teacher())
  msg = str(info.value)
  assert "small.pth" in msg
  assert "visual.trunk.blocks.0.attn.qkv.weight: got (96, 32), expected (192, 64)" in msg
  assert "missing keys: [visual.head.proj.weight]" in msg
  with pytest.raises(ValueError, match="not an open_clip .* or timm ViT state dict"):
    oc_interop.teacher_from_state_dict({"foo.weight": np.zeros(3)}, tiny_teacher())


# ----------------------------------------------------------------------------- losses
def numpy_feature_loss(pred, target, mask, norm, loss, beta):
  pred, target = pred.astype(np.float64), target.astype(np.float64)
  if norm == "layernorm":
    mu = target.mean(-1, keepdims=True)
    target = (target - mu) / np.sqrt(((target - mu) ** 2).mean(-1, keepdims=True) + 1e-6)
  elif norm == "l2":
    target = target / np.linalg.norm(target, axis=-1, keepdims=True)
    pred = pred / np.linalg.norm(pred, axis=-1, keepdims=True)
  per = np.zeros(mask.shape)
  for b, n in itertools.product(*map(range, mask.shape)):
    p, t = pred[b, n], target[b, n]
    if loss == "mse":
      per[b, n] = np.mean((p - t) ** 2)
    elif loss == "smooth_l1":
      e = np.abs(p - t)
      per[b, n] = np.mean(np.where(e < beta, 0.5 * e**2 / beta, e - 0.5 * beta))
    else:
      per[b, n] = 1 - p @ t / (np.linalg.norm(p) * np.linalg.norm(t))
  return per[mask].mean(), np.array([per[b][mask[b]].mean() for b in range(len(mask))])


@pytest.mark.parametrize(
  "norm,loss", list(itertools.product(mae.FEATURE_NORMS, mae.FEATURE_LOSSES))
)
def test_feature_loss_matches_numpy(norm, loss):
  rng = np.random.default_rng(3)
  pred = rng.normal(size=(2, 6, 5)).astype(np.float32) * 1.5
  target = (rng.normal(size=(2, 6, 5)) * 2 + 0.5).astype(np.float32)
  mask = np.array([[1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1]], bool)
  got, got_per = mae.feature_loss(pred, target, mask, norm=norm, loss=loss, smooth_l1_beta=0.7)
  want, want_per = numpy_feature_loss(pred, target, mask, norm, loss, 0.7)
  np.testing.assert_allclose(got, want, rtol=2e-5)
  np.testing.assert_allclose(got_per, want_per, rtol=2e-5)
  if loss == "smooth_l1" and norm == "none":  # both branches of smooth-L1 are exercised
    assert 0.1 < np.mean(np.abs(pred - target) < 0.7) < 0.9


def test_pixel_mae_unchanged_by_pred_dim_option():
  """pred_dim=0 builds exactly the pixel MAE; pred_dim=D only swaps the output layer."""
  pix = mae.MAE(
    width=32,
    depth=1,
    num_heads=4,
    patch_size=8,
    image_size=32,
    decoder_width=32,
    decoder_depth=1,
    decoder_heads=4,
    rngs=nnx.Rngs(0),
  )
  feat = mae.MAE(
    width=32,
    depth=1,
    num_heads=4,
    patch_size=8,
    image_size=32,
    decoder_width=32,
    decoder_depth=1,
    decoder_heads=4,
    pred_dim=20,
    rngs=nnx.Rngs(0),
  )
  a, b = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (pix, feat))
  assert a["decoder_pred"]["kernel"].shape == (32, 192)
  assert b["decoder_pred"]["kernel"].shape == (32, 20)
  np.testing.assert_array_equal(
    a["encoder"]["blocks"][0]["attn"]["qkv"]["kernel"],
    b["encoder"]["blocks"][0]["attn"]["qkv"]["kernel"],
  )


# ----------------------------------------------------------------------------- alignment
def test_align_tokens_pools_repeats_and_rejects():
  tokens = jnp.arange(16 * 2, dtype=jnp.float32).reshape(1, 16, 2)  # 4x4 grid
  pooled = teacher_lib.align_tokens(tokens, 2, "pool")
  grid = np.arange(32, dtype=np.float32).reshape(4, 4, 2)
  want = grid.reshape(2, 2, 2, 2, 2).mean(axis=(1, 3)).reshape(1, 4, 2)
  np.testing.assert_allclose(pooled, want)
  up = teacher_lib.align_tokens(tokens, 8, "pool")
  np.testing.assert_array_equal(up[0].reshape(8, 8, 2)[::2, ::2], grid)
  np.testing.assert_array_equal(up[0].reshape(8, 8, 2)[1::2, 1::2], grid)
  assert teacher_lib.align_tokens(tokens, 3, "interpolate").shape == (1, 9, 2)
  with pytest.raises(ValueError, match=r"teacher patch grid 4x4 .* student grid 3x3"):
    teacher_lib.align_tokens(tokens, 3, "pool")


# ----------------------------------------------------------------------------- job
def urfm_config(**overrides):
  config = configlib.load_config_module(REPO / "configs" / "pretrain_urfm.py").get_config("smoke")
  config.mesh.update(clients=1, data=1)
  config.fed.num_rounds = 1
  # The evaluators are off: these tests are about the teacher's targets and their cache.
  config.evals.linear_probe.every_rounds = config.evals.knn.every_rounds = 0
  config.update_from_flattened_dict(overrides)  # 'a.b' -> config.a.b
  return config


def test_no_gradient_reaches_the_teacher():
  from ultrajax.train import mim_objectives

  config = urfm_config()
  student = mae.mae_from_config(config.model, nnx.Rngs(0))
  graphdef, params = nnx.split(student, nnx.Param)
  params = nnx.to_pure_dict(params)
  t_graphdef, t_params = mim_objectives.build_teacher(config, jax.random.key(0))
  images = jax.random.randint(jax.random.key(1), (2, 32, 32, 3), 0, 256).astype(jnp.uint8)

  def loss(student_params, teacher_params):
    fn = mim_objectives.make_loss_fn(graphdef, config, t_graphdef, teacher_params)
    return fn(student_params, images, jax.random.key(2))[0]

  g_student, g_teacher = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, t_params)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(g_teacher))
  assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(g_student))
  # ... and not because the loss ignores the teacher: other teacher weights, other loss.
  other = jax.tree.map(lambda x: x * 1.5, t_params)
  loss = jax.jit(loss)
  assert abs(float(loss(params, other)) - float(loss(params, t_params))) > 1e-4


def test_config_errors_name_the_field(tmp_path):
  from ultrajax import pretrain_checks

  with pytest.raises(
    configlib.ConfigError,
    match=r"config.teacher.align=.pool.: teacher patch grid 3x3 .* student grid 4x4",
  ):
    pretrain_checks.validate(urfm_config(**{"teacher.image_size": 24}))  # teacher 3x3, student 4x4
  with pytest.raises(configlib.ConfigError, match=r"config.model.pred_dim=16 must equal .* 32"):
    pretrain_checks.validate(urfm_config(**{"model.pred_dim": 16}))
  with pytest.raises(configlib.ConfigError, match=r"cache_dir needs a fixed-view schedule"):
    pretrain_checks.validate(urfm_config(**{"teacher.cache_dir": str(tmp_path / "c")}))
  with pytest.raises(configlib.ConfigError, match=r"config.teacher.tower='clip'"):
    pretrain_checks.validate(urfm_config(**{"teacher.tower": "clip"}))
  pretrain_checks.validate(
    urfm_config(**{"teacher.image_size": 24, "teacher.align": "interpolate"})
  )


def test_urfm_job_in_step_and_cached(tmp_path):
  """One round of the smoke preset, federated (2 clients) with the teacher in the step, then
  centralized with cached targets; the cache holds exactly the fixed views and their targets."""
  from ultrajax.data import clients as clients_lib, teacher_cache
  from ultrajax.jobs import pretrain
  from ultrajax.train import checkpoint, mim_objectives, writers

  params = pretrain.run(
    urfm_config(**{"data.pool_clients": False, "fed.strategy": "fedavg"}), tmp_path / "in_step"
  )
  rows = list(writers.read_jsonl(tmp_path / "in_step" / "metrics.jsonl"))
  assert np.isfinite(rows[-1]["loss/client_00"]) and np.isfinite(rows[-1]["loss/client_01"])
  assert (tmp_path / "in_step/images/round_00001.png").is_file()
  assert params["decoder_pred"]["kernel"].shape == (32, 32)  # predicts 32-d teacher tokens
  assert "trunk" not in checkpoint.load_params(tmp_path / "in_step")  # the teacher is not saved

  cache = tmp_path / "cache"
  config = urfm_config(
    **{"teacher.cache_dir": str(cache), "data.crop_scale": (1.0, 1.0), "data.hflip": False}
  )
  pretrain.run(config, tmp_path / "cached")
  assert np.isfinite(list(writers.read_jsonl(tmp_path / "cached" / "metrics.jsonl"))[-1]["loss"])
  clients = clients_lib.client_sources(config)
  source = teacher_cache.CacheSource(cache, 0)
  assert len(source) == len(clients[0])
  i = len(source) - 1
  view = teacher_cache.fixed_view(clients[0][i]["image"], 32)
  np.testing.assert_array_equal(source[i]["images"], view)
  t_graphdef, t_params = mim_objectives.build_teacher(config, jax.random.key(config.seed))
  want = mim_objectives.teacher_targets(t_graphdef, t_params, view[None] / 255.0, config)[0]
  np.testing.assert_allclose(source[i]["teacher"].astype(np.float32), want, rtol=2e-3, atol=2e-3)
  with pytest.raises(
    ValueError, match=r"built for another setting(.|\n)*teacher.block: cache has 0, this run 1"
  ):
    pretrain.run(
      urfm_config(
        **{
          "teacher.cache_dir": str(cache),
          "data.crop_scale": (1.0, 1.0),
          "data.hflip": False,
          "teacher.block": 1,
        }
      ),
      tmp_path / "other",
    )
