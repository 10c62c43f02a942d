"""The PyTorch MAE peer of `bench pretrain` computes MAE's objective (checked against ultrajax's
own loss on the peer's predictions and mask)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from ultrajax.bench import torch_mae
from ultrajax.models import mae

TINY = dict(image_size=32, patch_size=8, width=32, depth=1, num_heads=4, decoder_width=32,
            decoder_depth=1, decoder_heads=4, mask_ratio=0.75)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_torch_peer_masks_and_loss_like_mae(norm_pix):
  torch.manual_seed(0)
  model = torch_mae.TorchMAE(**TINY, norm_pix_loss=norm_pix)
  images = torch.randn(3, 3, 32, 32)
  with torch.no_grad():
    loss, pred, mask = model(images)
  # Random masking keeps exactly int(16 * 0.25) = 4 patches per image, different ones per image.
  np.testing.assert_array_equal(mask.sum(1).numpy(), [12, 12, 12])
  assert len({tuple(row) for row in mask.numpy()}) > 1
  expected, _ = mae.mae_loss(pred.numpy(), images.permute(0, 2, 3, 1).numpy(),
                             mask.numpy().astype(bool), 8, norm_pix=norm_pix)
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
  # Fixed positions are buffers, not trained; biases and norms have no weight decay.
  names = {n for n, _ in model.named_parameters()}
  assert "pos_embed" not in names and "decoder_pos_embed" not in names
  groups = torch_mae.adamw(model, 1e-3, 0.05).param_groups
  assert all(p.ndim > 1 for p in groups[0]["params"]) and groups[1]["weight_decay"] == 0.0
