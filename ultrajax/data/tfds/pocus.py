"""POCUS: the COVID-19 lung ultrasound collection covid19_ultrasound (Born et al., Applied
Sciences 11(2):672, 2021)."""

from __future__ import annotations

import glob
import os
from typing import ClassVar

import numpy as np
from absl import logging
from PIL import Image

from ultrajax.data.tfds import base

# File-name prefix (lower case) -> class; the collection names files 'Cov-...', 'Pneu-...', ...
_PREFIXES = {"cov": "covid", "pne": "pneumonia", "reg": "regular", "vir": "viral"}
_IMAGES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
FRAME_EVERY = 10  # videos: frames 0, 10, 20, ... (the loops run at about 10-30 frames/s)


def label_of(name: str) -> str | None:
  """The class of a file name from its prefix; None for files of no listed class."""
  return _PREFIXES.get(name[:3].lower())


def video_frames(path: str, every: int = FRAME_EVERY):
  """Yields (frame index, uint8 [H, W, 3]) of every `every`-th frame of a video file, read with
  imageio (GIF through Pillow; mp4/avi/mov need imageio's ffmpeg or pyav plugin)."""
  import imageio.v3 as iio

  for k, frame in enumerate(iio.imiter(path)):
    if k % every == 0:
      yield k, np.asarray(Image.fromarray(np.asarray(frame)).convert("RGB"), np.uint8)


class Pocus(base.UltrasoundBuilder):
  """Lung ultrasound images and video loops (convex and linear probes) collected from
  publications and educational sites, labelled COVID-19 / bacterial pneumonia / regular
  (healthy) / other viral pneumonia by file-name prefix. Video frames are sampled every
  FRAME_EVERY frames when imageio can decode the video."""

  name = "pocus"
  ROOT = "data"
  CHANNELS = 3
  CLASSES = ("covid", "pneumonia", "regular", "viral")
  EXTRA_FEATURES: ClassVar[dict] = {"frame": base.tfds.features.Scalar(np.int32)}  # -1: image
  HOMEPAGE = "https://github.com/jannisborn/covid19_ultrasound"
  CITATION = (
    "Born J, Wiedemann N, Cossio M, et al. Accelerating detection of lung pathologies "
    "with explainable ultrasound image analysis. Applied Sciences 11(2):672, 2021."
  )
  MANUAL_DOWNLOAD_INSTRUCTIONS = """Clone or download the homepage repository and point
  manual_dir at its root, which holds data/pocus_images/{convex,linear}/<Prefix>-<name>.<ext>
  and data/pocus_videos/{convex,linear}/<Prefix>-<name>.<ext> (Prefix Cov, Pneu, Reg, Vir).
  Videos the repository cannot redistribute (Butterfly) are added with its own script first."""

  def _generate_examples(self, manual_dir, split):
    try:
      import imageio.v3  # noqa: F401

      videos = True
    except ImportError:
      logging.warning("pocus: imageio is not installed; the videos are left out (images only)")
      videos = False
    for kind in ("images", "videos") if videos else ("images",):
      for probe in ("convex", "linear"):
        for path in sorted(
          glob.glob(os.path.join(manual_dir, self.ROOT, f"pocus_{kind}", probe, "*"))
        ):
          name = os.path.basename(path)
          label = label_of(name)
          if label is None or name.startswith("."):
            logging.info("pocus: %s has no class prefix %s; left out", path, sorted(_PREFIXES))
            continue
          file_name = os.path.relpath(path, manual_dir)
          common = dict(label=label, patient_id=os.path.splitext(name)[0], probe=probe)
          if kind == "images":
            if name.lower().endswith(_IMAGES):
              yield file_name, base.example(manual_dir, path, base.rgb(path), frame=-1, **common)
            continue
          try:
            frames = list(video_frames(path))
          except (OSError, ValueError) as e:  # imageio: no plugin for the format, or a bad file
            logging.warning("pocus: cannot decode %s (%s); left out", path, str(e).splitlines()[0])
            continue
          for k, frame in frames:
            # All frames of a loop share its patient_id, so they stay in one split.
            frame_path = f"{path}#{k}"  # its file_name: '<video>#<k>'
            yield f"{file_name}#{k}", base.example(manual_dir, frame_path, frame, frame=k, **common)
