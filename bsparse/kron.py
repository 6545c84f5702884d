"""Kronecker-product (KPD) weight math, without building the weight.

A weight ``W`` of shape ``(m, n)``, used as ``y = x @ W``, is factored as

    W = sum_k kron(S * A[k], B[k])     S, A[k]: (m1, n1)    B[k]: (m2, n2)

with ``m = m1 * m2`` and ``n = n1 * n2``. Block ``(i, j)`` of ``W`` (rows
``i*m2:(i+1)*m2``, columns ``j*n2:(j+1)*n2``) is ``S[i, j] * sum_k A[k, i, j] * B[k]``:
a zero in the selector ``S`` zeroes a whole ``m2 x n2`` block, so **the block shape
is the shape of ``B``** and the block grid is the shape of ``S``.

Convolutions share one selector over all kernel taps: ``A`` carries the taps,
``A: (r, kh, kw, m1, n1)``, and ``W[h, w] = sum_k kron(S * A[k, h, w], B[k])`` is the
``(Cin, Cout)`` slice of the kernel at tap ``(h, w)``.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import jax
import jax.numpy as jnp

Order = Literal["b_first", "a_first"]


def divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def grid_shape(m: int, n: int, block_shape: Sequence[int], where: str = "layer") -> tuple[int, int]:
  """Returns the block grid ``(m1, n1)`` of an ``(m, n)`` weight with ``block_shape=(m2, n2)``.

  Raises a ValueError naming the layer, the dimension and the valid choices when the
  block shape does not divide the weight.
  """
  if len(block_shape) != 2:
    raise ValueError(f"{where}: block_shape must be (rows, cols), got {tuple(block_shape)}.")
  m2, n2 = (int(v) for v in block_shape)
  for dim, size, axis in ((m, m2, "input"), (n, n2, "output")):
    if size < 1 or dim % size:
      raise ValueError(
          f"{where}: block size {size} does not divide the {axis} dimension {dim} of the "
          f"{m}x{n} weight (block_shape={tuple(block_shape)}). Valid sizes for {dim}: "
          f"{divisors(dim)}. Set a per-layer block shape in config.layers.block_shapes.")
  return m // m2, n // n2


# --------------------------------------------------------------------------- dense layers


def contraction_costs(m1: int, m2: int, n1: int, n2: int, rank: int, nnz: int | None = None
                      ) -> dict[str, int]:
  """Multiply-accumulates per token of ``x @ W`` for each contraction order.

  ``b_first``: ``X @ B_k`` then ``(S*A_k)^T``: ``r*(m*n2 + nnz*n2)``.
  ``a_first``: ``(S*A_k)^T X`` then ``@ B_k``: ``r*(nnz*m2 + n1*m2*n2)``.
  ``nnz`` is the number of nonzero blocks (``m1*n1`` when dense).
  """
  nnz = m1 * n1 if nnz is None else nnz
  return {
      "b_first": rank * (m1 * m2 * n2 + nnz * n2),
      "a_first": rank * (nnz * m2 + n1 * m2 * n2),
  }


def best_order(m1: int, m2: int, n1: int, n2: int, rank: int) -> Order:
  costs = contraction_costs(m1, m2, n1, n2, rank)
  return "b_first" if costs["b_first"] <= costs["a_first"] else "a_first"


def kron_matmul(x: jax.Array, s: jax.Array, a: jax.Array, b: jax.Array,
                order: Order | None = None) -> jax.Array:
  """Computes ``x @ sum_k kron(s * a[k], b[k])`` by the vec trick.

  Args:
    x: ``(..., m1*m2)`` inputs; any leading dims.
    s: ``(m1, n1)`` selector.
    a: ``(r, m1, n1)`` block-grid factors.
    b: ``(r, m2, n2)`` in-block factors.
    order: contraction order; the cheaper one when None.
  Returns:
    ``(..., n1*n2)``.
  """
  r, m1, n1 = a.shape
  _, m2, n2 = b.shape
  order = order or best_order(m1, m2, n1, n2, r)
  p = s[None] * a
  xr = x.reshape(*x.shape[:-1], m1, m2)
  if order == "b_first":
    t = jnp.einsum("...ia,kab->...kib", xr, b)
    y = jnp.einsum("...kib,kij->...jb", t, p)
  else:
    u = jnp.einsum("...ia,kij->...kja", xr, p)
    y = jnp.einsum("...kja,kab->...jb", u, b)
  return y.reshape(*x.shape[:-1], n1 * n2)


def dense_weight(s: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """Materialises ``sum_k kron(s * a[k], b[k])``.

  For conv factors ``a: (r, kh, kw, m1, n1)`` returns the ``(kh, kw, m, n)`` kernel.
  """
  r, m2, n2 = b.shape
  *taps, m1, n1 = a.shape[1:]
  w = jnp.einsum("k...ij,kab->...iajb", s * a, b)
  return w.reshape(*taps, m1 * m2, n1 * n2)


# --------------------------------------------------------------------------- convolutions


def conv_costs(m1: int, m2: int, n1: int, n2: int, rank: int, taps: int,
               in_pixels: int, out_pixels: int) -> dict[str, int]:
  """Multiply-accumulates per example of a factored conv for each contraction order.

  ``b_first``: a 1x1 conv with ``B`` at input resolution, then a spatial conv with ``S*A``
  on ``r*m1`` channels per in-block output channel. ``a_first``: the spatial conv with
  ``S*A`` on each in-block input channel, then a 1x1 with ``B`` at output resolution.
  """
  return {
      "b_first": rank * (in_pixels * m1 * m2 * n2 + out_pixels * taps * m1 * n1 * n2),
      "a_first": rank * (out_pixels * taps * m1 * n1 * m2 + out_pixels * n1 * m2 * n2),
  }


def kron_conv(x: jax.Array, s: jax.Array, a: jax.Array, b: jax.Array,
              strides: Sequence[int] = (1, 1), padding="SAME",
              order: Order | None = None) -> jax.Array:
  """2-D convolution (NHWC) with the kernel ``W[h, w] = sum_k kron(s * a[k, h, w], b[k])``.

  Args:
    x: ``(N, H, W, m1*m2)``.
    s: ``(m1, n1)``; a: ``(r, kh, kw, m1, n1)``; b: ``(r, m2, n2)``.
  Returns:
    ``(N, H', W', n1*n2)``; output channel ``j*n2 + c`` is column ``c`` of block column ``j``.
  """
  r, kh, kw, m1, n1 = a.shape
  _, m2, n2 = b.shape
  n, h, w, _ = x.shape
  if order is None:
    costs = conv_costs(m1, m2, n1, n2, r, kh * kw, h * w, h * w)
    order = "b_first" if costs["b_first"] <= costs["a_first"] else "a_first"
  p = s * a  # (r, kh, kw, m1, n1)
  dn = ("NHWC", "HWIO", "NHWC")
  xr = x.reshape(n, h, w, m1, m2)
  if order == "b_first":
    # 1x1 conv with B: (n, h, w, m1, m2) -> (n, h, w, r, m1, n2); fold n2 into the batch.
    t = jnp.einsum("nhwia,kab->nbhwki", xr, b).reshape(n * n2, h, w, r * m1)
    kern = p.transpose(1, 2, 0, 3, 4).reshape(kh, kw, r * m1, n1)
    y = jax.lax.conv_general_dilated(t, kern, strides, padding, dimension_numbers=dn)
    ho, wo = y.shape[1:3]
    y = y.reshape(n, n2, ho, wo, n1).transpose(0, 2, 3, 4, 1)
  else:
    # Spatial conv with S*A per in-block channel a (folded into the batch), then B.
    t = xr.transpose(0, 4, 1, 2, 3).reshape(n * m2, h, w, m1)
    kern = p.transpose(1, 2, 3, 0, 4).reshape(kh, kw, m1, r * n1)
    u = jax.lax.conv_general_dilated(t, kern, strides, padding, dimension_numbers=dn)
    ho, wo = u.shape[1:3]
    u = u.reshape(n, m2, ho, wo, r, n1)
    y = jnp.einsum("nahwkj,kab->nhwjb", u, b)
  return y.reshape(n, ho, wo, n1 * n2)


# --------------------------------------------------------------------------- block views


@jax.jit  # called eagerly (plots, notebooks): one program per shape, not one per op
def block_norms(s: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """Frobenius norm of every block of ``W`` (over all taps for convs): ``(m1, n1)``.

  Uses the Gram matrix of ``B`` so ``W`` is never built:
  ``||sum_k A[k,ij] B_k||^2 = a_ij^T G a_ij`` with ``G[k, l] = <B_k, B_l>``.
  """
  gram = jnp.einsum("kab,lab->kl", b, b)
  sq = jnp.einsum("k...ij,kl,l...ij->...ij", a, gram, a)
  sq = sq.reshape(-1, *s.shape).sum(0)
  return jnp.abs(s) * jnp.sqrt(jnp.maximum(sq, 0.0))


def block_mask(s: jax.Array) -> jax.Array:
  """Boolean ``(m1, n1)`` mask of the blocks that are not exactly zero."""
  return s != 0


def density(s: jax.Array) -> jax.Array:
  return jnp.mean(block_mask(s).astype(jnp.float32))


def nonzero_blocks(s, a, b):
  """The nonzero blocks of ``W`` for export, row-sorted.

  Returns ``(rows, cols, blocks)`` as numpy arrays: ``rows``/``cols`` ``(nnz,)`` block
  indices and ``blocks`` ``(nnz, [kh, kw,] m2, n2)``.
  """
  import numpy as np
  s, a, b = (np.asarray(v) for v in (s, a, b))
  rows, cols = np.nonzero(s)
  blocks = np.einsum("k...n,kab->n...ab", (s * a)[..., rows, cols], b)
  return rows, cols, blocks


def kpd_params(m1: int, m2: int, n1: int, n2: int, rank: int, taps: int = 1) -> int:
  """Trainable parameters of one KPD term: ``r*(taps*m1*n1 + m2*n2) + m1*n1``."""
  return rank * (taps * m1 * n1 + m2 * n2) + m1 * n1


def init_scales(fan_in: int, rank: int, scale: float = 2.0) -> float:
  """Std of ``A`` and ``B`` entries so ``W`` has variance ``scale / fan_in`` (He init)."""
  return math.sqrt(math.sqrt(scale / fan_in / rank))


def normal_init(std: float):
  """A flax initializer: i.i.d. ``N(0, std^2)`` entries, the same values as
  ``nn.initializers.normal(std)``.

  The draw is made on the flattened shape and reshaped. With JAX's partitionable threefry
  (the default) each entry's random bits depend only on its row-major position, so the
  values are identical; XLA:CPU compiles the draw of a 3-D or 5-D factor shape several
  times slower than the flat one (seconds per factor), which made model init the slowest
  compile of a KPD run.
  """
  def init(key, shape, dtype=jnp.float32):
    return (jax.random.normal(key, (math.prod(shape),), dtype) * jnp.asarray(std, dtype)
            ).reshape(shape)
  return init
