"""MAE <-> facebookresearch/mae checkpoints, state-dict files, `init_from` and the export command.

The PyTorch reference is models_mae.py's `MaskedAutoencoderViT` rebuilt from timm blocks (below),
driven with the kept patch indices of our mask instead of its random_masking. Tests that need
torch skip without it; the .safetensors ones do not need it.
"""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ultrajax import configlib
from ultrajax.interop import files, load, mae_official, posemb as posemb_resample, timm_vit
from ultrajax.models import mae, posemb, vit

REPO = pathlib.Path(__file__).resolve().parents[1]
# The smoke preset's model: what the export test's checkpoint holds.
TINY = dict(
  width=64,
  depth=2,
  num_heads=4,
  patch_size=8,
  image_size=32,
  decoder_width=32,
  decoder_depth=1,
  decoder_heads=4,
)
GRID = 4  # 32 / 8


def _torch():
  return pytest.importorskip("torch"), pytest.importorskip("timm")


@functools.cache
def _official_class():
  """models_mae.py's MaskedAutoencoderViT (facebookresearch/mae), with explicit ids_keep."""
  torch, _ = _torch()
  from timm.layers import PatchEmbed
  from timm.models.vision_transformer import Block
  from torch import nn

  class MaskedAutoencoderViT(nn.Module):
    def __init__(
      self,
      img_size=224,
      patch_size=16,
      in_chans=3,
      embed_dim=1024,
      depth=24,
      num_heads=16,
      decoder_embed_dim=512,
      decoder_depth=8,
      decoder_num_heads=16,
      mlp_ratio=4.0,
      norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
    ):
      super().__init__()
      self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
      num_patches = self.patch_embed.num_patches
      self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
      self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
      self.blocks = nn.ModuleList(
        [
          Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
          for _ in range(depth)
        ]
      )
      self.norm = norm_layer(embed_dim)
      self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
      self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
      self.decoder_pos_embed = nn.Parameter(
        torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False
      )
      self.decoder_blocks = nn.ModuleList(
        [
          Block(
            decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer
          )
          for _ in range(decoder_depth)
        ]
      )
      self.decoder_norm = norm_layer(decoder_embed_dim)
      self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

    def forward_encoder(self, x, ids_keep):
      x = self.patch_embed(x)
      x = x + self.pos_embed[:, 1:, :]
      x = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[-1]))
      cls_token = self.cls_token + self.pos_embed[:, :1, :]
      x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
      for blk in self.blocks:
        x = blk(x)
      return self.norm(x)

    def forward_decoder(self, x, ids_restore):
      x = self.decoder_embed(x)
      mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
      x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
      x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
      x = torch.cat([x[:, :1, :], x_], dim=1)
      x = x + self.decoder_pos_embed
      for blk in self.decoder_blocks:
        x = blk(x)
      return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

  return MaskedAutoencoderViT


def _official_tiny(seed: int):
  """Tiny official MAE with random weights and MAE's fixed sin-cos position tables."""
  torch, _ = _torch()
  torch.manual_seed(seed)
  model = _official_class()(
    img_size=32,
    patch_size=8,
    embed_dim=64,
    depth=2,
    num_heads=4,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=4,
  ).eval()
  with torch.no_grad():  # random everything, so zero biases / unit norms cannot hide a swap
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
    model.pos_embed.copy_(torch.from_numpy(posemb.sincos_2d(GRID, GRID, 64, True)[None]))
    model.decoder_pos_embed.copy_(torch.from_numpy(posemb.sincos_2d(GRID, GRID, 32, True)[None]))
  return model


