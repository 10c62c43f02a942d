"""One click on each phantom test lesion through the interactive predictor (docs/reproductions.md
section 3).

  python docs/scripts/one_click.py WORKDIR IMAGE_SIZE OUT.png

WORKDIR: a configs/sam_ultrasound.py run on the phantom; IMAGE_SIZE: its data.phantom_image_size.
Prints the mean / median IoU and the share above 0.5 for the single-mask output and for
`ultrajax.segment --refine`, over all lesions and over the larger and smaller half by area;
OUT.png shows the first 8 lesions with the single-mask output and the click.
"""
import sys

import numpy as np
from PIL import Image

from ultrajax import segment
from ultrajax.data import instances
from ultrajax.eval import sam_predictor

workdir, size, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model, _ = sam_predictor.load_model(workdir)
predictor = sam_predictor.SamPredictor(model)
source = instances.PhantomInstances("sam_test", 64, size, seed=0)  # the job's test images
ious, areas, tiles = {"click": [], "click, refined": []}, [], []
for i in range(len(source)):
  record = source[i]
  lesions = [m.astype(bool) for m, cat in zip(record["masks"], record["category_ids"]) if cat == 2]
  if not lesions:
    continue
  rgb = np.repeat(record["image"][..., None], 3, axis=-1)
  predictor.set_image(rgb)  # one image embedding for all of its lesions
  for mask in lesions:
    areas.append(mask.sum())
    ys, xs = np.nonzero(mask)
    click = np.array([[xs.mean(), ys.mean()]], np.float32)  # the lesion's centroid
    single, _, _ = predictor.predict(click, np.array([1]), multimask_output=False)
    masks, iou, _ = segment.predict_refined(predictor, click, np.array([1]))
    refined = masks[np.argmax(iou)]
    for name, pred in (("click", single[0]), ("click, refined", refined)):
      ious[name].append((pred & mask).sum() / max((pred | mask).sum(), 1))
    if len(tiles) < 8:
      tiles.append(segment.overlay(rgb, single[0], click, [1]))
areas = np.asarray(areas)
large = areas >= np.median(areas)
for name, v in ious.items():
  for part, sel in (("all", np.ones_like(large)), ("larger half", large), ("smaller half", ~large)):
    w = np.asarray(v)[sel]
    print(f"{name}, {part}: {len(w)} lesions of {areas[sel].min()}-{areas[sel].max()} px, "
          f"mean IoU {w.mean():.3f}, median {np.median(w):.3f}, IoU > 0.5 for {(w > 0.5).mean():.0%}")
Image.fromarray(np.concatenate(tiles, axis=1)).save(out)
print("wrote", out)
