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


def time_steps(runs: dict, rounds: int, steps: int) -> tuple[dict, dict]:
  """Times ``{key: (step, state, batch)}`` in interleaved rounds; ``step(state, batch)``
  returns ``(state, metrics)`` and each call takes the state the previous one returned.

  Returns ``({key: [ms per step, one per round]}, {key: final state})``; the first call
  of each step (its compilation) is not timed.
  """
  states = {key: jax.block_until_ready(step(state, batch)[0])
            for key, (step, state, batch) in runs.items()}
  times = {key: [] for key in runs}
  for _ in range(rounds):
    for key, (step, _, batch) in runs.items():
      t = time.perf_counter()
      for _ in range(steps):
        states[key], _ = step(states[key], batch)
      jax.block_until_ready(states[key])
      times[key].append(1e3 * (time.perf_counter() - t) / steps)
  return times, states
