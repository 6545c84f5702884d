"""Block compressed sparse row (BSR) weights with a static block budget.

A ``BSR`` stands for a weight ``W`` of shape ``(m, n)`` (used as ``y = x @ W``) cut into
an ``(m1, n1)`` grid of ``(bm, bn)`` blocks, ``m = m1 * bm`` and ``n = n1 * bn``. It
stores at most ``nnz_max`` blocks:

- ``blocks``: ``(nnz_max, bm, bn)``; entry ``k`` is block ``(rows[k], cols[k])`` of ``W``,
  i.e. ``W[rows[k]*bm:(rows[k]+1)*bm, cols[k]*bn:(cols[k]+1)*bn]``.
- ``rows``, ``cols``: ``(nnz_max,)`` int32 block-row / block-column indices, sorted by
  ``(row, col)``.
- ``nnz``: ``()`` int32, the number of stored blocks. Entries ``k >= nnz`` are padding:
  they point at the last block ``(m1 - 1, n1 - 1)`` (so the order stays sorted), hold zero
  blocks and contribute nothing.

``shape`` and ``block_shape`` are static (pytree metadata); ``nnz_max`` is the leading
dimension of ``blocks``. A new mask with at most ``nnz_max`` blocks therefore gives a
``BSR`` with the same shapes, dtypes and metadata, and a jitted function taking it does
not recompile; a new block shape or budget does.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class BSR:
  """Block-sparse ``(m, n)`` matrix; see the module docstring for the layout."""
  blocks: jax.Array
  rows: jax.Array
  cols: jax.Array
  nnz: jax.Array
  shape: tuple[int, int] = flax.struct.field(pytree_node=False)
  block_shape: tuple[int, int] = flax.struct.field(pytree_node=False)

  @property
  def grid(self) -> tuple[int, int]:
    """The block grid ``(m1, n1)``."""
    return self.shape[0] // self.block_shape[0], self.shape[1] // self.block_shape[1]

  @property
  def nnz_max(self) -> int:
    return self.blocks.shape[0]

  @property
  def dtype(self):
    return self.blocks.dtype

  def valid(self) -> jax.Array:
    """``(nnz_max,)`` bool: True for stored blocks, False for padding."""
    return jnp.arange(self.nnz_max) < self.nnz

  def mask(self) -> jax.Array:
    """``(m1, n1)`` bool block mask."""
    m1, n1 = self.grid
    return jnp.zeros((m1, n1), bool).at[self.rows, self.cols].max(self.valid())

  def to_dense(self) -> jax.Array:
    """The dense ``(m, n)`` matrix."""
    m1, n1 = self.grid
    bm, bn = self.block_shape
    grid = jnp.zeros((m1, n1, bm, bn), self.dtype).at[self.rows, self.cols].add(self.blocks)
    return grid.transpose(0, 2, 1, 3).reshape(self.shape)

  def with_blocks(self, blocks: jax.Array) -> "BSR":
    """The same sparsity pattern with new ``(nnz_max, bm, bn)`` blocks (padding zeroed)."""
    if blocks.shape != self.blocks.shape:
      raise ValueError(f"blocks must have shape {self.blocks.shape}, got {blocks.shape}.")
    return self.replace(blocks=_zero_padding(blocks, self.valid()))


def output_schedule(w: BSR, transpose: bool = False):
  """Visiting order of the stored blocks for an output-stationary kernel.

  For ``x @ W`` the output blocks are the block columns of ``W`` (``n1`` groups) and the
  input block of entry ``k`` is ``rows[k]``; for ``x @ W.T`` they are the block rows
  (``m1`` groups) and the input block is ``cols[k]``. Every group gets at least one step
  so that every output block is written; groups are visited in order.

  Returns:
    ``(group, entry, real)``, int32 arrays of length ``S = nnz_max + groups``: the output
    block of each step (non-decreasing), the stored entry it multiplies, and 1 where the
    step multiplies a stored block (0 for steps that only initialise or pad a group;
    their ``entry`` repeats the previous step's so no new block is fetched).
  """
  m1, n1 = w.grid
  out, groups = (w.rows, m1) if transpose else (w.cols, n1)
  valid = w.valid()
  empty = jax.ops.segment_sum(valid.astype(jnp.int32), out, groups) == 0
  group = jnp.concatenate([jnp.where(valid, out, groups - 1),
                           jnp.where(empty, jnp.arange(groups), groups - 1)])
  real = jnp.concatenate([valid, jnp.zeros((groups,), bool)])
  order = jnp.argsort(2 * group + (~real), stable=True)
  group, real = group[order], real[order]
  entry = jnp.concatenate([jnp.arange(w.nnz_max), jnp.zeros((groups,), jnp.int32)])[order]
  last_real = jax.lax.cummax(jnp.where(real, jnp.arange(real.shape[0]), 0))
  entry = entry[last_real]
  return group.astype(jnp.int32), entry.astype(jnp.int32), real.astype(jnp.int32)


def group_offsets(w: BSR, transpose: bool = False):
  """Entries grouped by output block (CSR over output blocks, for a loop per output).

  Returns:
    ``(entry, offsets)``: ``entry (nnz_max,)`` int32 lists the stored entries sorted by
    output block (block column of ``W`` for ``x @ W``, block row for ``x @ W.T``), then by
    input block, padding last; the entries of output block ``g`` are
    ``entry[offsets[g]:offsets[g + 1]]``, ``offsets (groups + 1,)`` int32.
  """
  m1, n1 = w.grid
  out, groups = (w.rows, m1) if transpose else (w.cols, n1)
  valid = w.valid()
  key = jnp.where(valid, out, groups)
  entry = jnp.argsort(key, stable=True).astype(jnp.int32)
  counts = jax.ops.segment_sum(valid.astype(jnp.int32), out, groups)
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts)])
  return entry, offsets.astype(jnp.int32)


def tap_blocks(w: BSR, taps: Sequence[int]) -> jax.Array:
  """The ``(nnz_max, kh, kw, bm, bn)`` taps of a convolution's ``(Cin*kh*kw, Cout)`` weight,
  whose ``(bm*kh*kw, bn)`` blocks hold patch rows ``(c, kh, kw)`` (``kernels.layers``)."""
  kh, kw = taps
  bm, bn = w.block_shape[0] // (kh * kw), w.block_shape[1]
  return jnp.moveaxis(w.blocks.reshape(w.nnz_max, bm, kh, kw, bn), 1, 3)


def patch_blocks(taps: jax.Array) -> jax.Array:
  """The inverse of ``tap_blocks``: ``(nnz_max, kh, kw, bm, bn)`` taps to the
  ``(nnz_max, bm*kh*kw, bn)`` blocks of the patch matrix's weight."""
  nnz_max, kh, kw, bm, bn = taps.shape
  return jnp.moveaxis(taps, 3, 1).reshape(nnz_max, bm * kh * kw, bn)


def block_grid(shape: Sequence[int], block_shape: Sequence[int]) -> tuple[int, int]:
  """``(m1, n1)`` for an ``(m, n)`` matrix; ValueError when the blocks do not tile it."""
  if len(shape) != 2 or len(block_shape) != 2:
    raise ValueError(f"expected a 2-D shape and block shape, got {tuple(shape)} and "
                     f"{tuple(block_shape)}.")
  (m, n), (bm, bn) = shape, block_shape
  for dim, size, axis in ((m, bm, "rows"), (n, bn, "columns")):
    if size < 1 or dim % size:
      raise ValueError(f"block shape {tuple(block_shape)} does not tile the {m}x{n} matrix: "
                       f"{size} does not divide its {dim} {axis}.")
  return m // bm, n // bn


def from_dense(w: jax.Array, block_shape: Sequence[int], nnz_max: int | None = None,
               mask: jax.Array | None = None) -> BSR:
  """Stores the blocks of a dense ``(m, n)`` matrix selected by a block mask.

  Args:
    w: ``(m, n)``.
    block_shape: ``(bm, bn)``.
    nnz_max: block budget; defaults to the number of selected blocks (at least 1; needs
      a concrete mask).
    mask: ``(m1, n1)`` bool block mask; defaults to the blocks of ``w`` that are not all
      zero.
  Returns:
    A ``BSR``. Under ``jit`` with a traced mask, blocks beyond ``nnz_max`` (in row-major
    order) are dropped; with a concrete mask that raises a ValueError instead.
  """
  grid = block_grid(w.shape, block_shape)
  block_shape = tuple(int(v) for v in block_shape)
  if mask is None:
    mask = _nonzero_blocks(w, block_shape)
  nnz_max = check_budget(mask, grid, nnz_max)
  blocks, rows, cols, nnz = _dense_entries(w, mask, block_shape, nnz_max)
  return BSR(blocks, rows, cols, nnz, tuple(w.shape), block_shape)


def from_kron(s: jax.Array, a: jax.Array, b: jax.Array, nnz_max: int | None = None) -> BSR:
  """Stores the nonzero blocks of one dense-layer KPD term without building ``W``.

  Block ``(i, j)`` is ``s[i, j] * sum_k a[k, i, j] * b[k]``; the mask is ``s != 0``.

  Args:
    s: ``(m1, n1)`` selector; a: ``(r, m1, n1)``; b: ``(r, m2, n2)`` (the block shape).
    nnz_max: block budget; defaults to ``count_nonzero(s)`` (at least 1; needs a concrete
      ``s``).
  """
  if a.ndim != 3 or b.ndim != 3 or a.shape[1:] != s.shape or a.shape[0] != b.shape[0]:
    raise ValueError(f"expected s (m1, n1), a (r, m1, n1), b (r, m2, n2); got s {s.shape}, "
                     f"a {a.shape}, b {b.shape}. Conv terms: see bsparse.kernels.convert.")
  blocks, rows, cols, nnz = kron_entries(s, a, b, check_budget(s != 0, s.shape, nnz_max))
  (m1, n1), (m2, n2) = s.shape, b.shape[1:]
  return BSR(blocks, rows, cols, nnz, (m1 * m2, n1 * n2), (m2, n2))


@functools.partial(jax.jit, static_argnames="nnz_max")
def kron_entries(s, a, b, nnz_max: int):
  """Stored entries of a KPD term: block ``(i, j)`` is ``s[i,j] * sum_k a[k,...,i,j] b[k]``.

  Args:
    s: ``(m1, n1)``; a: ``(r, [kh, kw,] m1, n1)``; b: ``(r, m2, n2)``.
  Returns:
    ``(blocks, rows, cols, nnz)``; blocks ``(nnz_max, [kh, kw,] m2, n2)``, padding zero.
  """
  rows, cols, nnz = _sorted_indices(s != 0, nnz_max)
  coef = (s * a)[..., rows, cols]  # (r, [kh, kw,] nnz_max)
  blocks = jnp.einsum("k...n,kab->n...ab", coef, b)
  valid = (jnp.arange(nnz_max) < nnz).reshape(-1, *([1] * (blocks.ndim - 1)))
  return jnp.where(valid, blocks, 0).astype(b.dtype), rows, cols, nnz


def from_indices(blocks: jax.Array, rows: jax.Array, cols: jax.Array, nnz: jax.Array | int,
                 shape: Sequence[int]) -> BSR:
  """Wraps row-sorted index arrays and ``(nnz_max, bm, bn)`` blocks (padding zeroed)."""
  bm, bn = blocks.shape[-2:]
  block_grid(shape, (bm, bn))
  if rows.shape != (blocks.shape[0],) or cols.shape != rows.shape:
    raise ValueError(f"rows and cols must have shape ({blocks.shape[0]},), got {rows.shape} "
                     f"and {cols.shape}.")
  nnz = jnp.asarray(nnz, jnp.int32)
  blocks = _zero_padding(blocks, jnp.arange(blocks.shape[0]) < nnz)
  return BSR(blocks, jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32), nnz,
             (int(shape[0]), int(shape[1])), (int(bm), int(bn)))


