"""UltraSam's evaluation: prompted-segmentation COCO mask mAP / mIoU over an instance dataset
(scored at the original resolution, eval/coco_eval.py), and the prompted-classification metrics
(paper Table 4)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from ultrajax.eval import coco_eval, metrics
from ultrajax.train import loop


def mask_ious(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
  """IoU of matching masks.  gt, pred: {0,1} [N, H, W] -> [N] (0 where both are empty)."""
  gt, pred = gt.astype(bool), pred.astype(bool)
  inter = (gt & pred).sum((1, 2))
  union = (gt | pred).sum((1, 2))
  return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def evaluate_instances(
  predict: Callable,
  params,
  dataset,
  *,
  batch_size: int,
  max_images: int,
  batch_sharding,
  num_preview: int = 4,
) -> tuple[dict, dict]:
  """COCO mask mAP / mAP@50 / mIoU per prompt setting on `dataset` (data/instances.py
  InstanceDataset), and the first images' predictions for a figure.

  predict(params, images uint8 [B,S,S,3], masks [B,M,S,S]) -> {setting: (logits [B,M,s,s],
  score [B,M])}. Keys '<setting>/mAP' pool every category (UltraSam's class-agnostic protocol);
  with several categories, '<setting>/<category>/mAP' keeps one category's instances and their
  predictions. '.../mIoU' is the mean IoU of each instance's one predicted mask with its ground
  truth (what a user sees after one click or box). max_images: 0 = every image.
  shown: image [P,S,S,3], masks [P,M,S,S], valid [P,M] and per setting bool masks [P,M,S,S]
  (the logits resized to S), P = num_preview.
  """
  size, m = dataset.size, dataset.max_instances
  count = len(dataset) if not max_images else min(len(dataset), max_images)
  gts, cats, preds = [], [], {}
  shown = None
  for start in range(0, count, batch_size):
    idx = list(range(start, min(start + batch_size, count)))
    batch = dataset.batch(idx + [idx[0]] * (batch_size - len(idx)))  # static batch: pad, repeat
    inputs = [loop.put_global(batch[k], batch_sharding) for k in ("image", "masks")]
    out = jax.device_get(predict(params, *inputs))
    for j, i in enumerate(idx):
      record = dataset.record(i)
      n = min(len(record["masks"]), m)
      keep = batch["valid"][j][:n]
      gts.append(record["masks"][:n][keep])
      cats.append(record["category_ids"][:n][keep])
      for name, (logits, score) in out.items():
        masks = coco_eval.logits_to_masks(
          logits[j, :n][keep], size, batch["hw"][j], record["masks"].shape[1:]
        )
        preds.setdefault(name, []).append((masks, score[j, :n][keep]))
    if shown is None:
      p = num_preview
      shown = dict(image=batch["image"][:p], masks=batch["masks"][:p], valid=batch["valid"][:p])
      for name, (logits, _) in out.items():
        low = logits[:p]
        shown[name] = np.asarray(jax.image.resize(low, low.shape[:2] + (size, size), "linear")) > 0
  names = {c["id"]: c["name"] for c in dataset.source.categories}
  present = sorted(set(np.concatenate(cats).tolist()))
  results = {}
  for name, pairs in preds.items():
    ious = [mask_ious(g, p) for g, (p, _) in zip(gts, pairs)]
    subsets = [("", [np.ones(len(c), bool) for c in cats])]
    if len(present) > 1:
      subsets += [(f"{names[k]}/", [c == k for c in cats]) for k in present]
    for prefix, keeps in subsets:
      r = coco_eval.mask_map(
        [g[k] for g, k in zip(gts, keeps)],
        [p[k] for (p, _), k in zip(pairs, keeps)],
        [s[k] for (_, s), k in zip(pairs, keeps)],
      )
      results[f"{name}/{prefix}mAP"], results[f"{name}/{prefix}mAP50"] = r["mAP"], r["mAP50"]
      results[f"{name}/{prefix}mIoU"] = float(
        np.concatenate([iou[k] for iou, k in zip(ious, keeps)]).mean()
      )
  return results, shown


def class_metric_fns(num_classes: int) -> dict:
  """{name: fn(labels [N] in [0, K), probs [N, K]) -> float}: AUROC (binary, or macro
  one-vs-rest) and the paper's precision, recall and F1 (Table 4) of the arg-max prediction,
  macro over the K classes, and per class k as '<metric>/<k>'."""
  fns = dict(auroc=metrics.auroc)
  for name, fn in dict(precision=metrics.precision, recall=metrics.recall, f1=metrics.f1).items():
    fns[name] = lambda y, q, fn=fn: fn(y, q.argmax(1), num_classes=num_classes)
    for k in range(num_classes):
      fns[f"{name}/{k}"] = lambda y, q, fn=fn, k=k: fn(y == k, q.argmax(1) == k, average="binary")
  return fns
