"""Flax linen layers whose weights are stored block-sparse (``BSR``).

Variables of both layers:

- ``params``: ``blocks`` — the stored blocks, trainable: ``(nnz_max, bm, bn)`` for
  ``BlockSparseDense`` and ``(nnz_max, kh, kw, bm, bn)`` for ``BlockSparseConv`` (block
  ``k`` of every kernel tap sits at block ``(rows[k], cols[k])`` of the ``(Cin, Cout)``
  plane); ``bias`` ``(features,)`` when ``use_bias``.
- ``bsr_index`` (``INDEX_COLLECTION``, not trainable): ``rows``, ``cols`` ``(nnz_max,)``
  int32 and ``nnz`` ``()`` int32, the row-sorted block indices of ``bsparse.kernels.bsr``.

``init`` draws a random mask with ``nnz_max`` blocks; ``convert.kpd_to_bsr_params`` builds
both collections from a trained KPD model instead. Changing ``bsr_index`` within the
budget does not change any shape, so a jitted step does not recompile.

A layer whose block budget is at least ``dense_from`` of its block grid (``computes_dense``)
multiplies densely instead: its blocks are added into a zero ``(in, out)`` weight
(``BSR.to_dense``; ``from_indices`` zeroes the padding entries, so they get no gradient)
and XLA's dense dot or convolution takes it. Near a full grid a block-sparse kernel does
the dense arithmetic with gathers and scatters on top, so a model switched to block-sparse
form before its blocks are pruned runs at dense speed until a repack shrinks its budget.
The gradient of the scatter, a gather of the dense weight gradient, is the stored blocks'
gradient.

``BlockSparseConv`` on the ``'cpu'`` kernels convolves in place
(``ops.bsr_conv``): every stored block's taps read the input pixels where they lie. Otherwise it
computes the convolution as patches (im2col) times a block-sparse
``(Cin*kh*kw, Cout)`` matrix: ``lax.conv_general_dilated_patches`` orders patch features
channel-major, ``(c, h, w)``, so rows ``i*bm*kh*kw:(i+1)*bm*kh*kw`` of that matrix hold
input-channel block ``i`` with all its taps, and the product is one ``bsr_matmul`` with
``(bm*kh*kw, bn)`` blocks at the same ``(rows, cols)``. The patches take ``kh*kw`` times
the activation memory of the input, so a patch matrix over ``PATCH_BYTES`` is built and
multiplied a slab of output rows at a time (``conv``), in the forward and the backward pass.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bsparse import kron
from bsparse.kernels import bsr as bsr_lib
from bsparse.kernels.ops import blocks_cotangent, bsr_conv, bsr_matmul, convolves_in_place

INDEX_COLLECTION = "bsr_index"
Shape2 = tuple[int, int]
# The most bytes of patches a convolution builds at once (larger ones go in slabs of rows;
# a conv on the 'cpu' kernels builds none). 8 MiB puts the CNN's conv2 in slabs of
# 2 of its 14 rows at batch 128 and 256: its train step held 58 instead of 89 MB of
# temporaries, its evaluation at 256 48 instead of 88 MB.
PATCH_BYTES = 8 << 20


def _indices(module: nn.Module, grid: Shape2, nnz_max: int):
  """The ``(rows, cols, nnz)`` index variables; initialised to a random mask."""
  drawn = []

  def init(i):
    def fn():
      if not drawn:
        m1, n1 = grid
        pick = jax.random.permutation(module.make_rng("params"), m1 * n1)[:nnz_max]
        mask = jnp.zeros((m1 * n1,), bool).at[pick].set(True).reshape(m1, n1)
        drawn.append(bsr_lib.indices_from_mask(mask, nnz_max))
      return drawn[0][i]
    return fn

  return tuple(module.variable(INDEX_COLLECTION, name, init(i)).value
               for i, name in enumerate(("rows", "cols", "nnz")))


def _budget(module: nn.Module, grid: Shape2, nnz_max: int | None) -> int:
  total = grid[0] * grid[1]
  nnz_max = total if nnz_max is None else int(nnz_max)
  if not 1 <= nnz_max <= total:
    raise ValueError(f"layer '{module.name}': nnz_max must be in [1, {total}] for its "
                     f"{grid[0]}x{grid[1]} block grid, got {nnz_max}.")
  return nnz_max


def _weight(module, in_features: int, block_shape: Sequence[int], taps: tuple[int, ...]):
  """Creates the variables and returns the ``(Cin*taps, Cout)`` ``BSR`` weight."""
  where = f"layer '{module.name}'"
  bm, bn = (int(v) for v in block_shape)
  try:
    grid = bsr_lib.block_grid((in_features, module.features), (bm, bn))
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  nnz_max = _budget(module, grid, module.nnz_max)
  rows, cols, nnz = _indices(module, grid, nnz_max)
  n_taps = math.prod(taps)
  fan_in = max(1.0, nnz_max * bm * n_taps / grid[1])
  blocks = module.param("blocks", kron.normal_init(math.sqrt(2.0 / fan_in)),
                        (nnz_max, *taps, bm, bn), module.param_dtype)
  if taps:
    blocks = bsr_lib.patch_blocks(blocks)
  shape = (in_features * n_taps, module.features)
  return bsr_lib.from_indices(blocks, rows, cols, nnz, shape)


def computes_dense(nnz_max: int, grid: Shape2, dense_from: float | None) -> bool:
  """Whether a layer with ``nnz_max`` stored blocks on a ``grid`` multiplies densely."""
  return dense_from is not None and nnz_max >= dense_from * grid[0] * grid[1]


def _pads(x, taps: Sequence[int], strides: Sequence[int], padding):
  """The ``((top, bottom), (left, right))`` padding of NHWC ``x`` for ``padding`` (a string
  or explicit pairs)."""
  return tuple(map(tuple, jax.lax.padtype_to_pads(x.shape[1:3], taps, strides, padding)
                   if isinstance(padding, str) else padding))


def _pad(x, taps: Sequence[int], strides: Sequence[int], padding) -> jax.Array:
  """``x`` (NHWC) with the spatial padding of ``padding`` (a string or explicit pairs)."""
  return jnp.pad(x, [(0, 0), *_pads(x, taps, strides, padding), (0, 0)])


def _out_size(x, taps: Sequence[int], strides: Sequence[int]) -> tuple[int, int]:
  """``(Ho, Wo)`` of a VALID convolution of already padded NHWC ``x``."""
  return tuple((x.shape[1 + i] - taps[i]) // strides[i] + 1 for i in (0, 1))


def _valid_patches(x, taps: Sequence[int], strides: Sequence[int]) -> jax.Array:
  """The patches of already padded ``x``: ``(N, Ho, Wo, C*kh*kw)``, features ``(C, kh, kw)``."""
  (kh, kw), (sh, sw), (ho, wo) = taps, strides, _out_size(x, taps, strides)
  cols = [x[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, :]
          for i in range(kh) for j in range(kw)]
  return jnp.stack(cols, axis=-1).reshape(*cols[0].shape[:3], -1)


def patches(x, taps: Sequence[int], strides: Sequence[int], padding) -> jax.Array:
  """``lax.conv_general_dilated_patches`` of NHWC ``x`` by slicing: ``(N, Ho, Wo, C*kh*kw)``
  with features ordered ``(C, kh, kw)``.

  The same values as the XLA op, which on CPU runs as a convolution with a one-hot
  ``(kh*kw*C, kh*kw*C)`` kernel (and so costs more than the block-sparse product it feeds);
  slices, and their pad-and-add gradient, only move data.
  """
  return _valid_patches(_pad(x, taps, strides, padding), taps, strides)


def slab_rows(out_rows: int, row_bytes: int, budget: int | None = None) -> int:
  """Output rows per slab: the largest divisor of ``out_rows`` whose patches (``row_bytes``
  per row) fit in ``budget`` bytes (default ``PATCH_BYTES``), and at least 1."""
  budget = PATCH_BYTES if budget is None else budget
  fits = [r for r in range(1, out_rows + 1) if out_rows % r == 0 and r * row_bytes <= budget]
  return max(fits, default=1)


def conv(x, w: bsr_lib.BSR, taps: Sequence[int], strides: Sequence[int], padding,
         impl: str | None = None, patch_bytes: int | None = None,
         in_place: bool = True) -> jax.Array:
  """``patches(x) @ W`` for NHWC ``x`` and the ``(C*kh*kw, Cout)`` weight: ``(N, Ho, Wo, Cout)``.

  On the ``'cpu'`` kernels (and ``in_place``) no patch matrix is built:
  ``ops.bsr_conv`` reads each tap's pixels in place. Otherwise, where the whole patch
  matrix would pass ``patch_bytes`` (default ``PATCH_BYTES``), the forward and backward
  passes build and multiply it a slab of output rows at a time (``_in_slabs``).
  """
  if in_place and convolves_in_place(impl, w, x.dtype):
    return bsr_conv(x, w, taps, _pads(x, taps, strides, padding), strides)
  x = _pad(x, taps, strides, padding)
  ho, wo = _out_size(x, taps, strides)
  rows = slab_rows(ho, x.shape[0] * wo * w.shape[0] * x.dtype.itemsize, patch_bytes)
  if rows == ho:
    return _whole(x, w, taps, strides, impl)
  return _in_slabs(x, w, tuple(taps), tuple(strides), rows, impl)


def dense_conv(x, w: bsr_lib.BSR, taps: Sequence[int], strides: Sequence[int],
               padding) -> jax.Array:
  """The convolution of NHWC ``x`` by the ``(C*kh*kw, Cout)`` weight made dense: rows
  ``(c, kh, kw)``, as ``patches`` orders them, become an HWIO kernel."""
  cin = x.shape[-1]
  kernel = w.to_dense().reshape(cin, *taps, -1).transpose(1, 2, 0, 3)
  return jax.lax.conv_general_dilated(x, kernel, tuple(strides), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _whole(x, w, taps, strides, impl):
  return bsr_matmul(_valid_patches(x, taps, strides), w, impl=impl)


def _slab_input(x, r, rows: int, taps, strides) -> tuple[jax.Array, jax.Array]:
  """``(start, x[:, start:start + span])``: the padded input rows that slab ``r`` of
  ``rows`` output rows reads, ``span = (rows - 1) * sh + kh``."""
  (kh, _), (sh, _) = taps, strides
  start = r * rows * sh
  return start, jax.lax.dynamic_slice_in_dim(x, start, (rows - 1) * sh + kh, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _in_slabs(x, w, taps, strides, rows, impl):
  """``_whole(x, w)`` over padded ``x``, ``rows`` output rows at a time.

  A ``fori_loop`` reads input rows ``[r*sh, r*sh + (rows-1)*sh + kh)`` for the slab of
  output rows from ``r`` and writes its product in place, so one slab's patches are alive
  at once; the batch axis is never cut, so a batch sharded over devices stays sharded.
  The backward pass (``_in_slabs_bwd``) goes slab by slab too: it keeps ``x`` and ``w``,
  not the patches, and rebuilds each slab's patches from ``x``.
  """
  ho, wo = _out_size(x, taps, strides)

  def slab(r, y):
    _, xs = _slab_input(x, r, rows, taps, strides)
    ys = _whole(xs, w, taps, strides, impl)
    return jax.lax.dynamic_update_slice_in_dim(y, ys, r * rows, axis=1)

  y = jnp.zeros((x.shape[0], ho, wo, w.shape[1]), x.dtype)
  return jax.lax.fori_loop(0, ho // rows, slab, y)


def _in_slabs_fwd(x, w, taps, strides, rows, impl):
  return _in_slabs(x, w, taps, strides, rows, impl), (x, w)


def _in_slabs_bwd(taps, strides, rows, impl, res, dy):
  """Per slab: the VJP of ``_whole`` on its input rows, which adds into the overlapping
  rows of ``dx`` (neighbouring slabs share ``kh - sh`` input rows) and into the block
  gradient."""
  x, w = res
  ho, _ = _out_size(x, taps, strides)

  def slab(r, grads):
    dx, dblocks = grads
    start, xs = _slab_input(x, r, rows, taps, strides)
    _, vjp = jax.vjp(lambda xs, blocks: _whole(xs, w.replace(blocks=blocks), taps,
                                               strides, impl), xs, w.blocks)
    dxs, dbs = vjp(jax.lax.dynamic_slice_in_dim(dy, r * rows, rows, axis=1))
    dx = jax.lax.dynamic_update_slice_in_dim(
        dx, jax.lax.dynamic_slice_in_dim(dx, start, xs.shape[1], axis=1) + dxs, start, axis=1)
    return dx, dblocks + dbs

  dx, dblocks = jax.lax.fori_loop(0, ho // rows, slab,
                                  (jnp.zeros_like(x), jnp.zeros_like(w.blocks)))
  return dx, blocks_cotangent(w, dblocks)


_in_slabs.defvjp(_in_slabs_fwd, _in_slabs_bwd)


def _bias(module, y):
  if not module.use_bias:
    return y
  bias = module.param("bias", nn.initializers.zeros, (module.features,), module.param_dtype)
  return y + jnp.asarray(bias, y.dtype)


class BlockSparseDense(nn.Module):
  """``y = x @ W + bias`` with ``W`` ``(in, features)`` stored as ``nnz_max`` blocks.

  Attributes:
    features: output dimension.
    block_shape: ``(bm, bn)``; ``bm`` divides the input and ``bn`` the output dimension.
    nnz_max: block budget (default: all blocks).
    impl: ``bsr_matmul`` implementation (None: the process default / backend choice).
    dense_from: multiply densely when ``nnz_max`` is at least this share of the block
      grid (``computes_dense``; None: always block-sparse).
  """
  features: int
  block_shape: Shape2
  nnz_max: int | None = None
  impl: str | None = None
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  dense_from: float | None = None

  @nn.compact
  def __call__(self, x):
    w = _weight(self, x.shape[-1], self.block_shape, ())
    blocks, x = nn.dtypes.promote_dtype(w.blocks, x, dtype=self.dtype)
    w = w.replace(blocks=blocks)
    if computes_dense(w.nnz_max, w.grid, self.dense_from):
      return _bias(self, x @ w.to_dense())
    return _bias(self, bsr_matmul(x, w, impl=self.impl))


class BlockSparseConv(nn.Module):
  """2-D convolution (NHWC) whose ``(Cin, Cout)`` plane is block-sparse, shared by taps.

  Attributes:
    features: output channels.
    kernel_size: ``(kh, kw)``.
    block_shape: ``(bm, bn)`` over ``(Cin, Cout)``.
    nnz_max: block budget over the ``(Cin/bm, Cout/bn)`` grid (default: all blocks).
    strides, padding: as ``lax.conv_general_dilated``.
    impl: ``bsr_matmul`` implementation.
    dense_from: as ``BlockSparseDense``.
  """
  features: int
  kernel_size: Sequence[int]
  block_shape: Shape2
  nnz_max: int | None = None
  strides: Sequence[int] = (1, 1)
  padding: Any = "SAME"
  impl: str | None = None
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  dense_from: float | None = None

  @nn.compact
  def __call__(self, x):
    taps = tuple(int(v) for v in self.kernel_size)
    w = _weight(self, x.shape[-1], self.block_shape, taps)
    blocks, x = nn.dtypes.promote_dtype(w.blocks, x, dtype=self.dtype)
    w = w.replace(blocks=blocks)
    if computes_dense(w.nnz_max, w.grid, self.dense_from):
      return _bias(self, dense_conv(x, w, taps, tuple(self.strides), self.padding))
    y = conv(x, w, taps, tuple(self.strides), self.padding, self.impl)
    return _bias(self, y)
