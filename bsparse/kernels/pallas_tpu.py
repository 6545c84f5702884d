"""Pallas TPU (Mosaic) kernels for ``x @ W``, ``x @ W.T`` and the sampled ``dW``.

Both kernels get the block indices by scalar prefetch (``PrefetchScalarGridSpec``): the
index arrays sit in SMEM before the pipeline starts, so the ``index_map`` of each
``BlockSpec`` can pick which block of ``x``/``W`` to DMA next and skip the zero blocks.

- ``matmul``: grid ``(row tiles of x, steps)``. The steps visit the stored blocks grouped by
  output block (``bsr.output_schedule``); consecutive steps of one group accumulate into an
  f32 VMEM scratch, and the last step of the group writes the ``(tm, block)`` output tile.
- ``sddmm``: grid ``(stored blocks, row tiles)``; block ``k`` of ``dW`` is
  ``a[:, rows[k]]^T @ b[:, cols[k]]`` summed over the row tiles.

Mosaic tiles the last two dims of a block by ``(8, 128)``: the kernels need block sides
that are multiples of 128 (``supports``); the dispatcher uses the XLA path otherwise.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from bsparse.kernels import bsr as bsr_lib

LANES = 128


def supports(w: bsr_lib.BSR, dtype, interpret: bool = False) -> bool:
  """Whether the Mosaic kernels can run this product (block sides multiples of 128;
  any block shape in interpret mode)."""
  del dtype
  return interpret or all(b % LANES == 0 for b in w.block_shape)


def row_tile(m: int, dtype) -> int:
  """Rows of ``x`` per grid step: up to 256, a multiple of the sublane packing."""
  pack = 8 * (4 // jnp.dtype(dtype).itemsize)
  return min(256, -(-m // pack) * pack)


def matmul(x: jax.Array, w: bsr_lib.BSR, transpose: bool = False,
           interpret: bool = False) -> jax.Array:
  """``x @ W`` (or ``x @ W.T``) for ``x: (M, K)``; returns ``(M, N)`` in ``x.dtype``."""
  bm, bn = w.block_shape
  bx, bo = (bn, bm) if transpose else (bm, bn)
  n_out = w.shape[0] if transpose else w.shape[1]
  group, entry, real = bsr_lib.output_schedule(w, transpose)
  x_block = (w.cols if transpose else w.rows)[entry]
  tm = row_tile(x.shape[0], x.dtype)
  xp = _pad_rows(x, tm)
  grid = (xp.shape[0] // tm, group.shape[0])
  spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4,
      grid=grid,
      in_specs=[
          pl.BlockSpec((tm, bx), lambda i, s, g, e, r, xb: (i, xb[s])),
          pl.BlockSpec((pl.squeezed, bm, bn), lambda i, s, g, e, r, xb: (e[s], 0, 0)),
      ],
      out_specs=pl.BlockSpec((tm, bo), lambda i, s, g, e, r, xb: (i, g[s])),
      scratch_shapes=[pltpu.VMEM((tm, bo), jnp.float32)],
  )
  y = pl.pallas_call(
      functools.partial(_matmul_kernel, transpose=transpose),
      grid_spec=spec,
      out_shape=jax.ShapeDtypeStruct((xp.shape[0], n_out), x.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
  )(group, entry, real, x_block, xp, w.blocks.astype(x.dtype))
  return y[:x.shape[0]]


def _matmul_kernel(group_ref, entry_ref, real_ref, xb_ref, x_ref, w_ref, o_ref, acc_ref,
                   *, transpose):
  del entry_ref, xb_ref
  s, last_step = pl.program_id(1), pl.num_programs(1) - 1
  g = group_ref[s]
  first = jnp.logical_or(s == 0, group_ref[jnp.maximum(s - 1, 0)] != g)
  last = jnp.logical_or(s == last_step, group_ref[jnp.minimum(s + 1, last_step)] != g)

  @pl.when(first)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(real_ref[s] == 1)
  def _():
    contract = 1 if transpose else 0
    acc_ref[...] += jax.lax.dot_general(
        x_ref[...], w_ref[...], (((1,), (contract,)), ((), ())),
        preferred_element_type=jnp.float32)

  @pl.when(last)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def sddmm(a: jax.Array, b: jax.Array, w: bsr_lib.BSR, interpret: bool = False) -> jax.Array:
  """Stored blocks of ``a.T @ b``: ``(nnz_max, bm, bn)`` f32, zero for padding.

  Args:
    a: ``(M, m)``, read in ``bm``-wide column blocks ``rows[k]``.
    b: ``(M, n)``, read in ``bn``-wide column blocks ``cols[k]``.
  """
  bm, bn = w.block_shape
  tm = row_tile(a.shape[0], a.dtype)
  ap, bp = _pad_rows(a, tm), _pad_rows(b, tm)
  valid = w.valid().astype(jnp.int32)
  spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(w.nnz_max, ap.shape[0] // tm),
      in_specs=[
          pl.BlockSpec((tm, bm), lambda k, i, r, c, v: (i, r[k])),
          pl.BlockSpec((tm, bn), lambda k, i, r, c, v: (i, c[k])),
      ],
      out_specs=pl.BlockSpec((pl.squeezed, bm, bn), lambda k, i, r, c, v: (k, 0, 0)),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
  )
  return pl.pallas_call(
      _sddmm_kernel,
      grid_spec=spec,
      out_shape=jax.ShapeDtypeStruct((w.nnz_max, bm, bn), jnp.float32),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
  )(w.rows, w.cols, valid, ap, bp)


def _sddmm_kernel(rows_ref, cols_ref, valid_ref, a_ref, b_ref, o_ref, acc_ref):
  del rows_ref, cols_ref
  k, i = pl.program_id(0), pl.program_id(1)

  @pl.when(i == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(valid_ref[k] == 1)
  def _():
    acc_ref[...] += jax.lax.dot_general(
        a_ref[...], b_ref[...], (((0,), (0,)), ((), ())),
        preferred_element_type=jnp.float32)

  @pl.when(i == pl.num_programs(1) - 1)
  def _():
    o_ref[...] = acc_ref[...]


def _pad_rows(x, tm):
  pad = -x.shape[0] % tm
  return jnp.pad(x, ((0, pad), (0, 0))) if pad else x
