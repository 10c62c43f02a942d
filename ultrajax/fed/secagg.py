"""Secure aggregation (Bonawitz et al. 2017, pairwise masking), simulated faithfully in one process.

What each client uploads is exactly what a real client would send: its weighted update,
quantised onto the ring Z_R (R = 2^bits), plus pairwise masks that cancel only in the sum.
The server learns the sum of the survivors' weighted updates and their total weight, nothing
per client.

Protocol per round (client ids u < v, `round_salt` fresh every round):
  1. Key agreement (simulated): client u holds a secret s_u; the pair seed s_uv is a hash of
     the sorted pair (u, s_u, v, s_v) and the round salt, so u and v derive the same seed and
     nobody else does. A real deployment runs Diffie-Hellman: u sends g^{a_u}, and
     s_uv = KDF(g^{a_u a_v}) is computed by each side from its own secret key alone.
  2. Encode: x = [w_u, w_u * flat(update_u)] clipped to [-clip_range, clip_range] and mapped to
     round(x * scale) mod R, scale = floor((R/2 - 1) / (max_clients * clip_range)), so the sum
     of up to max_clients encodings never wraps (error <= 0.5 / scale per client and value).
  3. Mask: y_u = enc_u + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)  (mod R).
  4. Unmask: sum over the survivors. A client that dropped after masking leaves dangling masks
     PRG(s_ud) in every survivor's y_u; each survivor reveals the seeds it shared with the
     dropped clients (`reveal_seeds`; Bonawitz et al. reconstruct the dropped client's DH key
     from t-of-n Shamir shares instead) and the server removes them. Decode: signed, / scale.
Not simulated: the self-mask b_u that protects a late (not dropped) client whose seeds were
revealed, Shamir thresholds, authenticated channels, and SecAgg+'s sparse neighbour graph.

With DP: each client adds its share of the noise BEFORE masking (distributed DP), since the
server never sees an unmasked individual update to noise. Each of m clients adds N(0, s^2 / m)
so the sum carries N(0, s^2); if clients drop or collude, the sum carries less noise than the
accountant assumed, so real deployments over-provision noise or use discrete (Skellam,
discrete Gaussian) noise that survives quantisation exactly. Robust aggregation (median, Krum,
norm screens in fed/robust.py) needs each client's plaintext and cannot run on a masked sum:
pick one, or bound norms on the client with a zero-knowledge proof (out of scope).
"""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from ultrajax import configlib


