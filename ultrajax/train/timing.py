"""Time spent compiling, so that throughput (img/s) can leave it out.

The first round or step of a run traces, lowers and compiles its programs; counting those
seconds makes its img/s meaningless (3.5 img/s against 106 in round 2 of the smoke run).
JAX reports each trace, lowering and XLA compile as a time span through `jax.monitoring`;
`CompileClock` keeps those spans and measures how much of a wall-clock window they cover
(their union: traces of nested functions overlap their callers').
"""

from __future__ import annotations

import threading
import time

import jax

COMPILE_EVENTS = (
  "/jax/core/compile/jaxpr_trace_duration",
  "/jax/core/compile/jaxpr_to_mlir_module_duration",
  "/jax/core/compile/backend_compile_duration",
)


class CompileClock:
  """Listens to JAX's compile events from construction on.

  Usage: t0 = time.time(); ...; compiling = clock.seconds_between(t0, time.time()).
  Times are time.time() (as JAX's events). `close()` stops listening.
  """

  def __init__(self):
    self._spans: list[tuple[float, float]] = []
    self._lock = threading.Lock()
    jax.monitoring.register_event_time_span_listener(self._listen)

  def _listen(self, event: str, start: float, end: float, **kwargs) -> None:
    if event in COMPILE_EVENTS:
      with self._lock:
        self._spans.append((start, end))

  def seconds_between(self, t0: float, t1: float) -> float:
    """Seconds of [t0, t1] covered by compile spans (overlaps counted once); drops spans that
    end before t0, so a long run keeps only what it still needs."""
    with self._lock:
      self._spans = [s for s in self._spans if s[1] > t0]
      spans = sorted((max(a, t0), min(b, t1)) for a, b in self._spans if a < t1)
    covered, reach = 0.0, t0
    for a, b in spans:
      if b > reach:
        covered += b - max(a, reach)
        reach = b
    return covered

  def close(self) -> None:
    jax.monitoring.unregister_event_time_span_listener(self._listen)


def now() -> float:
  """The clock `CompileClock` measures in."""
  return time.time()