def _official_predict(model, images: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """images [B, H, W, 3], mask [B, N] (True = masked) -> pred [B, N, p*p*3]."""
  torch, _ = _torch()
  ids = np.argsort(mask.astype(np.int32), axis=1, kind="stable")  # visible first, as ours
  keep = int(mask.shape[1] - mask[0].sum())
  with torch.no_grad():
    latent = model.forward_encoder(
      torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(ids[:, :keep])
    )
    return model.forward_decoder(latent, torch.from_numpy(np.argsort(ids, axis=1))).numpy()


def _ours(seed: int) -> mae.MAE:
  """Tiny MAE with every parameter perturbed (no zero biases, no unit norms)."""
  model = mae.MAE(**TINY, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  nnx.update(
    model,
    jax.tree.map(
      lambda x: x + jnp.asarray(0.2 * rng.normal(size=x.shape), x.dtype),
      nnx.state(model, nnx.Param),
    ),
  )
  return model


def _params(model) -> dict:
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _load(model, pure):
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  return model


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  mask = np.ones((2, GRID * GRID), bool)
  for row in mask:  # 4 of 16 patches visible (mask_ratio 0.75), different ones per row
    row[rng.choice(GRID * GRID, 4, replace=False)] = False
  return images, mask


def _predict(model, images, mask) -> np.ndarray:
  return np.asarray(model(jnp.asarray(images), jnp.asarray(mask)))


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _abstract_mae(**sizes):
  return nnx.eval_shape(lambda: mae.MAE(**sizes, rngs=nnx.Rngs(0)))


# ----------------------------------------------------------------------------- parity (torch)
def test_official_to_ultrajax_same_predictions(caplog):
  reference = _official_tiny(0)
  ours = mae.MAE(**TINY, rngs=nnx.Rngs(0))
  with caplog.at_level("WARNING"):
    _load(ours, mae_official.mae_from_official(reference.state_dict(), ours))
  assert "pos_embed" not in caplog.text  # the fixed tables match ours
  images, mask = _inputs()
  np.testing.assert_allclose(
    _predict(ours, images, mask), _official_predict(reference, images, mask), atol=1e-4, rtol=1e-4
  )


def test_ultrajax_to_official_same_predictions_and_exact_round_trip():
  torch, _ = _torch()
  ours = _ours(1)
  exported = mae_official.mae_to_official(_params(ours), image_size=32, patch_size=8)
  assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in exported.values())
  reference = _official_tiny(1)
  reference.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  images, mask = _inputs(1)
  np.testing.assert_allclose(
    _official_predict(reference, images, mask), _predict(ours, images, mask), atol=1e-4, rtol=1e-4
  )
  assert_trees_equal(mae_official.mae_from_official(exported, ours), _params(ours))
  # torch tensors back in: still exact.
  assert_trees_equal(mae_official.mae_from_official(reference.state_dict(), ours), _params(ours))


def test_mae_b_key_sets_match_the_official_model():
  torch, timm = _torch()
  with torch.device("meta"):  # names and shapes only, nothing allocated
    reference = _official_class()(
      img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12
    )
    timm_b16 = timm.create_model("vit_base_patch16_224", num_classes=0)
  expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  width, depth, heads, patch = vit.parse_variant("B/16")
  abstract = _abstract_mae(
    width=width, depth=depth, num_heads=heads, patch_size=patch, image_size=224
  )
  shapes = mae_official.official_shapes(_params(abstract), image_size=224)
  assert len(shapes) == 254 and shapes == expected
  encoder = {k: s for k, s in shapes.items() if not mae_official.is_decoder_key(k)}
  assert len(encoder) == 150
  # The encoder-only keys are exactly a timm ViT-B/16 without head (what format=timm writes).
  assert encoder == {k: tuple(v.shape) for k, v in timm_b16.state_dict().items()}


def test_pos_embed_resampling_matches_timm():
  torch, _ = _torch()
  from timm.layers import resample_abs_pos_embed

  table = np.random.default_rng(0).normal(size=(1, 1 + 14 * 14, 16)).astype(np.float32)
  for size in [(16, 16), (7, 7), (14, 20)]:
    expected = resample_abs_pos_embed(torch.from_numpy(table), list(size)).numpy()
    np.testing.assert_allclose(
      posemb_resample.resample_abs_pos_embed(table, size), expected, atol=1e-5
    )


def test_torch_file_round_trip(tmp_path):
  torch, _ = _torch()
  exported = mae_official.mae_to_official(_params(_ours(2)), image_size=32, patch_size=8)
  path = files.save_state_dict(tmp_path / "mae.pth", exported, wrap_key="model")
  raw = torch.load(path, weights_only=True)
  assert list(raw) == ["model"]
  again = files.load_state_dict(path)  # unwrapped
  assert list(again) == list(exported)
  for k in exported:
    np.testing.assert_array_equal(again[k], exported[k])
  # A bare .pt and a {'state_dict': ...} .bin read the same.
  for name, wrap in (("bare.pt", None), ("lightning.bin", "state_dict")):
    files.save_state_dict(tmp_path / name, exported, wrap_key=wrap)
    assert_trees_equal(files.load_state_dict(tmp_path / name), again)


def test_torch_file_with_python_objects_is_refused_with_advice(tmp_path):
  torch, _ = _torch()
  import argparse

  torch.save(
    {"model": {"cls_token": torch.zeros(1, 1, 4)}, "args": argparse.Namespace(lr=1)},
    tmp_path / "train.pth",
  )
  with pytest.raises(ValueError, match="train.pth: holds Python objects"):
    files.load_state_dict(tmp_path / "train.pth")


# ----------------------------------------------------------------------------- no torch needed
def test_mae_b_counts_without_torch():
  abstract = _abstract_mae(width=768, depth=12, num_heads=12, patch_size=16, image_size=224)
  shapes = mae_official.official_shapes(_params(abstract), image_size=224)
  assert len(shapes) == 254
  assert sum(not mae_official.is_decoder_key(k) for k in shapes) == 150
  assert shapes["decoder_blocks.7.attn.qkv.weight"] == (1536, 512)
  assert shapes["decoder_pred.weight"] == (768, 512)
  assert shapes["decoder_pos_embed"] == (1, 197, 512)
  trainable = sum(np.prod(s) for k, s in shapes.items() if not k.endswith("pos_embed"))
  assert trainable == 111_655_680  # perf_anchors.md 3b


def test_safetensors_round_trip_is_exact(tmp_path):
  ours = _ours(3)
  exported = mae_official.mae_to_official(_params(ours), image_size=32, patch_size=8)
  path = files.save_state_dict(tmp_path / "mae.safetensors", exported)
  again = files.load_state_dict(path)
  assert sorted(again) == sorted(exported)
  assert_trees_equal(mae_official.mae_from_official(again, ours), _params(ours))
  with pytest.raises(ValueError, match="safetensors files are flat"):
    files.save_state_dict(tmp_path / "x.safetensors", exported, wrap_key="model")


def test_file_errors_name_the_file(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match=r"weights\.npz: unknown state-dict file type"):
    files.save_state_dict(tmp_path / "weights.npz", {})
  with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
    files.load_state_dict(tmp_path / "nothing.safetensors")
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  with pytest.raises(ImportError, match=r"w\.pth: PyTorch files need torch"):
    files.save_state_dict(tmp_path / "w.pth", {"a": np.zeros(2, np.float32)})


def test_import_errors_name_every_key(caplog):
  ours = _ours(4)
  good = mae_official.mae_to_official(_params(ours), image_size=32, patch_size=8)
  bad = dict(good)
  del bad["decoder_blocks.0.mlp.fc2.bias"]
  bad["blocks.2.norm1.weight"] = np.ones(64, np.float32)
  bad["decoder_pred.weight"] = np.zeros((48, 32), np.float32)
  bad["pos_embed"] = np.zeros((1, 17, 48), np.float32)
  with pytest.raises(ValueError) as err:
    mae_official.mae_from_official(bad, ours)
  message = str(err.value)
  for fragment in (
    "missing keys: [decoder_blocks.0.mlp.fc2.bias]",
    "unexpected keys: [blocks.2.norm1.weight]",
    "decoder_pred.weight: got (48, 32), expected (192, 32)",
    "pos_embed: got (1, 17, 48), expected (1, 17, 64)",
  ):
    assert fragment in message
  # strict=False keeps what is missing and ignores the extras, and says so; shapes still count.
  partial = dict(good)
  del partial["decoder_blocks.0.mlp.fc2.bias"]
  partial["blocks.2.norm1.weight"] = np.ones(64, np.float32)
  base = _params(_ours(5))
  with caplog.at_level("WARNING"):
    loaded = mae_official.mae_from_official(partial, ours, strict=False, base_params=base)
  assert "decoder_blocks.0.mlp.fc2.bias" in caplog.text
  assert "blocks.2.norm1.weight" in caplog.text
  assert_trees_equal(
    loaded["decoder_blocks"][0]["mlp"]["fc2"]["bias"],
    base["decoder_blocks"][0]["mlp"]["fc2"]["bias"],
  )
  assert_trees_equal(loaded["encoder"], _params(ours)["encoder"])
  with pytest.raises(ValueError, match=r"decoder_pred.weight: got \(48, 32\)"):
    mae_official.mae_from_official(bad, ours, strict=False)


def test_encoder_only_file_keeps_the_decoder(caplog):
  source, target = _ours(6), _ours(7)
  full = mae_official.mae_to_official(_params(source), image_size=32, patch_size=8)
  encoder_only = {k: v for k, v in full.items() if not mae_official.is_decoder_key(k)}
  assert len(encoder_only) == 30  # 4 + 12 per block * 2 + 2
  with caplog.at_level("INFO"):
    loaded = mae_official.mae_from_official(encoder_only, target)
  assert "Encoder-only MAE file" in caplog.text and "decoder_pred.weight" in caplog.text
  assert_trees_equal(loaded["encoder"], _params(source)["encoder"])
  assert_trees_equal(loaded["decoder_blocks"], _params(target)["decoder_blocks"])
  # An abstract model has no decoder to keep: base_params must come with it.
  abstract = _abstract_mae(**TINY)
  with pytest.raises(ValueError, match="pass base_params"):
    mae_official.mae_from_official(encoder_only, abstract)
  loaded = mae_official.mae_from_official(encoder_only, abstract, base_params=_params(target))
  assert_trees_equal(loaded["mask_token"], _params(target)["mask_token"])


def test_pos_embed_of_another_grid_is_checked_not_loaded(caplog):
  ours = _ours(8)
  exported = mae_official.mae_to_official(_params(ours), image_size=32, patch_size=8)
  # A 6x6 sin-cos table (the same fixed function): silently fine.
  exported["pos_embed"] = posemb.sincos_2d(6, 6, 64, cls_token=True)[None]
  with caplog.at_level("WARNING"):
    assert_trees_equal(mae_official.mae_from_official(exported, ours), _params(ours))
  assert "pos_embed" not in caplog.text
  # A learned 6x6 table: resampled to 4x4 for the comparison, reported, not loaded.
  exported["pos_embed"] = exported["pos_embed"] + 0.1
  with caplog.at_level("WARNING"):
    mae_official.mae_from_official(exported, ours)
  assert "pos_embed differs" in caplog.text and "resampled from 6x6" in caplog.text


def test_load_init_params_from_files(tmp_path, caplog):
  source, target = _ours(9), _ours(10)
  full = mae_official.mae_to_official(_params(source), image_size=32, patch_size=8)
  files.save_state_dict(tmp_path / "full.safetensors", full)
  assert_trees_equal(load.load_init_params(tmp_path / "full.safetensors", target), _params(source))
  # timm ViT layout: encoder keys plus a classifier head, which is dropped.
  timm_file = dict(
    timm_vit.vit_to_timm(_params(source)["encoder"], image_size=32),
    **{"head.weight": np.zeros((5, 64), np.float32), "head.bias": np.zeros(5, np.float32)},
  )
  files.save_state_dict(tmp_path / "timm.safetensors", timm_file)
  abstract = _abstract_mae(**TINY)
  with caplog.at_level("INFO"):
    loaded = load.load_init_params(
      tmp_path / "timm.safetensors", abstract, base_params=_params(target)
    )
  assert "dropped the classifier head" in caplog.text
  assert_trees_equal(loaded["encoder"], _params(source)["encoder"])
  assert_trees_equal(loaded["decoder_norm"], _params(target)["decoder_norm"])
  # Placed with the given shardings (here: replicated over the 8 test devices).
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  target_tree = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), _params(abstract)
  )
  placed = load.load_init_params(tmp_path / "full.safetensors", abstract, target=target_tree)
  assert all(x.sharding == replicated for x in jax.tree.leaves(placed))
  assert_trees_equal(placed, _params(source))


