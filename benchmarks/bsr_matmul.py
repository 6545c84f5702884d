r"""Block-sparse matmul (``bsr_matmul``) against dense ``jnp.dot`` and ``jax.experimental.sparse``.

  python -m benchmarks.bsr_matmul --quick           # a small subset, a few minutes on CPU
  python -m benchmarks.bsr_matmul --out=table.md    # the full grid

For every ``(M, K=N, dtype, pass)`` group the dense product, the BSR product for each
(block size, density) and, for the f32 forward, the BCSR product are compiled first and
then timed side by side in interleaved rounds; each time is the minimum over rounds of
the mean over back-to-back calls (as many as take about ``--min_round_ms``).
Masks are random with exactly ``round(density * blocks)`` nonzero blocks. ``pass`` is
``fwd`` (``x @ W``) or ``fwd+bwd`` (value and gradients w.r.t. ``x`` and the weight).
``--impl`` picks the ``bsr_matmul`` implementation (default: by backend, ``cpu`` on a
CPU); unless that is ``xla``, the XLA-ops path is timed in the same rounds too (``XLA-ops
ms``). ``ideal`` is ``1 / density``; ``% ideal`` is the BSR speedup over dense as a
fraction of it.
Rounds during which other processes used more than ``--max_other_load`` of the CPUs are
repeated (up to ``--max_tries``) so a shared machine does not skew the ratios; ``load`` is
the largest share of the CPUs other processes used in the rounds a row is based on
(0 = the machine was otherwise idle). Contention slows the two-threaded dense product
more than the BSR product, so rows with a high load overstate the speedup.
"""
from __future__ import annotations

import os
import time

from absl import app, flags
import jax
import jax.numpy as jnp
from jax.experimental import sparse
import numpy as np

from benchmarks.timing import timed
from bsparse.kernels import bsr, ops

_QUICK = flags.DEFINE_bool("quick", False, "Run a small subset of the grid.")
_M = flags.DEFINE_list("m", None, "Rows of x (default: 512,4096).")
_KN = flags.DEFINE_list("kn", None, "K = N (default: 1024,4096).")
_BLOCKS = flags.DEFINE_list("blocks", None, "Square block sizes (default: 16,32,64,128).")
_DENSITIES = flags.DEFINE_list("densities", None, "Block densities (default: .05,.1,.25,.5).")
_DTYPES = flags.DEFINE_list("dtypes", None, "dtypes (default: float32,bfloat16).")
_PASSES = flags.DEFINE_list("passes", None, "fwd and/or fwd+bwd (default: both).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds per group (minimum is reported).")
_MIN_ROUND_MS = flags.DEFINE_float("min_round_ms", 20.0,
                                   "Repeat each product in a round to last about this long.")
_IMPL = flags.DEFINE_string("impl", None, "bsr_matmul implementation (default: auto).")
_BCSR_MAX = flags.DEFINE_float("bcsr_max_macs", 1e9,
                               "Skip BCSR where nnz elements * M exceeds this.")
_MAX_OTHER = flags.DEFINE_float("max_other_load", 0.15,
                                "Repeat rounds where other processes used more CPU.")
_MAX_TRIES = flags.DEFINE_integer("max_tries", 30, "Round attempts per group.")
_GROUP_SECONDS = flags.DEFINE_float("group_seconds", 120.0,
                                    "Stop repeating loaded rounds of a group after this.")
_OUT = flags.DEFINE_string("out", None, "Also write the markdown tables to this file.")

FULL = dict(m=(512, 4096), kn=(1024, 4096), blocks=(16, 32, 64, 128),
            densities=(0.05, 0.10, 0.25, 0.50), dtypes=("float32", "bfloat16"),
            passes=("fwd", "fwd+bwd"))
QUICK = dict(m=(512,), kn=(1024,), blocks=(32, 128), densities=(0.10, 0.25),
             dtypes=("float32",), passes=("fwd", "fwd+bwd"))


def random_bsr(rng, k, n, block, density, dtype):
  m1, n1 = k // block, n // block
  count = max(1, round(density * m1 * n1))
  mask = np.zeros(m1 * n1, bool)
  mask[rng.permutation(m1 * n1)[:count]] = True
  w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k * density), dtype)
  return bsr.from_dense(w, (block, block), mask=jnp.asarray(mask.reshape(m1, n1)))


