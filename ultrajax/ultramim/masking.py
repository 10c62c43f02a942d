"""TGM masking: which patches the MAE encoder does not see, driven by texture scores (seed_systems.md 1.2).

Low-texture patches get high weight w_i = (max(a) - a_i) + |min(a)| (the official attention_masking), and
the kept patches are drawn without replacement with probability proportional to w, so textured patches
are masked more often. Sampling is Gumbel-top-k on log w, which is exactly torch.multinomial without
replacement, but sorts instead of looping.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MODES = ("intended", "official_code", "random")


def tgm_log_weights(scores):
  """log of the official sampling weights.  scores: [B, N] -> [B, N] float32.

  Non-finite or negative weights become 0 and a row summing to <= 0 becomes uniform, as the official
  preprocess_tensor does. Zero-weight patches get log w = -1e4: below any float32 log (>= -104), so they
  come after every positive-weight patch, yet Gumbel noise still orders them randomly among themselves
  (torch.multinomial would refuse to draw them at all).
  """
  a = scores.astype(jnp.float32)
  w = (a.max(-1, keepdims=True) - a) + jnp.abs(a.min(-1, keepdims=True))
  w = jnp.where(jnp.isfinite(w) & (w > 0), w, 0.0)
  w = jnp.where(w.sum(-1, keepdims=True) > 0, w, 1.0)
  return jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -1e4)


def tgm_mask(key, scores, mask_ratio: float, mode: str = "intended"):
  """Patch mask, True = masked (hidden from the encoder).  scores: [B, N] -> [B, N] bool.

  Every row keeps exactly len_keep = int(N * (1 - mask_ratio)) patches, as MAE does; mask_ratio and
  mode are static Python values. Modes:
    'intended':      keep the first len_keep patches of a weighted draw without replacement.
    'official_code': the shipped code, which argsorts the draw order once more before keeping the first
                     len_keep: patch k is kept iff the patch drawn at step k is among the first len_keep
                     in raster order, so the mask ignores texture.
    'random':        uniform masking (plain MAE).
  """
  if mode not in MODES:
    raise ValueError(f"tgm mode {mode!r} is not one of {MODES}")
  if not 0.0 <= mask_ratio < 1.0:
    raise ValueError(f"mask_ratio={mask_ratio!r} is not in [0, 1)")
  len_keep = int(scores.shape[-1] * (1.0 - mask_ratio))
  log_w = jnp.zeros(scores.shape, jnp.float32) if mode == "random" else tgm_log_weights(scores)
  perturbed = log_w + jax.random.gumbel(key, scores.shape, jnp.float32)
  draw_order = jnp.argsort(perturbed, axis=-1, descending=True)
  ids_shuffle = jnp.argsort(draw_order, axis=-1) if mode == "official_code" else draw_order
  # MAE: ids_restore[k] is the position of patch k in ids_shuffle; the first len_keep positions are kept.
  ids_restore = jnp.argsort(ids_shuffle, axis=-1)
  return ids_restore >= len_keep
