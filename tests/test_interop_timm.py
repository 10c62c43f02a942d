"""ViT <-> timm VisionTransformer: same weights, same inputs, same outputs (float32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from ultrajax.interop import timm_vit  # noqa: E402
from ultrajax.models import posemb, vit  # noqa: E402

TINY = dict(width=64, depth=2, num_heads=4, patch_size=8, image_size=32)
# (our pool, timm global_pool, num_classes); timm enables fc_norm by itself for 'avg'.
POOLS = [("cls", "token", 5), ("gap", "avg", 5), ("none", "", 0)]


def _timm_model(global_pool: str, num_classes: int, seed: int = 0):
  torch.manual_seed(seed)
  model = VisionTransformer(
    img_size=32,
    patch_size=8,
    embed_dim=64,
    depth=2,
    num_heads=4,
    global_pool=global_pool,
    num_classes=num_classes,
  ).eval()
  with torch.no_grad():  # random everything, so zero biases / unit norms cannot hide a swap
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  return model


def _timm_forward(model, images: np.ndarray, pool: str) -> np.ndarray:
  x = torch.from_numpy(images).permute(0, 3, 1, 2)  # NHWC -> NCHW
  with torch.no_grad():
    out = model.forward_features(x) if pool == "none" else model(x)
  return out.numpy()


def _images(seed=0):
  return np.random.default_rng(seed).normal(size=(2, 32, 32, 3)).astype(np.float32)


def _load(model, pure):
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  return model


@pytest.mark.parametrize("pool,global_pool,classes", POOLS)
def test_timm_to_ultrajax_same_outputs(pool, global_pool, classes, caplog):
  reference = _timm_model(global_pool, classes)
  with torch.no_grad():  # our ViT has fixed positions: give timm the same table
    reference.pos_embed.copy_(torch.from_numpy(posemb.sincos_2d(4, 4, 64, cls_token=True)[None]))
  ours = vit.ViT(**TINY, pool=pool, num_classes=classes, rngs=nnx.Rngs(0))
  with caplog.at_level("WARNING"):
    _load(ours, timm_vit.vit_from_timm(reference.state_dict(), ours))
  assert "pos_embed" not in caplog.text
  images = _images()
  np.testing.assert_allclose(
    np.asarray(ours(jnp.asarray(images))),
    _timm_forward(reference, images, pool),
    atol=1e-4,
    rtol=1e-4,
  )


@pytest.mark.parametrize("pool,global_pool,classes", POOLS)
def test_ultrajax_to_timm_same_outputs(pool, global_pool, classes):
  ours = vit.ViT(**TINY, pool=pool, num_classes=classes, rngs=nnx.Rngs(1))
  state = nnx.state(ours, nnx.Param)
  rng = np.random.default_rng(1)
  nnx.update(
    ours, jax.tree.map(lambda x: x + jnp.asarray(0.2 * rng.normal(size=x.shape), x.dtype), state)
  )
  exported = timm_vit.vit_to_timm(nnx.to_pure_dict(nnx.state(ours, nnx.Param)), image_size=32)
  assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in exported.values())
  reference = _timm_model(global_pool, classes, seed=1)
  reference.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  images = _images(1)
  np.testing.assert_allclose(
    _timm_forward(reference, images, pool),
    np.asarray(ours(jnp.asarray(images))),
    atol=1e-4,
    rtol=1e-4,
  )
  # And back: numpy input gives the exact parameters again.
  again = timm_vit.vit_from_timm(exported, ours)
  for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(nnx.to_pure_dict(state))):
    np.testing.assert_array_equal(x, np.asarray(y))


def test_vit_b16_has_timm_vit_base_patch16_224_keys_and_shapes():
  with torch.device("meta"):  # names and shapes only, nothing allocated
    reference = timm.create_model("vit_base_patch16_224", pretrained=False)
  expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  assert len(expected) == 152
  width, depth, heads, patch = vit.parse_variant("B/16")
  abstract = nnx.eval_shape(
    lambda: vit.ViT(
      width=width,
      depth=depth,
      num_heads=heads,
      patch_size=patch,
      image_size=224,
      pool="cls",
      num_classes=1000,
      rngs=nnx.Rngs(0),
    )
  )
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  del expected["pos_embed"]  # not a parameter of ours: vit_to_timm writes the sin-cos table
  assert timm_vit.torch_shapes(params, timm_vit.vit_rules(params)) == expected


def test_vit_from_timm_reports_every_problem(caplog):
  ours = vit.ViT(**TINY, pool="cls", num_classes=5, rngs=nnx.Rngs(0))
  good = {k: v.numpy() for k, v in _timm_model("token", 5).state_dict().items()}
  bad = dict(good)
  del bad["blocks.1.mlp.fc2.bias"]
  bad["blocks.2.norm1.weight"] = np.ones(64, np.float32)
  bad["head.weight"] = np.zeros((6, 64), np.float32)
  with pytest.raises(ValueError) as err:
    timm_vit.vit_from_timm(bad, ours)
  message = str(err.value)
  for fragment in (
    "blocks.1.mlp.fc2.bias",
    "blocks.2.norm1.weight",
    "head.weight: got (6, 64), expected (5, 64)",
  ):
    assert fragment in message
  # A learned (non-sincos) pos_embed is reported, not loaded.
  with caplog.at_level("WARNING"):
    timm_vit.vit_from_timm(good, ours)
  assert "pos_embed differs" in caplog.text


# ----------------------------------------------------------------------------- exports with preprocessing


@pytest.fixture(scope="module")
def mae_workdir(tmp_path_factory):
  """(workdir holding a one-round checkpoint of a tiny random MAE, its config, the MAE)."""
  import json

  from ultrajax.configs import pretrain_fed
  from ultrajax.models import mae
  from ultrajax.train import checkpoint

  config = pretrain_fed.get_config("smoke")  # its model: ViT 64 x 2 at 32 px, patch 8
  model = mae.mae_from_config(config.model, nnx.Rngs(3))
  workdir = tmp_path_factory.mktemp("mae_run")
  ckpt = checkpoint.Checkpointer(workdir)
  ckpt.save(
    1,
    nnx.to_pure_dict(nnx.state(model, nnx.Param)),
    {"r": jnp.asarray(1)},
    None,
    {"config": json.dumps(config.to_dict())},
  )
  ckpt.close()
  return workdir, config, model


def _imagenet_data_config(model):
  from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config

  data_config = resolve_data_config(model=model)
  np.testing.assert_allclose(data_config["mean"], IMAGENET_DEFAULT_MEAN)
  np.testing.assert_allclose(data_config["std"], IMAGENET_DEFAULT_STD)
  assert tuple(data_config["input_size"]) == (3, 32, 32) and data_config["crop_pct"] == 1.0
  return data_config


def test_timm_hub_folder_export_loads_with_imagenet_preprocessing(mae_workdir, tmp_path):
  """`--out=<folder>` -> timm.create_model('local-dir:...', pretrained=True): the architecture
  from config.json, a strict load, ImageNet mean/std from resolve_data_config, same features."""
  from ultrajax import export

  workdir, _, model = mae_workdir
  export.export(workdir, "timm", tmp_path / "encoder")
  assert sorted(p.name for p in (tmp_path / "encoder").iterdir()) == [
    "config.json",
    "model.safetensors",
  ]
  loaded = timm.create_model(f"local-dir:{tmp_path / 'encoder'}", pretrained=True).eval()
  _imagenet_data_config(loaded)
  images = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = loaded(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  ours = np.asarray(model.encoder(jnp.asarray(images)))[:, 0]  # cls token after the final norm
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_timm_file_export_carries_its_pretrained_cfg(mae_workdir, tmp_path):
  """A single .safetensors file holds timm's config in its header; given to timm as the
  pretrained_cfg overlay it replaces the architecture tag's (0.5, 0.5, 0.5) normalisation."""
  import json

  from safetensors import safe_open

  from ultrajax import export

  workdir, _, _ = mae_workdir
  out = tmp_path / "encoder.safetensors"
  export.export(workdir, "timm", out)
  with safe_open(str(out), "np") as f:
    metadata = f.metadata()
  assert metadata["format"] == "pt"  # what timm / transformers expect of a PyTorch layout
  cfg = json.loads(metadata["timm_config"])
  model = timm.create_model(
    cfg["architecture"],
    pretrained=True,
    **cfg["model_args"],
    pretrained_cfg_overlay=dict(file=str(out), **cfg["pretrained_cfg"]),
  )
  _imagenet_data_config(model)
  tag_default = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"])
  assert tuple(tag_default.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)  # what the fix is for
  export.export(workdir, "timm", tmp_path / "encoder.pth")
  assert json.loads((tmp_path / "encoder.json").read_text())["timm_config"] == cfg
  with pytest.raises(ValueError, match="folder .* is timm's Hub layout"):
    export.export(workdir, "mae", tmp_path / "mae_folder")
