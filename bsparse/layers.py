"""Flax linen layers with Kronecker-factored, block-sparse weights.

Each layer stores one KPD term per candidate block shape in a sub-dict named
``kron_{m2}x{n2}`` holding ``S`` (selector, the block grid), ``A`` and ``B``. Optimizer
transforms find selectors by the leaf name ``S`` (see ``bsparse.sparsity``). A layer with
several candidate block shapes sums their terms (block-size selection in one run).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bsparse import kron
from bsparse.kernels import layers as bsr_layers

Shape2 = tuple[int, int]


def term_name(block_shape: Sequence[int]) -> str:
  return f"kron_{block_shape[0]}x{block_shape[1]}"


class KronDense(nn.Module):
  """``y = x @ W + bias`` with ``W = sum_c sum_k kron(S_c * A_ck, B_ck)``.

  Attributes:
    features: output dimension ``n``.
    block_shapes: one or more candidate block shapes ``(m2, n2)``; ``m2`` divides the input
      dimension and ``n2`` the output dimension.
    rank: number of Kronecker terms ``r`` per candidate.
  """
  features: int
  block_shapes: Sequence[Shape2] = ((4, 4),)
  rank: int = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    m = x.shape[-1]
    y = 0.0
    for shape in self.block_shapes:
      s, a, b = _make(self, m, self.features, tuple(shape), self.rank, (), m)
      s, a, b, xc = nn.dtypes.promote_dtype(s, a, b, x, dtype=self.dtype)
      y = y + kron.kron_matmul(xc, s, a, b)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + jnp.asarray(bias, y.dtype)
    return y


class KronConv(nn.Module):
  """2-D convolution whose ``(Cin, Cout)`` plane is block-sparse, shared by all taps.

  ``W[h, w] = sum_k kron(S * A[k, h, w], B[k])``: computed as a 1x1 conv with ``B`` and a
  spatial conv with ``S*A`` on the block grid (or the reverse), never building ``W``.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Any = "SAME"
  block_shapes: Sequence[Shape2] = ((4, 4),)
  rank: int = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    m = x.shape[-1]
    taps = tuple(self.kernel_size)
    y = 0.0
    for shape in self.block_shapes:
      s, a, b = _make(self, m, self.features, tuple(shape), self.rank, taps,
                      m * taps[0] * taps[1])
      s, a, b, xc = nn.dtypes.promote_dtype(s, a, b, x, dtype=self.dtype)
      y = y + kron.kron_conv(xc, s, a, b, tuple(self.strides), self.padding)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + jnp.asarray(bias, y.dtype)
    return y


def _make(module: nn.Module, m: int, n: int, block_shape: Shape2, rank: int,
          taps: tuple[int, ...], fan_in: int):
  """Creates (or fetches) the ``S, A, B`` params of one candidate as a nested sub-dict."""
  where = f"layer '{module.name}'"
  m1, n1 = kron.grid_shape(m, n, block_shape, where=where)
  if rank < 1:
    raise ValueError(f"{where}: rank must be >= 1, got {rank}.")
  # The layer's candidates sum: each starts at 1/len of He variance, so their sum has it.
  std = kron.init_scales(fan_in, rank * len(module.block_shapes))
  term = _Term(m1=m1, n1=n1, block_shape=block_shape, rank=rank, taps=taps, std=std,
               param_dtype=module.param_dtype, name=term_name(block_shape))
  return term()


class _Term(nn.Module):
  """Holds the parameters of one KPD term; its call returns ``(S, A, B)``."""
  m1: int
  n1: int
  block_shape: Shape2
  rank: int
  taps: tuple[int, ...]
  std: float
  param_dtype: Any

  @nn.compact
  def __call__(self):
    m2, n2 = self.block_shape
    s = self.param("S", nn.initializers.ones, (self.m1, self.n1), self.param_dtype)
    a = self.param("A", kron.normal_init(self.std), (self.rank, *self.taps, self.m1, self.n1),
                   self.param_dtype)
    b = self.param("B", kron.normal_init(self.std), (self.rank, m2, n2), self.param_dtype)
    return s, a, b