def dense_fn(pass_):
  if pass_ == "fwd":
    return jax.jit(jnp.dot)
  loss = lambda x, w, ct: jnp.vdot(jnp.dot(x, w), ct)  # noqa: E731
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def bsr_fn(pass_, impl):
  if pass_ == "fwd":
    return jax.jit(lambda x, w: ops.bsr_matmul(x, w, impl=impl))
  def loss(x, blocks, w, ct):
    return jnp.vdot(ops.bsr_matmul(x, w.replace(blocks=blocks), impl=impl), ct)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def bcsr_fn():
  return jax.jit(lambda x, wt: (wt @ x.T).T)


class LoadMeter:
  """CPU share used by other processes (0..1 of all cores) over an interval."""

  def __init__(self):
    self.tick = os.sysconf("SC_CLK_TCK")
    self.cores = os.cpu_count() or 1

  def _read(self):
    v = [int(t) for t in open("/proc/stat").readline().split()[1:]]
    own = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
    return sum(v) - v[3] - v[4], int(own[11]) + int(own[12]), time.time()

  def start(self):
    self.t0 = self._read()

  def other(self) -> float:
    (b0, s0, w0), (b1, s1, w1) = self.t0, self._read()
    return max(0.0, ((b1 - b0) - (s1 - s0)) / self.tick / max(w1 - w0, 1e-3) / self.cores)


def calls_for(f, args) -> int:
  """Back-to-back calls that take about ``--min_round_ms`` (sub-ms products are noisy)."""
  return max(1, min(100, round(_MIN_ROUND_MS.value / 1e3 / max(timed(f, args), 1e-6))))


def run_group(cases, meter):
  """Times ``{name: (f, args)}`` side by side in interleaved rounds.

  Rounds in which other processes used more than ``--max_other_load`` of the CPUs are
  repeated (after a pause) up to ``--max_tries`` times or ``--group_seconds``; if too few
  clean rounds come, the least loaded ones are used.

  Returns:
    ``({name: min seconds}, other processes' CPU share in the rounds used)``.
  """
  for f, args in cases.values():
    jax.block_until_ready(f(*args))
  calls = {k: calls_for(f, args) for k, (f, args) in cases.items()}
  rounds, start = [], time.time()
  for _ in range(_MAX_TRIES.value):
    if len(rounds) >= _ROUNDS.value and time.time() - start > _GROUP_SECONDS.value:
      break
    meter.start()
    times = {k: timed(f, args, calls[k]) for k, (f, args) in cases.items()}
    rounds.append((meter.other(), times))
    if sum(load <= _MAX_OTHER.value for load, _ in rounds) >= _ROUNDS.value:
      break
    if rounds[-1][0] > _MAX_OTHER.value:
      time.sleep(1.0)
  used = sorted(rounds, key=lambda r: r[0])[:_ROUNDS.value]
  best = {k: min(times[k] for _, times in used) for k in cases}
  return best, max(load for load, _ in used)


def group_cases(rng, m, kn, dtype, pass_, grid):
  x = jnp.asarray(rng.standard_normal((m, kn)), dtype)
  ct = jnp.asarray(rng.standard_normal((m, kn)), dtype)
  dense_w = jnp.asarray(rng.standard_normal((kn, kn)), dtype)
  cases = {"dense": (dense_fn(pass_), (x, dense_w) if pass_ == "fwd" else (x, dense_w, ct))}
  meta = {}
  for block in grid["blocks"]:
    for density in grid["densities"]:
      w = random_bsr(rng, kn, kn, block, density, dtype)
      args = (x, w) if pass_ == "fwd" else (x, w.blocks, w, ct)
      cases[("bsr", block, density)] = (bsr_fn(pass_, _IMPL.value), args)
      if ops.resolve_impl(_IMPL.value, w, dtype) != "xla":
        cases[("xla", block, density)] = (bsr_fn(pass_, "xla"), args)
      d = int(w.nnz) / (w.grid[0] * w.grid[1])
      meta[(block, density)] = d
      nse = int(w.nnz) * block * block
      if pass_ == "fwd" and dtype == "float32" and nse * m <= _BCSR_MAX.value:
        wt = sparse.BCSR.fromdense(w.to_dense().T)
        cases[("bcsr", block, density)] = (bcsr_fn(), (x, wt))
  return cases, meta


