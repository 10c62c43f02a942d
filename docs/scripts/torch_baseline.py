"""Baseline peers of the real-data fine-tuning study: a small CNN classifier or a small U-Net
(plain PyTorch; MONAI is not a dependency) trained on the same task, split, label fraction and
64 x 64 inputs as the ViT cells, for a fixed CPU-time budget (the ViT cells' mean, so the
comparison is at equal compute on a loaded machine where wall time says little).

  python docs/scripts/torch_baseline.py --task cls --manifest $STUDY/manifests/busi_cls.csv \
      --classes normal,benign,malignant --fraction 0.1 --seed 0 --cpu_seconds 60 --out $DIR

The task is read by ultrajax itself (ultrajax.data.tasks.manifest_task, the manifest's split
column) and the training subset is ultrajax's (tasks.train_subset with split_seed 0, nested and
stratified), so the ViT and the baseline see the same images. Each epoch is followed by a
validation pass; the best validation epoch (macro AUROC / mean Dice) is tested. Writes
results.json: test metrics (ultrajax.eval.metrics), epochs, CPU seconds and per-image test Dice
or class probabilities.
"""
import argparse
import json
import os
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ultrajax.data import tasks
from ultrajax.eval import metrics
from ultrajax.models import mae as ujx_mae


def conv_block(cin, cout):
  return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
  """Four conv blocks (32-64-128-256) with max-pooling, global average pool, dropout, linear."""

  def __init__(self, num_classes: int, widths=(32, 64, 128, 256)):
    super().__init__()
    layers, cin = [], 3
    for w in widths:
      layers += [conv_block(cin, w), nn.MaxPool2d(2)]
      cin = w
    self.features = nn.Sequential(*layers)
    self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(cin, num_classes))

  def forward(self, x):
    return self.head(self.features(x).mean((2, 3)))


class SmallUNet(nn.Module):
  """U-Net (Ronneberger et al. 2015) with 16-32-64-128 channels and a 256-channel bottleneck."""

  def __init__(self, widths=(16, 32, 64, 128, 256)):
    super().__init__()
    self.down = nn.ModuleList()
    cin = 3
    for w in widths:
      self.down.append(conv_block(cin, w))
      cin = w
    self.up = nn.ModuleList([nn.ConvTranspose2d(w2, w1, 2, stride=2)
                             for w1, w2 in zip(widths[:-1], widths[1:])])
    self.fuse = nn.ModuleList([conv_block(2 * w, w) for w in widths[:-1]])
    self.out = nn.Conv2d(widths[0], 1, 1)

  def forward(self, x):
    skips = []
    for i, block in enumerate(self.down):
      x = block(x if i == 0 else F.max_pool2d(x, 2))
      skips.append(x)
    x = skips.pop()
    for up, fuse in zip(reversed(self.up), reversed(self.fuse)):
      x = fuse(torch.cat([up(x), skips.pop()], 1))
    return self.out(x)[:, 0]


