"""XLA implementation of the block-sparse products (any backend; the CPU default).

``x @ W``: stored block ``k`` multiplies the ``bm``-wide column block ``rows[k]`` of ``x``
and its product is added into output column block ``cols[k]``. Per chunk of ``C`` stored
entries: gather the ``C`` input blocks, one batched matmul against the ``C`` weight
blocks (f32 accumulation), scatter-add the ``C`` products into the output blocks.

Layout choices, measured on a 2-core CPU:

- the rows of ``x`` are cut into ``slabs`` independent pieces, so XLA's thunk executor
  runs them on different cores (a batched matmul of small blocks runs on one core);
- each slab loops (``fori_loop``) over chunks of stored entries, accumulating into its
  output in place: the gathered inputs and products stay cache-sized, the compiled
  program does not grow with ``nnz_max``, and ``nnz_max`` copies of ``x`` blocks are
  never materialised at once.

``x @ W.T`` swaps the roles of ``rows`` and ``cols`` and transposes each block. ``sddmm``
(the weight gradient) computes ``a[:, rows[k]].T @ b[:, cols[k]]`` per stored entry with
the same slabs and chunks and sums the slabs. Padding entries hold zero blocks and add
nothing; shapes are static, so their compute is not skipped.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from bsparse.kernels import bsr as bsr_lib

# Rows of x per slab at least this many, and at most this many slabs.
MIN_SLAB_ROWS = 256
MAX_SLABS = 4
# Multiply-adds per chunk of stored entries.
CHUNK_MACS = 4 << 20


def supports(w: bsr_lib.BSR, dtype, interpret: bool = False) -> bool:
  """The XLA path takes any block shape and dtype."""
  del w, dtype, interpret
  return True


def _compute_dtype(dtype):
  """f32 for inputs narrower than f32 (CPU dots cannot accumulate bf16 into f32)."""
  return jnp.promote_types(dtype, jnp.float32)


def _slab_rows(rows: int) -> int:
  slabs = max(1, min(MAX_SLABS, rows // MIN_SLAB_ROWS))
  while rows % slabs:
    slabs -= 1
  return rows // slabs


def _chunked(nnz_max: int, entry_macs: int, *arrays):
  """Pads the leading (entry) axis of ``arrays`` to whole chunks and splits it off.

  Returns ``(chunks, per_chunk, arrays)``: each array becomes ``(chunks, per_chunk, ...)``;
  padding repeats entry 0 for index arrays and is zero for blocks.
  """
  per = min(nnz_max, max(1, CHUNK_MACS // entry_macs))
  chunks = math.ceil(nnz_max / per)
  pad = chunks * per - nnz_max
  out = [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(chunks, per, *a.shape[1:])
         for a in arrays]
  return chunks, per, out


def _take_blocks(x, idx):
  """Column blocks ``idx`` of ``x: (rows, blocks, width)``: ``(rows, len(idx), width)``."""
  return x.at[:, idx].get(mode="promise_in_bounds")


def matmul(x: jax.Array, w: bsr_lib.BSR, transpose: bool = False,
           interpret: bool = False) -> jax.Array:
  """``x @ W`` (or ``x @ W.T``) for ``x: (M, K)``; returns ``(M, N)`` in ``x.dtype``."""
  del interpret
  m1, n1 = w.grid
  bm, bn = w.block_shape
  if transpose:
    src, dst, groups, bx, bo, spec = w.cols, w.rows, m1, bn, bm, "Mkb,kab->kMa"
  else:
    src, dst, groups, bx, bo, spec = w.rows, w.cols, n1, bm, bn, "Mka,kab->kMb"
  ct = _compute_dtype(x.dtype)
  tm = _slab_rows(x.shape[0])
  chunks, _, (src, dst, blocks) = _chunked(w.nnz_max, tm * bm * bn, src, dst,
                                           w.blocks.astype(ct))

  def slab(xs):
    xb = xs.reshape(tm, -1, bx)

    def body(i, y):
      p = jnp.einsum(spec, _take_blocks(xb, src[i]), blocks[i])
      return y.at[dst[i]].add(p, mode="promise_in_bounds")

    y = jax.lax.fori_loop(0, chunks, body, jnp.zeros((groups, tm, bo), ct))
    return y.transpose(1, 0, 2).reshape(tm, groups * bo)

  outs = [slab(xs) for xs in jnp.split(x.astype(ct), x.shape[0] // tm)]
  return jnp.concatenate(outs).astype(x.dtype)


def sddmm(a: jax.Array, b: jax.Array, w: bsr_lib.BSR, interpret: bool = False) -> jax.Array:
  """Stored blocks of ``a.T @ b``: ``(nnz_max, bm, bn)`` f32.

  Args:
    a: ``(M, m)``, read in ``bm``-wide column blocks ``rows[k]``.
    b: ``(M, n)``, read in ``bn``-wide column blocks ``cols[k]``.
  """
  del interpret
  bm, bn = w.block_shape
  tm = _slab_rows(a.shape[0])
  chunks, per, (rows, cols) = _chunked(w.nnz_max, tm * bm * bn, w.rows, w.cols)

  def slab(a_s, b_s):
    ab, bb = a_s.reshape(tm, -1, bm), b_s.reshape(tm, -1, bn)

    def body(i, out):
      d = jnp.einsum("Mka,Mkb->kab", _take_blocks(ab, rows[i]), _take_blocks(bb, cols[i]))
      return jax.lax.dynamic_update_index_in_dim(out, d, i, 0)

    out = jax.lax.fori_loop(0, chunks, body, jnp.zeros((chunks, per, bm, bn), jnp.float32))
    return out.reshape(chunks * per, bm, bn)[:w.nnz_max]

  n = a.shape[0] // tm
  parts = [slab(a_s, b_s) for a_s, b_s in zip(jnp.split(a.astype(jnp.float32), n),
                                              jnp.split(b.astype(jnp.float32), n))]
  return sum(parts[1:], parts[0])
