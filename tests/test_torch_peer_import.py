"""The real-data study's PyTorch MAE peer (docs/scripts/torch_mae_pretrain.py) saves a state dict
that ultrajax's `init_from` loads: every tensor lands on the parameter the official key map
names (checked by exporting the loaded params back and comparing with torch's own tensors)."""

import importlib.util
import pathlib

import numpy as np
import pytest
from flax import nnx

from ultrajax.interop import load, mae_official
from ultrajax.models import mae

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "docs/scripts/torch_mae_pretrain.py"
TINY = dict(
  image_size=32,
  patch_size=8,
  width=32,
  depth=1,
  num_heads=4,
  decoder_width=32,
  decoder_depth=1,
  decoder_heads=4,
)


def test_peer_checkpoint_loads_through_init_from(tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  pytest.importorskip("torchvision")
  spec = importlib.util.spec_from_file_location("torch_mae_pretrain", SCRIPT)
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  torch.manual_seed(0)
  peer = script.TorchMAE(**TINY)
  state = script.official_state_dict(peer)
  torch.save({"model": state}, tmp_path / "mae.pth")
  ours = mae.MAE(**TINY, rngs=nnx.Rngs(0))
  loaded = load.load_init_params(tmp_path / "mae.pth", ours)
  back = mae_official.mae_to_official(loaded, image_size=32, patch_size=8)
  assert set(back) == set(state)
  for key, value in state.items():
    np.testing.assert_allclose(back[key], value.numpy(), rtol=0, atol=1e-7, err_msg=key)
  # Not the model's own random init: the file's values were taken.
  own = nnx.to_pure_dict(nnx.state(ours, nnx.Param))
  assert not np.allclose(own["encoder"]["cls_token"], loaded["encoder"]["cls_token"])
