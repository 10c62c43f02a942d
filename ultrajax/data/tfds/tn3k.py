"""TN3K: thyroid nodule segmentation (Gong et al., Computers in Biology and Medicine 155, 2023)."""

from __future__ import annotations

import glob
import os

from ultrajax.data.tfds import base


class Tn3k(base.UltrasoundBuilder):
  """3,493 thyroid ultrasound images of 2,421 patients (Zhongshan Ophthalmic Center, Sun Yat-sen
  University) with nodule masks, in the authors' trainval / test split."""

  name = "tn3k"
  ROOT = "tn3k"
  HAS_MASK = True
  SPLITS = ("train", "test")
  HOMEPAGE = "https://github.com/haifangong/TRFE-Net-for-thyroid-nodule-segmentation"
  CITATION = (
    "Gong H, Chen J, Chen G, Li H, Li G, Chen F. Thyroid region prior guided attention "
    "for ultrasound segmentation of thyroid nodules. Comput Biol Med 155:106389, 2023."
  )
  MANUAL_DOWNLOAD_INSTRUCTIONS = """Download the thyroid dataset linked from the homepage and
  point manual_dir at the folder holding tn3k/ (its 'Thyroid Dataset' folder):
  manual_dir/tn3k/{trainval,test}-image/<n>.jpg with the masks in {trainval,test}-mask/<n>.jpg."""

  def _generate_examples(self, manual_dir, split):
    prefix = "trainval" if split == "train" else "test"
    folder = os.path.join(manual_dir, self.ROOT)
    for path in sorted(glob.glob(os.path.join(folder, f"{prefix}-image", "*.jpg"))):
      name = os.path.splitext(os.path.basename(path))[0]
      mask = base.binary_mask(os.path.join(folder, f"{prefix}-mask", name + ".jpg"))
      # The release gives no patient ids: each image is its own patient.
      key = f"{prefix}_{name}"
      yield (
        key,
        base.example(manual_dir, path, base.grey(path), mask=mask, patient_id=key, probe="linear"),
      )
