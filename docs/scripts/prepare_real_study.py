"""Manifests of the real-ultrasound study (docs/reproductions.md section 6) with fixed splits.

  python docs/scripts/prepare_real_study.py --real_us ../shared/data/real_us --out $STUDY/manifests

Writes, with absolute image paths and a `split` column (train / val / test, seed 0):
  busi_cls.csv    BUSI 3-class diagnosis (busi_cls256, 780 images), split per image, stratified by
                  class (BUSI has no patient column).
  busi_seg.csv    BUSI lesion masks (busi_seg, 149 images at original size): each image takes the
                  split of the same BUSI image in busi_cls.csv, so no test image of either task is
                  seen in the other's training or in pretraining.
  hc18_seg.csv    HC18 head masks (hc18, 200 images), split by subject_id, with pixel_size_mm.
  busi_probe.csv  the representation evaluator's task during pretraining: busi_cls.csv's train
                  images to fit on and its *val* images as the scored set; test images left out, so
                  nothing about pretraining is chosen on a test image.
  pretrain.csv    unlabelled pretraining images, one client per dataset: busi (busi_cls256
                  without any BUSI test image), hc18 (without its test subjects) and hc18_more
                  (without frames of hc18's test subjects; its 335 unlabelled images included).
"""
import argparse
import csv
import os
import random


def read(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def write(path, rows, columns):
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  print(f"{path}: {len(rows)} rows")


def assign(keys, rng, fractions=(0.6, 0.2, 0.2)):
  """{key: split}: a seeded shuffle cut into train / val / test shares."""
  keys = sorted(keys)
  rng.shuffle(keys)
  n_train, n_val = round(fractions[0] * len(keys)), round(fractions[1] * len(keys))
  return {k: "train" if i < n_train else "val" if i < n_train + n_val else "test"
          for i, k in enumerate(keys)}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--real_us", default="../shared/data/real_us")
  p.add_argument("--out", required=True)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  root = os.path.abspath(a.real_us)
  os.makedirs(a.out, exist_ok=True)
  rng = random.Random(a.seed)
  absolute = lambda d, rel: os.path.join(root, d, rel)

  busi = read(os.path.join(root, "busi_cls256", "labels.csv"))
  split = {}
  for label in sorted({r["label"] for r in busi}):  # stratified by class
    split.update(assign([os.path.basename(r["source_path"]) for r in busi if r["label"] == label],
                        rng))
  for r in busi:
    r["split"] = split[os.path.basename(r["source_path"])]
    r["image"] = absolute("busi_cls256", r["image"])
  write(os.path.join(a.out, "busi_cls.csv"), busi, ["image", "label", "split"])
  # The evaluator fits on train + val and scores test: BUSI's val images become its scored set
  # and a quarter of the training images its (required, unused apart) val split.
  train = [r for r in busi if r["split"] == "train"]
  probe = ([dict(r, split="val" if i % 4 == 0 else "train") for i, r in enumerate(train)]
           + [dict(r, split="test") for r in busi if r["split"] == "val"])
  write(os.path.join(a.out, "busi_probe.csv"), probe, ["image", "label", "split"])

  seg = read(os.path.join(root, "busi_seg", "labels.csv"))
  for r in seg:
    r["split"] = split[os.path.basename(r["source_path"])]
    r["image"], r["mask"] = absolute("busi_seg", r["image"]), absolute("busi_seg", r["mask"])
  write(os.path.join(a.out, "busi_seg.csv"), seg, ["image", "mask", "label", "split"])

  hc = read(os.path.join(root, "hc18", "labels.csv"))
  subject_split = assign({r["subject_id"] for r in hc}, rng)
  for r in hc:
    r["split"] = subject_split[r["subject_id"]]
    r["image"], r["mask"] = absolute("hc18", r["image"]), absolute("hc18", r["mask"])
  write(os.path.join(a.out, "hc18_seg.csv"), hc,
        ["image", "mask", "subject_id", "pixel_size_mm", "split"])

  test_subjects = {s for s, v in subject_split.items() if v == "test"}
  more = read(os.path.join(root, "hc18_more", "labels.csv"))
  pre = ([dict(image=r["image"], client="busi") for r in busi if r["split"] != "test"]
         + [dict(image=r["image"], client="hc18") for r in hc if r["split"] != "test"]
         + [dict(image=absolute("hc18_more", r["image"]), client="hc18_more") for r in more
            if r["subject_id"] not in test_subjects])
  write(os.path.join(a.out, "pretrain.csv"), pre, ["image", "client"])


if __name__ == "__main__":
  main()
