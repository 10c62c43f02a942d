"""COCO mask mAP of prompted segmentation through pycocotools (UltraSam's protocol).

Every ground-truth instance gets exactly one prompted prediction, scored by the model's
predicted IoU, in one class-agnostic category (as UltraSam's `*.agnostic.*` evaluation files).
mAP averages AP over IoU thresholds 0.50:0.05:0.95, so it measures the distribution of mask
IoUs and how well the predicted IoU ranks the predictions; mAP@50 is AP at IoU 0.5.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
from pycocotools import coco, cocoeval, mask as mask_utils

from ultrajax.models import sam as sam_lib


def _rle(mask: np.ndarray) -> dict:
  return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def mask_map(
  gt_masks: Sequence[np.ndarray], pred_masks: Sequence[np.ndarray], scores: Sequence[np.ndarray]
) -> dict:
  """COCO segm AP over images.

  gt_masks[i]: {0,1} [N_i, H_i, W_i] of image i; pred_masks[i]: [N_i, H_i, W_i] (one prediction
  per instance, or any number: they are matched by COCOeval); scores[i]: [N_i'] confidence.
  Returns {'mAP': AP@[.5:.95], 'mAP50': AP@.5, 'num_instances': total ground truths}; AP is in
  [0, 1] (the paper prints percent).
  """
  if not len(gt_masks) == len(pred_masks) == len(scores):
    raise ValueError(
      f"gt_masks, pred_masks and scores cover {len(gt_masks)}, {len(pred_masks)} "
      f"and {len(scores)} images"
    )
  images, annotations, detections = [], [], []
  for i, (gt, pred, score) in enumerate(zip(gt_masks, pred_masks, scores)):
    gt, pred, score = np.asarray(gt), np.asarray(pred), np.asarray(score, np.float64)
    if gt.ndim != 3 or pred.ndim != 3 or pred.shape[1:] != gt.shape[1:] or len(score) != len(pred):
      raise ValueError(
        f"image {i}: gt {gt.shape}, pred {pred.shape}, scores {score.shape} do not "
        "fit [N, H, W], [N', H, W], [N']"
      )
    images.append(dict(id=i + 1, height=gt.shape[1], width=gt.shape[2]))
    for m in gt:
      rle = _rle(m)
      annotations.append(
        dict(
          id=len(annotations) + 1,
          image_id=i + 1,
          category_id=1,
          segmentation=rle,
          area=float(mask_utils.area(rle)),
          bbox=list(mask_utils.toBbox(rle)),
          iscrowd=0,
        )
      )
    for m, s in zip(pred, score):
      detections.append(dict(image_id=i + 1, category_id=1, segmentation=_rle(m), score=float(s)))
  if not annotations:
    raise ValueError("no ground-truth instance to evaluate")
  gt_api = coco.COCO()
  gt_api.dataset = dict(
    images=images, annotations=annotations, categories=[dict(id=1, name="object")]
  )
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
    gt_api.createIndex()
    dt_api = gt_api.loadRes(detections) if detections else coco.COCO()
    evaluator = cocoeval.COCOeval(gt_api, dt_api, iouType="segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  stats = np.maximum(evaluator.stats, 0.0)  # -1 marks "no ground truth in this area range"
  return dict(mAP=float(stats[0]), mAP50=float(stats[1]), num_instances=len(annotations))


def logits_to_masks(low_res_logits: np.ndarray, input_size: int, hw, original_hw) -> np.ndarray:
  """Decoder logits -> binary masks on the original image (segment_anything's postprocess).

  low_res_logits: [N, s, s] for the [S, S] padded input (S = input_size); hw: the resized
  image's (h, w) inside it; original_hw: (H, W). Upsample to S, crop the padding, resize to
  (H, W) bilinearly (models/sam.postprocess_masks, in numpy), threshold at 0. Returns uint8
  [N, H, W].
  """
  logits = np.asarray(low_res_logits, np.float32)
  return (sam_lib.postprocess_masks(logits, hw, original_hw, input_size) > 0).astype(np.uint8)
