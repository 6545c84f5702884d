"""Per-layer report: block shape, rank, density, parameters and analytic MACs.

Profilers do not see the factored contractions, so costs are counted analytically from
the shapes (``bsparse.kron.contraction_costs`` / ``conv_costs``), per example, forward.
"""
from __future__ import annotations

import math

import flax.linen as nn
import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np

from bsparse import kron
from bsparse.kernels.layers import INDEX_COLLECTION, computes_dense


def io_shapes(model: nn.Module, variables, input_shape) -> dict[tuple[str, ...], tuple]:
  """``{module_path: (input_shape, output_shape)}`` of every module call, traced abstractly."""
  return {path: shapes for path, (*shapes, _) in _calls(model, variables, input_shape).items()}


def _calls(model: nn.Module, variables, input_shape) -> dict[tuple[str, ...], tuple]:
  """``{module_path: (input_shape, output_shape, module)}`` of every module call."""
  seen = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    mod = context.module
    if context.method_name == "__call__" and args and hasattr(args[0], "shape"):
      if hasattr(out, "shape"):
        seen.setdefault(tuple(mod.path), (tuple(args[0].shape), tuple(out.shape), mod))
    return out

  def run(v, x):
    with nn.intercept_methods(record):
      return model.apply(v, x, train=False)

  jax.eval_shape(run, variables, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
  return seen


def positions(shape) -> int:
  """Spatial positions or tokens per example of an activation ``(N, ..., C)``."""
  return int(math.prod(shape[1:-1]))


def kpd_macs(m1: int, m2: int, n1: int, n2: int, rank: int, taps: int, nnz: int,
             in_pos: int, out_pos: int) -> int:
  """Forward MACs per example of one KPD term, in its cheaper contraction order: the
  matmul cost with ``nnz`` nonzero blocks, or the conv cost (full block grid)."""
  if taps == 1 and in_pos == out_pos:
    return out_pos * min(kron.contraction_costs(m1, m2, n1, n2, rank, nnz).values())
  return min(kron.conv_costs(m1, m2, n1, n2, rank, taps, in_pos, out_pos).values())


def _bsr_costs(nnz: int, taps: int, bm: int, bn: int, out_pos: int) -> tuple[int, int]:
  """``(params, forward MACs per example)`` of ``nnz`` stored blocks (+ their indices)."""
  return nnz * taps * bm * bn + 2 * nnz, out_pos * nnz * taps * bm * bn


def _kpd_row(terms: dict, in_pos: int, out_pos: int) -> dict:
  shapes, ranks, nnz, grid, params, macs, bsr_params, bsr_macs = [], [], 0, 0, 0, 0, 0, 0
  for t in terms.values():
    s, a, b = (np.asarray(t[k]) for k in ("S", "A", "B"))
    r, m2, n2 = b.shape
    m1, n1 = s.shape
    taps = int(math.prod(a.shape[1:-2]))
    k = int((s != 0).sum())
    shapes.append(f"{m2}x{n2}")
    ranks.append(r)
    nnz += k
    grid += s.size
    params += kron.kpd_params(m1, m2, n1, n2, r, taps)
    macs += kpd_macs(m1, m2, n1, n2, r, taps, k, in_pos, out_pos)
    p, c = _bsr_costs(k, taps, m2, n2, out_pos)
    bsr_params, bsr_macs = bsr_params + p, bsr_macs + c
  return dict(block="+".join(shapes), rank="+".join(map(str, ranks)),
              density=nnz / max(grid, 1), kpd_params=params, kpd_macs=macs,
              bsr_params=bsr_params, bsr_macs=bsr_macs)


def _bsr_row(blocks, nnz: int, m: int, n: int, out_pos: int, dense_from) -> dict:
  """A block-sparse layer: it has no factored form, so its ``kpd_*`` columns repeat the
  block-sparse costs. A layer that multiplies densely (``computes_dense``) costs the MACs
  of its whole grid."""
  bm, bn = blocks.shape[-2:]
  grid, taps = ((m // bm), (n // bn)), int(math.prod(blocks.shape[1:-2]))
  params, macs = _bsr_costs(nnz, taps, bm, bn, out_pos)
  if computes_dense(blocks.shape[0], grid, dense_from):
    macs = out_pos * taps * m * n
  return dict(block=f"{bm}x{bn} bsr", rank="-", density=nnz / max(grid[0] * grid[1], 1),
              kpd_params=params, kpd_macs=macs, bsr_params=params, bsr_macs=macs)


def layer_table(model: nn.Module, variables, input_shape) -> list[dict]:
  """One row per weight layer (dense, KPD or block-sparse) with costs per example; a
  block-sparse layer costs what its own ``dense_from`` makes it compute."""
  calls = _calls(model, variables, input_shape)
  flat = tu.flatten_dict(variables["params"])
  index = tu.flatten_dict(variables.get(INDEX_COLLECTION, {}))
  layers: dict[tuple, dict] = {}
  for path, leaf in flat.items():
    if path[-1] in ("kernel", "blocks"):
      layers.setdefault(path[:-1], {})[path[-1]] = leaf
    elif path[-1] == "S":
      layers.setdefault(path[:-2], {})[path[-2]] = {k: flat[path[:-1] + (k,)] for k in "SAB"}
  rows = []
  for path, node in layers.items():
    in_shape, out_shape, module = calls.get(path, ((1, 1), (1, 1), None))
    in_pos, out_pos = positions(in_shape), positions(out_shape)
    m, n = in_shape[-1], out_shape[-1]
    if "kernel" in node:
      taps = int(np.prod(node["kernel"].shape[:-2]))
    elif "blocks" in node:
      taps = int(np.prod(node["blocks"].shape[1:-2]))
    else:
      any_a = next(iter(node.values()))["A"]
      taps = int(math.prod(any_a.shape[1:-2]))
    dense_params = taps * m * n
    row = dict(layer="/".join(path), shape=f"{m}x{n}" + (f" x{taps} taps" if taps > 1 else ""),
               dense_params=dense_params, dense_macs=out_pos * dense_params)
    if "kernel" in node:
      row.update(block="dense", rank="-", density=1.0, kpd_params=dense_params,
                 kpd_macs=row["dense_macs"], bsr_params=dense_params, bsr_macs=row["dense_macs"])
    elif "blocks" in node:
      row.update(_bsr_row(node["blocks"], int(index[path + ("nnz",)]), m, n, out_pos,
                          getattr(module, "dense_from", None)))
    else:
      row.update(_kpd_row(node, in_pos, out_pos))
    rows.append(row)
  return rows


def totals(rows: list[dict]) -> dict:
  keys = ("dense_params", "kpd_params", "bsr_params", "dense_macs", "kpd_macs", "bsr_macs")
  return {k: int(sum(r[k] for r in rows)) for k in keys}


def format_table(rows: list[dict]) -> str:
  """Aligned text table with a totals line; MACs are per example, forward."""
  cols = ["layer", "shape", "block", "rank", "density", "dense_params", "kpd_params",
          "bsr_params", "dense_macs", "kpd_macs", "bsr_macs"]

  def fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else (f"{v:,}" if isinstance(v, int) else str(v))

  body = [[fmt(r[c]) for c in cols] for r in rows]
  tot = totals(rows)
  body.append(["total", "", "", "", ""] + [fmt(tot[c]) for c in cols[5:]])
  widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
  line = lambda vals: "  ".join(v.rjust(w) if i > 0 else v.ljust(w)
                                for i, (v, w) in enumerate(zip(vals, widths)))
  return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(b) for b in body])
