"""Ultrasound MIM ops (UltraFedFM's UltraMIM): TGM texture masking, MIC corruption, SMAT warps (JAX),
and the host-side probe geometry SMAT needs (geometry.py, numpy)."""

from ultrajax.ultramim.corruption import (
  corrupt,
  gaussian_blur,
  motion_blur,
  motion_kernel,
  salt_and_pepper,
  sample_corruptions,
)
from ultrajax.ultramim.geometry import NotASector, check_fan, estimate_fan
from ultrajax.ultramim.masking import MODES, tgm_log_weights, tgm_mask
from ultrajax.ultramim.scanmode import (
  ORIENTATIONS,
  convex_to_linear,
  linear_to_convex,
  linear_to_sector,
  sector_to_linear,
)
from ultrajax.ultramim.texture import texture_scores

__all__ = [
  "MODES",
  "ORIENTATIONS",
  "NotASector",
  "check_fan",
  "convex_to_linear",
  "corrupt",
  "estimate_fan",
  "gaussian_blur",
  "linear_to_convex",
  "linear_to_sector",
  "motion_blur",
  "motion_kernel",
  "salt_and_pepper",
  "sample_corruptions",
  "sector_to_linear",
  "texture_scores",
  "tgm_log_weights",
  "tgm_mask",
]
