"""Secure aggregation (Bonawitz et al. 2017, pairwise masking): the protocol that
`fed/protected.py`'s `secagg` strategy simulates in JAX, and its ring.

What each client uploads is exactly what a real client would send: its weighted update,
quantised onto the ring Z_R (R = 2^bits), plus pairwise masks that cancel only in the sum.
The server learns the sum of the survivors' weighted updates and their total weight, nothing
per client.

Protocol per round (client ids u < v):
  1. Key agreement (simulated): client u holds a secret s_u; the pair key s_uv hashes both
     secrets in id order and the round, so u and v derive the same key and nobody else does.
     A real deployment runs Diffie-Hellman: u sends g^{a_u}, and s_uv = KDF(g^{a_u a_v}) is
     computed by each side from its own secret key alone.
  2. Encode: x = [w_u, w_u * flat(update_u)] clipped to [-clip_range, clip_range] and mapped to
     round(x * scale) mod R, scale = floor((R/2 - 1) / (max_clients * clip_range)), so the sum
     of up to max_clients encodings never wraps (error <= 0.5 / scale per client and value).
  3. Mask: y_u = enc_u + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)  (mod R).
  4. Unmask: sum over the survivors. A client that dropped after masking leaves dangling masks
     PRG(s_ud) in every survivor's y_u; each survivor reveals the seeds it shared with the
     dropped clients (Bonawitz et al. reconstruct the dropped client's DH key from t-of-n
     Shamir shares instead) and the server removes them. Decode: signed, / scale.
Not simulated: the self-mask b_u that protects a late (not dropped) client whose seeds were
revealed, Shamir thresholds, authenticated channels, and SecAgg+'s sparse neighbour graph.

With DP each client adds its noise share before masking (distributed DP; `dp_secagg`). Robust
aggregation (fed/robust.py) needs each client's plaintext and cannot run on a masked sum.
"""

from __future__ import annotations

import dataclasses

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