def to_input(images: np.ndarray) -> torch.Tensor:
  """uint8 [B, H, W, 3] -> normalised float [B, 3, H, W] (ImageNet mean/std, as the ViT)."""
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
  mean = torch.tensor(ujx_mae.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(ujx_mae.IMAGENET_STD).view(1, 3, 1, 1)
  return (x - mean) / std


def augment(x: torch.Tensor, y: torch.Tensor | None, rng: np.random.Generator):
  """Random horizontal flip and a random resized crop (scale 0.35-1 of the area, the `cpu`
  fine-tuning preset's range), applied to the mask too."""
  b, _, h, w = x.shape
  flip = torch.from_numpy(rng.random(b) < 0.5)
  x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
  if y is not None:
    y = torch.where(flip.view(b, 1, 1), y.flip(2), y)
  scale = np.sqrt(rng.uniform(0.35, 1.0, b))
  cx, cy = (rng.uniform(-1, 1, (2, b)) * (1 - scale))
  theta = torch.zeros(b, 2, 3)
  theta[:, 0, 0] = theta[:, 1, 1] = torch.from_numpy(scale).float()
  theta[:, 0, 2], theta[:, 1, 2] = torch.from_numpy(cx).float(), torch.from_numpy(cy).float()
  grid = F.affine_grid(theta, (b, 1, h, w), align_corners=False)
  x = F.grid_sample(x, grid, mode="bilinear", align_corners=False)
  if y is not None:
    y = F.grid_sample(y[:, None].float(), grid, mode="nearest", align_corners=False)[:, 0]
  return x, y


def predict(model, x: torch.Tensor, task: str, batch: int = 64) -> np.ndarray:
  model.eval()
  with torch.no_grad():
    out = [model(x[i:i + batch]) for i in range(0, len(x), batch)]
  out = torch.cat(out)
  return (out.softmax(-1) if task == "cls" else (out > 0).to(torch.uint8)).numpy()


def score(task, pred, target):
  if task == "cls":
    return dict(auroc=metrics.auroc(target, pred), accuracy=metrics.accuracy(target, pred.argmax(1)))
  per_image = metrics.dice(pred, target)
  return dict(dice=float(np.mean(per_image)), iou=float(np.mean(metrics.iou(pred, target))))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--task", choices=("cls", "seg"), required=True)
  p.add_argument("--manifest", required=True)
  p.add_argument("--classes", default="")
  p.add_argument("--group_column", default="group")
  p.add_argument("--fraction", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cpu_seconds", type=float, required=True)
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--out", required=True)
  a = p.parse_args()
  torch.manual_seed(a.seed)
  torch.set_num_threads(a.threads)
  rng = np.random.default_rng(a.seed)
  data = tasks.manifest_task(a.manifest, a.task, a.image_size, classes=a.classes,
                             group_column=a.group_column)
  train = tasks.train_subset(data, a.fraction, 0)
  val, test = data.indices("val"), data.indices("test")
  x_all = to_input(data.images)
  y_all = torch.from_numpy(data.targets.astype(np.int64))
  model = SmallCNN(data.num_classes) if a.task == "cls" else SmallUNet()
  opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.05)
  key = "auroc" if a.task == "cls" else "dice"
  best, best_state, epochs = -np.inf, None, 0
  cpu0 = time.process_time()
  wall0 = time.perf_counter()
  while time.process_time() - cpu0 < a.cpu_seconds:
    model.train()
    order = rng.permutation(train)
    for i in range(0, len(order), a.batch):
      idx = order[i:i + a.batch]
      if len(idx) < 2:  # BatchNorm needs two samples
        continue
      x, y = augment(x_all[idx], y_all[idx] if a.task == "seg" else None, rng)
      out = model(x)
      if a.task == "cls":
        loss = F.cross_entropy(out, y_all[idx])
      else:
        prob = out.sigmoid()
        inter = (prob * y).sum((1, 2))
        dice = (2 * inter + 1) / (prob.sum((1, 2)) + y.sum((1, 2)) + 1)
        loss = F.binary_cross_entropy_with_logits(out, y) + (1 - dice).mean()
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
    epochs += 1
    got = score(a.task, predict(model, x_all[val], a.task), data.targets[val])[key]
    if got > best:
      best, best_state = got, {k: v.clone() for k, v in model.state_dict().items()}
  cpu = time.process_time() - cpu0
  model.load_state_dict(best_state)
  pred = predict(model, x_all[test], a.task)
  result = dict(task=a.task, manifest=a.manifest, fraction=a.fraction, seed=a.seed,
                num_train=int(len(train)), num_val=int(len(val)), num_test=int(len(test)),
                epochs=epochs, cpu_seconds=cpu, wall_seconds=time.perf_counter() - wall0,
                val_best=float(best), test=score(a.task, pred, data.targets[test]))
  if a.task == "seg":
    result["test_dice_per_image"] = [float(d) for d in metrics.dice(pred, data.targets[test])]
  else:
    result["test_probs"] = pred.tolist()
  os.makedirs(a.out, exist_ok=True)
  with open(os.path.join(a.out, "results.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps({k: v for k, v in result.items() if not k.startswith("test_")}))


if __name__ == "__main__":
  main()