def test_load_init_params_names_the_first_mismatch(tmp_path):
  wider = mae.MAE(**dict(TINY, width=96, num_heads=4), rngs=nnx.Rngs(0))
  files.save_state_dict(
    tmp_path / "wide.safetensors",
    mae_official.mae_to_official(_params(wider), image_size=32, patch_size=8),
  )
  with pytest.raises(ValueError) as err:
    load.load_init_params(tmp_path / "wide.safetensors", _abstract_mae(**TINY))
  message = str(err.value)
  assert "wide.safetensors (mae_full layout, 50 keys)" in message
  assert "shape mismatches: [cls_token: got (1, 1, 96), expected (1, 1, 64)" in message
  deeper = mae.MAE(**dict(TINY, depth=3), rngs=nnx.Rngs(0))
  files.save_state_dict(
    tmp_path / "deep.safetensors",
    mae_official.mae_to_official(_params(deeper), image_size=32, patch_size=8),
  )
  with pytest.raises(ValueError, match=r"unexpected keys: \[blocks\.2\.attn\.proj\.bias"):
    load.load_init_params(tmp_path / "deep.safetensors", _abstract_mae(**TINY))
  files.save_state_dict(
    tmp_path / "sam.safetensors", {"image_encoder.pos_embed": np.zeros((1, 4, 4, 8), np.float32)}
  )
  with pytest.raises(ValueError, match="not an official MAE or timm ViT state dict"):
    load.load_init_params(tmp_path / "sam.safetensors", _abstract_mae(**TINY))
  with pytest.raises(FileNotFoundError, match="nothing at .*typo: expected an ultrajax workdir"):
    load.load_init_params(tmp_path / "typo", _abstract_mae(**TINY))
  with pytest.raises(ValueError, match="kind='sam' is not one of"):
    load.load_init_params(tmp_path / "sam.safetensors", _abstract_mae(**TINY), kind="sam")