def indices_from_mask(mask: jax.Array, nnz_max: int | None = None):
  """Row-sorted ``(rows, cols, nnz)`` of a ``(m1, n1)`` block mask, padded to ``nnz_max``."""
  return _sorted_indices(mask, check_budget(mask, mask.shape, nnz_max))


def check_budget(mask, grid: Sequence[int], nnz_max: int | None) -> int:
  """Checks a ``(m1, n1)`` block mask against the grid and the budget.

  Returns ``nnz_max`` (the mask's block count, at least 1, when None). Raises a
  ValueError for a wrong mask shape, a budget outside ``[1, m1*n1]``, or a concrete mask
  with more blocks than the budget.
  """
  m1, n1 = grid
  if tuple(mask.shape) != (m1, n1):
    raise ValueError(f"mask must have the block-grid shape {(m1, n1)}, got {mask.shape}.")
  count = _concrete_count(mask)
  if nnz_max is None:
    if count is None:
      raise ValueError("nnz_max is required when the mask is traced (under jit).")
    nnz_max = max(count, 1)
  nnz_max = int(nnz_max)
  if nnz_max < 1 or nnz_max > m1 * n1:
    raise ValueError(f"nnz_max must be in [1, {m1 * n1}] for a {m1}x{n1} block grid, "
                     f"got {nnz_max}.")
  if count is not None and count > nnz_max:
    raise ValueError(f"the mask has {count} blocks, more than the budget nnz_max={nnz_max}.")
  return nnz_max