@dataclasses.dataclass(frozen=True)
class SecAggConfig:
  """bits: ring Z_{2^bits} (<= 32 here, so sums fit uint64); clip_range: |value| bound after
  weighting; max_clients: the most uploads summed (sets the headroom)."""

  bits: int = 32
  clip_range: float = 8.0
  max_clients: int = 16

  def __post_init__(self):
    if not 8 <= self.bits <= 32:
      raise configlib.ConfigError(f"secagg bits={self.bits!r} is not in [8, 32]")
    if not self.clip_range > 0:
      raise configlib.ConfigError(f"secagg clip_range={self.clip_range!r} must be > 0")
    if not self.max_clients >= 1 or self.scale < 1:
      raise configlib.ConfigError(
        f"secagg max_clients={self.max_clients!r} leaves no resolution in {self.bits} bits "
        f"with clip_range={self.clip_range!r}"
      )

  @property
  def modulus(self) -> int:
    return 1 << self.bits

  @property
  def scale(self) -> int:
    return int((self.modulus // 2 - 1) // (self.max_clients * self.clip_range))


def encode(x, cfg: SecAggConfig) -> np.ndarray:
  """x: float [D] -> uint64 [D] in [0, R): round(clip(x) * scale) mod R (two's complement)."""
  x = np.clip(np.asarray(x, np.float64), -cfg.clip_range, cfg.clip_range)
  return np.mod(np.rint(x * cfg.scale).astype(np.int64), cfg.modulus).astype(np.uint64)


def decode(v, cfg: SecAggConfig) -> np.ndarray:
  """uint64 [D] in [0, R) -> float64 [D]: values >= R/2 are negative."""
  v = np.asarray(v, np.int64)
  return np.where(v >= cfg.modulus // 2, v - cfg.modulus, v).astype(np.float64) / cfg.scale


def client_secrets(num_clients: int, seed: int) -> list[int]:
  """Each client's long-term secret (stands in for its DH private key)."""
  rng = np.random.default_rng([int(seed), 0x5EC])
  return [int(s) for s in rng.integers(0, 2**63, num_clients, dtype=np.int64)]


def pair_seed(u: int, v: int, secrets, round_salt: int) -> int:
  """Symmetric seed of the pair (u, v): the same for (v, u), new every round."""
  a, b = sorted((int(u), int(v)))
  msg = f"{a}:{secrets[a]}|{b}:{secrets[b]}|{int(round_salt)}".encode()
  return int.from_bytes(hashlib.sha256(msg).digest()[:8], "little")


def _prg(seed: int, size: int, cfg: SecAggConfig) -> np.ndarray:
  return np.random.Generator(np.random.PCG64(seed)).integers(0, cfg.modulus, size, dtype=np.uint64)


def _mask_of(u: int, v: int, seed: int, size: int, cfg: SecAggConfig) -> np.ndarray:
  """The term u adds for partner v: +PRG(s_uv) if v > u, else -PRG(s_uv), mod R."""
  m = _prg(seed, size, cfg)
  return m if v > u else np.mod(cfg.modulus - m, cfg.modulus).astype(np.uint64)


def mask(encoded, u: int, participants, secrets, round_salt: int, cfg: SecAggConfig):
  """Client u's upload: encoded [D] plus its pairwise masks with every other participant."""
  y = np.asarray(encoded, np.uint64).copy()
  for v in participants:
    if v != u:
      y = np.mod(y + _mask_of(u, v, pair_seed(u, v, secrets, round_salt), y.size, cfg), cfg.modulus)
  return y


def reveal_seeds(u: int, dropped, secrets, round_salt: int) -> dict[int, int]:
  """What survivor u tells the server in the recovery phase: s_ud for each dropped d."""
  return {d: pair_seed(u, d, secrets, round_salt) for d in dropped}


def unmask_sum(
  uploads: dict[int, np.ndarray], revealed: dict[int, dict[int, int]], cfg: SecAggConfig
) -> np.ndarray:
  """Server: sum of the survivors' uploads mod R, minus the masks they share with dropped
  clients (from `revealed[u][d]`). uploads: {client: uint64 [D]}. Returns uint64 [D]."""
  ids = sorted(uploads)
  total = np.zeros_like(uploads[ids[0]])
  for u in ids:
    total = np.mod(total + uploads[u], cfg.modulus)
  for u in ids:
    for d, seed in revealed.get(u, {}).items():
      total = np.mod(total + cfg.modulus - _mask_of(u, d, seed, total.size, cfg), cfg.modulus)
  return total


def secure_weighted_sum(
  client_tree, weights, cfg: SecAggConfig, *, seed: int, round_num: int, dropped_after_masking=()
):
  """One SecAgg round over stacked updates: leaves [C, ...], weights [C].

  Every client masks [w_k, w_k * update_k]; the clients in `dropped_after_masking` never
  upload, and the survivors reveal their seeds with them. Returns (sum_k w_k update_k over the
  survivors as a pytree like one client's, sum_k w_k over the survivors), both dequantised.
  """
  weights = np.asarray(weights, np.float64)
  num = weights.shape[0]
  if num > cfg.max_clients:
    raise configlib.ConfigError(f"secagg: {num} clients exceed max_clients={cfg.max_clients}")
  dropped = sorted({int(d) for d in dropped_after_masking})
  if any(not 0 <= d < num for d in dropped) or len(dropped) == num:
    raise configlib.ConfigError(
      f"secagg: dropped clients {dropped} must be ids in [0, {num}) and leave a survivor"
    )
  one = jax.tree.map(lambda x: x[0], client_tree)
  _, unravel = ravel_pytree(one)
  secrets = client_secrets(num, seed)
  salt = int(np.random.default_rng([int(seed), int(round_num), 0x5A17]).integers(2**62))
  participants = list(range(num))
  uploads = {}
  for k in participants:
    flat, _ = ravel_pytree(jax.tree.map(lambda x, k=k: x[k], client_tree))
    vec = np.concatenate([[weights[k]], weights[k] * np.asarray(flat, np.float64)])
    y = mask(encode(vec, cfg), k, participants, secrets, salt, cfg)
    if k not in dropped:
      uploads[k] = y
  revealed = {u: reveal_seeds(u, dropped, secrets, salt) for u in uploads}
  total = decode(unmask_sum(uploads, revealed, cfg), cfg)
  return unravel(total[1:].astype(np.float32)), float(total[0])
