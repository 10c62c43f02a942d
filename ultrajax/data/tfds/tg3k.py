"""TG3K: thyroid gland segmentation in ultrasound video frames (Gong et al., ISBI 2021)."""

from __future__ import annotations

import json
import os

from PIL import Image

from ultrajax.data.tfds import base


class Tg3k(base.UltrasoundBuilder):
  """3,585 thyroid ultrasound frames from 16 videos with gland masks, in the authors'
  train / val split (tg3k-trainval.json)."""

  name = "tg3k"
  ROOT = "tg3k"
  HAS_MASK = True
  SPLITS = ("train", "validation")
  HOMEPAGE = "https://github.com/haifangong/TRFE-Net-for-thyroid-nodule-segmentation"
  CITATION = (
    "Gong H, Chen G, Wang R, et al. Multi-task learning for thyroid nodule segmentation "
    "with thyroid region prior. IEEE ISBI 2021, 257-261."
  )
  MANUAL_DOWNLOAD_INSTRUCTIONS = """Download the thyroid dataset linked from the homepage and
  point manual_dir at the folder holding tg3k/ (its 'Thyroid Dataset' folder):
  manual_dir/tg3k/thyroid-image/<nnnn>.jpg, tg3k/thyroid-mask/<nnnn>.jpg and
  tg3k/tg3k-trainval.json ({"train": [n, ...], "val": [n, ...]})."""

  def _generate_examples(self, manual_dir, split):
    folder = os.path.join(manual_dir, self.ROOT)
    with open(os.path.join(folder, "tg3k-trainval.json")) as f:
      listed = json.load(f)
    wanted = set(listed["train" if split == "train" else "val"])
    # No video ids are released. Frames are numbered video after video and each video keeps one
    # frame size, so a run of equal-sized consecutive frames stands for a video (the patient id):
    # splitting by it keeps a video's near-duplicate frames on one side.
    run, previous = 0, None
    for n in sorted(set(listed["train"]) | set(listed["val"])):
      path = os.path.join(folder, "thyroid-image", f"{n:04d}.jpg")
      with Image.open(path) as img:
        size = img.size
      if previous is not None and size != previous:
        run += 1
      previous = size
      if n not in wanted:
        continue
      mask = base.binary_mask(os.path.join(folder, "thyroid-mask", f"{n:04d}.jpg"))
      patient = f"video_run_{run}"
      yield (
        f"{n:04d}",
        base.example(
          manual_dir, path, base.grey(path), mask=mask, patient_id=patient, probe="linear"
        ),
      )