# ----------------------------------------------------------------------------- export command
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """(workdir, params): a round-1 checkpoint as the pretraining job writes it (its writer, its
  config in `meta`) holding a perturbed tiny MAE; export reads nothing else. (A job's own
  checkpoint feeds fine-tuning in tests/test_transfer_study.py, through the same reader.)"""
  from ultrajax.train import checkpoint

  workdir = tmp_path_factory.mktemp("pretrain")
  config = configlib.load_config_module(REPO / "configs" / "pretrain_fed.py").get_config("smoke")
  params = _params(_ours(7))
  ckpt = checkpoint.Checkpointer(workdir)
  ckpt.save(1, params, {"round": jnp.asarray(1)}, None, {"config": config.to_json_best_effort()})
  ckpt.close()
  return workdir, jax.device_get(params)


def _export(workdir, fmt: str, out) -> str:
  done = subprocess.run(
    [
      sys.executable,
      "-m",
      "ultrajax.export",
      f"--workdir={workdir}",
      f"--format={fmt}",
      f"--out={out}",
      "--verbosity=-1",
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_export_timm_loads_strict_into_timm(pretrained, tmp_path):
  torch, _ = _torch()
  from timm.models.vision_transformer import VisionTransformer

  workdir, params = pretrained
  out = tmp_path / "encoder.safetensors"
  printed = _export(workdir, "timm", out)
  assert "30 keys" in printed and "encoder.safetensors" in printed
  reference = VisionTransformer(
    img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=0
  ).eval()
  reference.load_state_dict(
    {k: torch.from_numpy(v) for k, v in files.load_state_dict(out).items()}, strict=True
  )
  ours = _load(mae.MAE(**TINY, rngs=nnx.Rngs(0)), params)
  images, _ = _inputs(2)
  with torch.no_grad():
    theirs = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(
    np.asarray(ours.encoder(jnp.asarray(images)))[:, 0], theirs, atol=1e-4, rtol=1e-4
  )


def test_export_mae_loads_strict_into_official_and_back(pretrained, tmp_path):
  torch, _ = _torch()
  workdir, params = pretrained
  out = tmp_path / "mae.pth"
  assert "50 keys" in _export(workdir, "mae", out)
  reference = _official_tiny(0)
  reference.load_state_dict(torch.load(out, weights_only=True)["model"], strict=True)
  ours = _load(mae.MAE(**TINY, rngs=nnx.Rngs(0)), params)
  images, mask = _inputs(3)
  np.testing.assert_allclose(
    _official_predict(reference, images, mask), _predict(ours, images, mask), atol=1e-4, rtol=1e-4
  )
  # init_from either way gives the checkpoint's parameters exactly.
  abstract = _abstract_mae(**TINY)
  assert_trees_equal(load.load_init_params(out, abstract), params)
  assert_trees_equal(load.load_init_params(workdir, abstract), params)


def test_export_rejects_sam_and_unknown_rounds(pretrained, tmp_path):
  from ultrajax import export

  workdir, _ = pretrained
  with pytest.raises(ValueError, match="the checkpoint's params are not a SAM"):
    export.export(workdir, "sam", tmp_path / "sam.pth")
  with pytest.raises(FileNotFoundError, match=r"no checkpoint of round 7 .* rounds there: \[1\]"):
    export.export(workdir, "mae", tmp_path / "m.pth", round_index=7)
