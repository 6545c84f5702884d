"""Wall-clock timing shared by the benchmarks."""
from __future__ import annotations

import time

import jax


def timed(f, args, calls: int = 1) -> float:
  """Mean seconds per call over ``calls`` back-to-back calls of ``f(*args)``."""
  t = time.perf_counter()
  for _ in range(calls):
    out = f(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / calls
