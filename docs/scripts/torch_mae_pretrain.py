"""The PyTorch peer of the real-data pretraining: the official MAE recipe (facebookresearch/mae:
timm blocks, random masking, per-step warm-up + cosine lr, AdamW (0.9, 0.95) without decay on
biases and norms, RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip) on the images of a
pretraining manifest, pooled, for a given number of steps at ultrajax's shapes. Saves the
official `MaskedAutoencoderViT` state dict (keys as models_mae.py: patch_embed.proj.*, pos_embed,
decoder_*), which ultrajax loads through --config.init_from=<file>.pth.

  python docs/scripts/torch_mae_pretrain.py --manifest $STUDY/manifests/pretrain.csv \
      --out $STUDY/pre_torch/mae.pth --steps 1740 --warmup_steps 174 --peak_lr 5e-4

Defaults are configs/pretrain_real.py's shapes (ViT width 128, depth 4, 4 heads, patch 8, 64 x
64, decoder 96 x 1, mask 0.75, norm-pix targets, batch 32, weight decay 0.05). The model is
ultrajax/bench/torch_mae.py's TorchMAE; images are read with ultrajax's decoder (RGB uint8) and
stored at most 256 px on the long side before cropping (the crops are resized to 64 px).
Normalised with ImageNet's mean/std as ultrajax's MAE does.
"""
import argparse
import csv
import json
import os
import time

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from ultrajax.bench.torch_mae import TorchMAE, adamw, recipe_lr, recipe_step
from ultrajax.data import sources
from ultrajax.models import mae as ujx_mae


def load_images(manifest: str, longest: int) -> list[torch.Tensor]:
  """uint8 [3, H, W] tensors of the manifest's `image` column (paths relative to the CSV)."""
  base = os.path.dirname(os.path.abspath(manifest))
  with open(manifest, newline="") as f:
    paths = [os.path.join(base, r["image"]) for r in csv.DictReader(f)]
  out = []
  for p in paths:
    pixels = sources.decode_image(p)  # grey [H, W] is repeated to RGB, as ultrajax does
    image = Image.fromarray(np.repeat(pixels[..., None], 3, -1) if pixels.ndim == 2 else pixels)
    scale = longest / max(image.size)
    if scale < 1:
      image = image.resize((round(image.width * scale), round(image.height * scale)),
                           Image.BICUBIC)
    out.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
  return out


def official_state_dict(model: TorchMAE) -> dict[str, torch.Tensor]:
  """TorchMAE's parameters under models_mae.py's keys, with both position tables."""
  sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
  sd["patch_embed.proj.weight"] = sd.pop("patch_embed.weight")
  sd["patch_embed.proj.bias"] = sd.pop("patch_embed.bias")
  sd["pos_embed"] = model.pos_embed.clone()
  sd["decoder_pos_embed"] = model.decoder_pos_embed.clone()
  return sd


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--manifest", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--steps", type=int, required=True)
  p.add_argument("--warmup_steps", type=int, default=0)
  p.add_argument("--peak_lr", type=float, default=5e-4)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--weight_decay", type=float, default=0.05)
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--patch", type=int, default=8)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--decoder_width", type=int, default=96)
  p.add_argument("--decoder_depth", type=int, default=1)
  p.add_argument("--decoder_heads", type=int, default=4)
  p.add_argument("--mask_ratio", type=float, default=0.75)
  p.add_argument("--pixel_loss", action="store_true", help="plain pixels, not norm-pix targets")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  torch.manual_seed(a.seed)
  torch.set_num_threads(a.threads)
  rng = np.random.default_rng(a.seed)
  t0 = time.perf_counter()
  images = load_images(a.manifest, 256)
  print(f"{len(images)} images read in {time.perf_counter() - t0:.0f} s", flush=True)
  augment = v2.Compose([
      v2.RandomResizedCrop(a.image_size, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                           antialias=True),
      v2.RandomHorizontalFlip()])
  mean = torch.tensor(ujx_mae.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(ujx_mae.IMAGENET_STD).view(1, 3, 1, 1)
  model = TorchMAE(image_size=a.image_size, patch_size=a.patch, width=a.width, depth=a.depth,
                   num_heads=a.heads, decoder_width=a.decoder_width, decoder_depth=a.decoder_depth,
                   decoder_heads=a.decoder_heads, mask_ratio=a.mask_ratio,
                   norm_pix_loss=not a.pixel_loss)
  opt = adamw(model, a.peak_lr, a.weight_decay)
  order, pos, log = rng.permutation(len(images)), 0, []
  t0 = time.perf_counter()
  for step in range(a.steps):
    lr = recipe_lr(step, a.peak_lr, a.warmup_steps, a.steps)
    if pos + a.batch > len(order):  # epochs over the pooled images, reshuffled each time
      order, pos = rng.permutation(len(images)), 0
    batch = torch.stack([augment(images[i]) for i in order[pos:pos + a.batch]])
    pos += a.batch
    x = (batch.float() / 255 - mean) / std
    loss, _ = recipe_step(model, opt, x, lr)  # MAE's engine_pretrain step
    if step % 50 == 0 or step == a.steps - 1:
      log.append(dict(step=step, loss=loss, lr=lr, seconds=time.perf_counter() - t0))
      print(json.dumps(log[-1]), flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  torch.save({"model": official_state_dict(model)}, a.out)
  with open(os.path.splitext(a.out)[0] + "_log.json", "w") as f:
    json.dump(dict(args=vars(a), log=log), f, indent=1)
  print(f"saved {a.out} after {a.steps} steps in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main()
