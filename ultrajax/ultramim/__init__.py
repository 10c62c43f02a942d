"""Pure-JAX ultrasound MIM ops (UltraFedFM's UltraMIM): TGM texture masking, MIC corruption, SMAT warps."""
from ultrajax.ultramim.corruption import (
    CORRUPTIONS, corrupt, default_corruption_config, gaussian_blur, motion_blur, motion_kernel,
    salt_and_pepper, sample_corruptions)
from ultrajax.ultramim.masking import MODES, tgm_log_weights, tgm_mask
from ultrajax.ultramim.scanmode import ORIENTATIONS, convex_to_linear, linear_to_convex
from ultrajax.ultramim.texture import texture_scores

__all__ = [
    "CORRUPTIONS", "MODES", "ORIENTATIONS", "convex_to_linear", "corrupt", "default_corruption_config",
    "gaussian_blur", "linear_to_convex", "motion_blur", "motion_kernel", "salt_and_pepper",
    "sample_corruptions", "texture_scores", "tgm_log_weights", "tgm_mask",
]