@functools.partial(jax.jit, static_argnames="nnz_max")
def _sorted_indices(mask, nnz_max: int):
  """Row-sorted block indices of ``mask``, padded with the last block of the grid."""
  m1, n1 = mask.shape
  flat = jnp.nonzero(jnp.ravel(mask), size=nnz_max, fill_value=m1 * n1 - 1)[0]
  nnz = jnp.minimum(jnp.count_nonzero(mask), nnz_max).astype(jnp.int32)
  return (flat // n1).astype(jnp.int32), (flat % n1).astype(jnp.int32), nnz


def _tiles(w, block_shape):
  (bm, bn), (m, n) = block_shape, w.shape
  return w.reshape(m // bm, bm, n // bn, bn).transpose(0, 2, 1, 3)


@functools.partial(jax.jit, static_argnames="block_shape")
def _nonzero_blocks(w, block_shape):
  return jnp.any(_tiles(w, block_shape) != 0, axis=(2, 3))


@functools.partial(jax.jit, static_argnames=("block_shape", "nnz_max"))
def _dense_entries(w, mask, block_shape, nnz_max: int):
  rows, cols, nnz = _sorted_indices(mask, nnz_max)
  blocks = _zero_padding(_tiles(w, block_shape)[rows, cols], jnp.arange(nnz_max) < nnz)
  return blocks, rows, cols, nnz


def _concrete_count(mask) -> int | None:
  try:
    return int(np.count_nonzero(np.asarray(mask)))
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _zero_padding(blocks, valid):
  return jnp.where(valid[:, None, None], blocks, jnp.zeros((), blocks.dtype))