# --------------------------------------------------------------------------- factory


@dataclasses.dataclass(frozen=True)
class LayerFactory:
  """Builds the weight layers of a model so one model runs dense or block-sparse.

  Models call ``dense(features, name)`` / ``conv(features, kernel, strides, name)`` with
  stable names; ``kind`` picks ``nn.Dense``/``nn.Conv``, the KPD layers, or (``bsr``, for
  serving a converted model) the block-sparse layers of ``bsr_specs``; per-layer
  ``block_shapes`` / ``ranks`` (keyed by layer name) override the defaults. Names listed
  in ``dense_layers`` stay dense (e.g. the stem and the classifier head).
  """
  kind: str = "dense"
  block_shape: Shape2 = (4, 4)
  rank: int = 1
  block_shapes: dict[str, Any] = dataclasses.field(default_factory=dict)
  ranks: dict[str, int] = dataclasses.field(default_factory=dict)
  dense_layers: tuple[str, ...] = ()
  dtype: Any = None
  bsr_specs: dict[str, Any] = dataclasses.field(default_factory=dict)
  impl: str | None = None
  dense_from: float | None = None

  KINDS = ("dense", "kpd", "bsr")

  def __post_init__(self):
    if self.kind not in self.KINDS:
      raise ValueError(f"unknown layer kind '{self.kind}'; valid: {list(self.KINDS)}.")

  def is_sparse(self, name: str) -> bool:
    if self.kind == "bsr":
      return name in self.bsr_specs
    return self.kind == "kpd" and name not in self.dense_layers

  def shapes_for(self, name: str) -> tuple[Shape2, ...]:
    shapes = self.block_shapes.get(name, self.block_shape)
    shapes = tuple(shapes)
    if shapes and isinstance(shapes[0], int):
      shapes = (shapes,)
    return tuple(tuple(int(v) for v in s) for s in shapes)

  def dense(self, features: int, name: str, use_bias: bool = True) -> nn.Module:
    if not self.is_sparse(name):
      return nn.Dense(features, use_bias=use_bias, dtype=self.dtype, name=name)
    if self.kind == "bsr":
      spec = self.bsr_specs[name]
      return bsr_layers.BlockSparseDense(features, tuple(spec.block_shape), spec.nnz_max,
                                         self.impl, use_bias, self.dtype,
                                         dense_from=self.dense_from, name=name)
    return KronDense(features, block_shapes=self.shapes_for(name),
                     rank=self.ranks.get(name, self.rank), use_bias=use_bias,
                     dtype=self.dtype, name=name)

  def conv(self, features: int, kernel_size: Sequence[int], name: str,
           strides: Sequence[int] = (1, 1), use_bias: bool = False) -> nn.Module:
    if not self.is_sparse(name):
      return nn.Conv(features, tuple(kernel_size), tuple(strides), use_bias=use_bias,
                     dtype=self.dtype, name=name)
    if self.kind == "bsr":
      spec = self.bsr_specs[name]
      return bsr_layers.BlockSparseConv(features, tuple(kernel_size), tuple(spec.block_shape),
                                        spec.nnz_max, tuple(strides), "SAME", self.impl,
                                        use_bias, self.dtype, dense_from=self.dense_from,
                                        name=name)
    return KronConv(features, tuple(kernel_size), tuple(strides),
                    block_shapes=self.shapes_for(name), rank=self.ranks.get(name, self.rank),
                    use_bias=use_bias, dtype=self.dtype, name=name)


def kron_terms(params) -> dict[tuple[str, ...], dict[str, jax.Array]]:
  """All KPD terms in a params tree: ``{path_to_term: {'S', 'A', 'B'}}``."""
  out = {}

  def visit(node, path):
    if isinstance(node, dict) or hasattr(node, "items"):
      if {"S", "A", "B"} <= set(node.keys()):
        out[path] = {k: node[k] for k in ("S", "A", "B")}
        return
      for k, v in node.items():
        visit(v, path + (k,))

  visit(params, ())
  return out
