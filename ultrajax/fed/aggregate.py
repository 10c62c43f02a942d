"""Client weights and broadcasting to a leading client axis C. Knows nothing of models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def client_weights(num_images, mode: str) -> np.ndarray:
  """FedAvg weights [C] summing to 1: 'volume' = n_k / sum n (UltraFedFM), 'uniform' = 1/C."""
  num_images = np.asarray(num_images, np.float64)
  if mode == "volume":
    w = num_images
  elif mode == "uniform":
    w = np.ones_like(num_images)
  else:
    raise ValueError(f"aggregation {mode!r} is not 'volume' or 'uniform'")
  if w.sum() <= 0:
    raise ValueError(f"client weights sum to {w.sum()}; every client is empty")
  return (w / w.sum()).astype(np.float32)


def broadcast(server_tree, num_clients: int):
  """Copies the server tree to every client: leaves [...] -> [C, ...]."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients, *x.shape)), server_tree)
