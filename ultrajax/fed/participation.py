"""Which clients take part in a round, drawn from (seed, round) alone.

  clients_per_round  0: every client; an integer >= 1: that many; a fraction in (0, 1): that
                     share of the C clients (rounded, at least 1); with 'poisson' the
                     probability q with which each client joins.
  sampling           'uniform': without replacement, equal chances; 'volume': without
                     replacement, chances proportional to n_k; 'poisson': each client joins
                     independently with probability q (DP-FedAvg's sampling; a round may be
                     empty, and its size varies).
  dropout            each sampled client independently fails to report with this probability:
                     it contributes nothing to the round (the strategy renormalises the mean
                     over the clients that finished) and is reported as dropped.

The draw depends only on (seed, round), so the sampler's position is the round index: a
resumed run draws the same clients with nothing extra saved. Dropouts come from a stream of
their own, so changing `dropout` does not change who is sampled.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

SAMPLINGS = ("uniform", "volume", "poisson")
_SALT = 0x5A3B  # keeps these streams apart from other numpy draws seeded by `seed`


class Draw(NamedTuple):
  """One round's clients, [C] bool each: sampled, and those of them that dropped out."""

  sampled: np.ndarray
  dropped: np.ndarray

  @property
  def participants(self) -> np.ndarray:
    """The clients that train and report this round."""
    return self.sampled & ~self.dropped


def check(clients_per_round, sampling: str, dropout: float, num_clients: int | None = None):
  """Raises ValueError starting with the offending field's name."""
  if sampling not in SAMPLINGS:
    raise ValueError(f"sampling={sampling!r} is not one of {SAMPLINGS}")
  if not 0 <= dropout < 1:
    raise ValueError(f"dropout={dropout} is outside [0, 1)")
  k = clients_per_round
  if isinstance(k, bool) or not isinstance(k, (int, float)) or k < 0:
    raise ValueError(
      f"clients_per_round={k!r} must be 0 (all), a count >= 1 or a fraction in (0, 1)"
    )
  if sampling == "poisson" and not 0 < k <= 1:
    raise ValueError(
      f"clients_per_round={k!r}: sampling='poisson' needs the join probability q in (0, 1]"
    )
  if k >= 1 and k != int(k):
    raise ValueError(f"clients_per_round={k!r} is neither a whole count nor a fraction below 1")
  if num_clients is not None and k > num_clients:
    raise ValueError(f"clients_per_round={k!r} is more than the {num_clients} clients")


def count(clients_per_round, num_clients: int) -> int:
  """Clients sampled per round without replacement (the largest a round can hold)."""
  k = clients_per_round
  if k == 0:
    return num_clients
  if k < 1:
    return max(1, int(round(k * num_clients)))
  return int(k)


def draw(
  num_examples,
  round_index: int,
  seed: int,
  clients_per_round=0,
  sampling: str = "uniform",
  dropout: float = 0.0,
) -> Draw:
  """The clients of round `round_index` (0-based).  num_examples: [C] (for 'volume')."""
  n = np.asarray(num_examples, np.float64)
  num_clients = len(n)
  check(clients_per_round, sampling, dropout, num_clients)
  rng = np.random.default_rng([seed, round_index, _SALT])
  if sampling == "poisson":
    sampled = rng.random(num_clients) < clients_per_round
  elif clients_per_round == 0:
    sampled = np.ones(num_clients, bool)
  else:
    p = n / n.sum() if sampling == "volume" else None
    chosen = rng.choice(num_clients, count(clients_per_round, num_clients), replace=False, p=p)
    sampled = np.isin(np.arange(num_clients), chosen)
  dropped = np.zeros(num_clients, bool)
  if dropout > 0:
    fails = np.random.default_rng([seed, round_index, _SALT, 1]).random(num_clients) < dropout
    dropped = sampled & fails
  return Draw(sampled, dropped)
