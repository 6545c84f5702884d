"""Pallas GPU (Triton backend) kernels for ``x @ W``, ``x @ W.T`` and the sampled ``dW``.

- ``matmul``: grid ``(row tiles of x, output blocks)``. Each program owns one
  ``(tm, block)`` output tile, loops over the stored blocks of its output block
  (``bsr.group_offsets``: a CSR over output blocks), loads the matching ``(tm, block)``
  tile of ``x`` and the weight block and accumulates in f32 registers. Output blocks with
  no stored block are written as zeros; no atomics are needed.
- ``sddmm``: grid ``(stored blocks,)``; program ``k`` sums ``a[:, rows[k]]^T @ b[:, cols[k]]``
  over row tiles of ``M``.

Triton needs power-of-two tile sides of at least 16 (``supports``); the dispatcher uses
the XLA path otherwise. Rows of ``x`` are zero-padded to a multiple of the row tile.
Triton custom calls carry no serialisation-compatibility guarantee, so ``jax.export``
of a function using these kernels needs ``disabled_checks=[jax.export.DisabledSafetyCheck
.custom_call("__gpu$xla.gpu.triton")]``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bsparse.kernels import bsr as bsr_lib

MIN_SIDE = 16


def supports(w: bsr_lib.BSR, dtype, interpret: bool = False) -> bool:
  """Whether the Triton kernels can run this product (power-of-two sides >= 16; any
  block shape in interpret mode)."""
  del dtype
  return interpret or all(b >= MIN_SIDE and b & (b - 1) == 0 for b in w.block_shape)


def row_tile(m: int) -> int:
  """Rows of ``x`` per program: a power of two in ``[16, 64]``."""
  return max(MIN_SIDE, min(64, pl.next_power_of_2(m)))


def _params():
  return plgpu.CompilerParams(num_warps=4, num_stages=2)


def matmul(x: jax.Array, w: bsr_lib.BSR, transpose: bool = False,
           interpret: bool = False) -> jax.Array:
  """``x @ W`` (or ``x @ W.T``) for ``x: (M, K)``; returns ``(M, N)`` in ``x.dtype``."""
  bm, bn = w.block_shape
  bx, bo = (bn, bm) if transpose else (bm, bn)
  n_out = w.shape[0] if transpose else w.shape[1]
  entry, offsets = bsr_lib.group_offsets(w, transpose)
  x_block = (w.cols if transpose else w.rows)[entry]
  tm = row_tile(x.shape[0])
  xp = _pad_rows(x, tm)
  y = pl.pallas_call(
      functools.partial(_matmul_kernel, tm=tm, bx=bx, transpose=transpose),
      grid=(xp.shape[0] // tm, n_out // bo),
      in_specs=[pl.no_block_spec] * 5,
      out_specs=pl.BlockSpec((tm, bo), lambda i, g: (i, g)),
      out_shape=jax.ShapeDtypeStruct((xp.shape[0], n_out), x.dtype),
      compiler_params=_params(),
      interpret=interpret,
  )(offsets, entry, x_block, xp, w.blocks.astype(x.dtype))
  return y[:x.shape[0]]


def _matmul_kernel(offsets_ref, entry_ref, xb_ref, x_ref, w_ref, o_ref, *, tm, bx, transpose):
  i, g = pl.program_id(0), pl.program_id(1)
  contract = 1 if transpose else 0

  def body(p, acc):
    k = entry_ref[p]
    xt = x_ref[pl.ds(i * tm, tm), pl.ds(xb_ref[p] * bx, bx)]
    return acc + jax.lax.dot_general(xt, w_ref[k], (((1,), (contract,)), ((), ())),
                                     preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(offsets_ref[g], offsets_ref[g + 1], body,
                          jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def sddmm(a: jax.Array, b: jax.Array, w: bsr_lib.BSR, interpret: bool = False) -> jax.Array:
  """Stored blocks of ``a.T @ b``: ``(nnz_max, bm, bn)`` f32, zero for padding.

  Args:
    a: ``(M, m)``, read in ``bm``-wide column blocks ``rows[k]``.
    b: ``(M, n)``, read in ``bn``-wide column blocks ``cols[k]``.
  """
  bm, bn = w.block_shape
  tm = row_tile(a.shape[0])
  ap, bp = _pad_rows(a, tm), _pad_rows(b, tm)
  return pl.pallas_call(
      functools.partial(_sddmm_kernel, tm=tm, steps=ap.shape[0] // tm),
      grid=(w.nnz_max,),
      in_specs=[pl.no_block_spec] * 5,
      out_specs=pl.BlockSpec((pl.squeezed, bm, bn), lambda k: (k, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((w.nnz_max, bm, bn), jnp.float32),
      compiler_params=_params(),
      interpret=interpret,
  )(w.rows, w.cols, w.nnz.reshape(1), ap, bp)


def _sddmm_kernel(rows_ref, cols_ref, nnz_ref, a_ref, b_ref, o_ref, *, tm, steps):
  k = pl.program_id(0)
  bm, bn = o_ref.shape
  r, c = rows_ref[k], cols_ref[k]

  def body(i, acc):
    at = a_ref[pl.ds(i * tm, tm), pl.ds(r * bm, bm)]
    bt = b_ref[pl.ds(i * tm, tm), pl.ds(c * bn, bn)]
    return acc + jax.lax.dot_general(at, bt, (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)

  n = jnp.where(k < nnz_ref[0], steps, 0)
  o_ref[...] = jax.lax.fori_loop(0, n, body, jnp.zeros((bm, bn), jnp.float32))


def _pad_rows(x, tm):
  pad = -x.shape[0] % tm
  return jnp.pad(x, ((0, pad), (0, 0))) if pad else x
