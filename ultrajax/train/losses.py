"""Fine-tuning losses: segmentation (BCE / cross-entropy + soft Dice) and class-weighted soft
cross-entropy for classification (with scikit-learn's 'balanced' weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def soft_dice_loss(probs, onehot):
  """1 - soft Dice per image and class, averaged.  probs, onehot: [B, S, S, K] (K foreground)."""
  inter = (probs * onehot).sum(axis=(1, 2))
  total = probs.sum(axis=(1, 2)) + onehot.sum(axis=(1, 2))
  return (1.0 - (2.0 * inter + 1.0) / (total + 1.0)).mean()


def seg_loss(logits, target, dice_weight: float):
  """BCE + Dice (one output: binary) or cross-entropy + Dice over the foreground classes.

  logits: [B, S, S, 1 | K]; target: [B, S, S] int. The sigmoid / softmax is taken once and the
  cross-entropy is computed from the logits (no double sigmoid).
  """
  if logits.shape[-1] == 1:
    t = (target > 0).astype(jnp.float32)[..., None]
    ce = optax.sigmoid_binary_cross_entropy(logits, t).mean()
    return ce + dice_weight * soft_dice_loss(jax.nn.sigmoid(logits), t)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
  onehot = jax.nn.one_hot(target, logits.shape[-1])[..., 1:]
  return ce + dice_weight * soft_dice_loss(jax.nn.softmax(logits)[..., 1:], onehot)


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """n / (K n_k) per class k (scikit-learn's 'balanced'), 0 for a class absent from `labels`.

  labels: int [n] -> float32 [K]; with every class present the weighted class shares sum to 1,
  so the loss keeps its scale."""
  counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
  weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
  return weights.astype(np.float32)


def weighted_soft_cross_entropy(logits, soft, class_weights):
  """mean_b -sum_k w_k y_bk log softmax(logits)_bk (torch's CrossEntropyLoss(weight) with soft
  targets).  logits, soft: [B, K]; class_weights: [K] (ones: plain cross-entropy)."""
  return -(class_weights * soft * jax.nn.log_softmax(logits)).sum(-1).mean()