def break_even(points):
  """Density where the speedup falls to 1, by linear interpolation; a bound if none."""
  points = sorted(points)
  for (d0, s0), (d1, s1) in zip(points, points[1:]):
    if s0 >= 1.0 > s1:
      return f"{100 * (d0 + (s0 - 1.0) * (d1 - d0) / (s0 - s1)):.0f}%"
  if points[-1][1] >= 1.0:
    return f"> {100 * points[-1][0]:.0f}%"
  return f"< {100 * points[0][0]:.0f}%"


def make_grid():
  grid = dict(QUICK if _QUICK.value else FULL)
  for key, flag, kind in (("m", _M, int), ("kn", _KN, int), ("blocks", _BLOCKS, int),
                          ("densities", _DENSITIES, float), ("dtypes", _DTYPES, str),
                          ("passes", _PASSES, str)):
    if flag.value:
      grid[key] = tuple(kind(v) for v in flag.value)
  return grid


def main(argv):
  del argv
  grid = make_grid()
  rng = np.random.default_rng(0)
  meter = LoadMeter()
  probe = bsr.from_dense(jnp.ones((32, 32)), (32, 32))
  header = ("| M | K=N | dtype | pass | block | density | dense ms | BSR ms | XLA-ops ms "
            "| BCSR ms | speedup | ideal | % ideal | load |")
  rows, even, loads = [header, "|" + "---|" * 14], {}, []
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{os.cpu_count()} CPUs, impl {ops.resolve_impl(_IMPL.value, probe, jnp.float32)}")
  print(header)
  for m in grid["m"]:
    for kn in grid["kn"]:
      for dtype in grid["dtypes"]:
        for pass_ in grid["passes"]:
          cases, meta = group_cases(rng, m, kn, dtype, pass_, grid)
          best, load = run_group(cases, meter)
          loads.append(load)
          for (block, density), d in meta.items():
            t_dense, t_bsr = best["dense"], best[("bsr", block, density)]
            t_bcsr = best.get(("bcsr", block, density))
            t_xla = best.get(("xla", block, density))
            speedup = t_dense / t_bsr
            even.setdefault((m, kn, dtype, pass_, block), []).append((d, speedup))
            bcsr_ms = f"{1e3 * t_bcsr:.2f}" if t_bcsr else "skipped"
            xla_ms = f"{1e3 * t_xla:.2f}" if t_xla else "-"
            row = (f"| {m} | {kn} | {dtype} | {pass_} | {block} | {100 * d:.1f}% "
                   f"| {1e3 * t_dense:.2f} | {1e3 * t_bsr:.2f} | {xla_ms} | {bcsr_ms} "
                   f"| {speedup:.2f}x "
                   f"| {1 / d:.1f}x | {100 * speedup * d:.0f}% | {load:.2f} |")
            rows.append(row)
            print(row, flush=True)
  even_rows = ["| M | K=N | dtype | pass | " + " | ".join(f"block {b}" for b in grid["blocks"])
               + " |", "|" + "---|" * (4 + len(grid["blocks"]))]
  for m in grid["m"]:
    for kn in grid["kn"]:
      for dtype in grid["dtypes"]:
        for pass_ in grid["passes"]:
          cells = [break_even(even[(m, kn, dtype, pass_, b)]) for b in grid["blocks"]]
          even_rows.append(f"| {m} | {kn} | {dtype} | {pass_} | " + " | ".join(cells) + " |")
  print("\nBreak-even block density (BSR as fast as dense):")
  print("\n".join(even_rows))
  print(f"\nOther processes' CPU share in the rounds used: max {max(loads):.2f}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write("\n".join(rows) + "\n\nBreak-even block density:\n\n" + "\n".join(even_rows)
              + "\n")


if __name__ == "__main__":
  app.run(main)
