"""Convert a trained KPD (Kronecker-factored) model to block-sparse (BSR) layers.

API:

``kpd_to_bsr_params(params, nnz_max=None) -> {'params': ..., 'bsr_index': ...}``
  Walks a params tree (nested dicts, e.g. ``variables['params']``). Every dict holding
  exactly one ``kron_{m2}x{n2}`` sub-dict (``S``, ``A``, ``B``: a ``KronDense`` or
  ``KronConv`` layer) becomes the params of a ``BlockSparseDense`` / ``BlockSparseConv``
  layer of the same name: ``blocks`` (the nonzero blocks ``S[i,j] * sum_k A[k,(h,w),i,j]
  B[k]``, row-sorted) plus the layer's other entries (``bias``), and gets ``rows``,
  ``cols``, ``nnz`` in the ``bsr_index`` collection. Other subtrees are copied unchanged.
  A layer with several candidate terms raises a ValueError (finish block-size selection
  first). ``nnz_max`` is the block budget: None (the layer's nonzero count, at least 1),
  an int for all layers, or a dict from layer path (``'a/b'``) to int. The result is
  the ``variables`` argument of ``model.apply`` for the model rebuilt with
  ``BlockSparseDense``/``BlockSparseConv`` in place of the KPD layers, and that model
  gives the same outputs as the KPD model.

``bsr_layer_specs(params, nnz_max=None) -> {path: LayerSpec}``
  What each converted layer must be built with: ``block_shape`` ``(m2, n2)``,
  ``nnz_max`` and ``kernel_size`` (None for dense layers).

Both run eagerly (they read the masks), not under ``jit``.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np

from bsparse.kernels import bsr as bsr_lib
from bsparse.kernels.layers import INDEX_COLLECTION

TERM_PREFIX = "kron_"


class LayerSpec(NamedTuple):
  block_shape: tuple[int, int]
  nnz_max: int
  kernel_size: tuple[int, int] | None


def kpd_to_bsr_params(params: Mapping[str, Any], nnz_max=None) -> dict[str, Any]:
  """Returns ``{'params': ..., 'bsr_index': ...}`` for the block-sparse model."""
  new_params, index = {}, {}
  _walk(params, (), nnz_max, new_params, index)
  return {"params": new_params, INDEX_COLLECTION: index}


def bsr_layer_specs(params: Mapping[str, Any], nnz_max=None) -> dict[str, LayerSpec]:
  """``{'a/b': LayerSpec}`` for every KPD layer of ``params``."""
  specs = {}
  for path, term in _layers(params, ()):
    s, a, b = (np.asarray(term[k]) for k in ("S", "A", "B"))
    taps = tuple(int(v) for v in a.shape[1:-2]) or None
    specs["/".join(path)] = LayerSpec(tuple(int(v) for v in b.shape[1:]),
                                      _budget(s, path, nnz_max), taps)
  return specs


def _terms(node) -> list[str]:
  return [k for k in node if str(k).startswith(TERM_PREFIX) and _is_term(node[k])]


def _is_term(node) -> bool:
  return hasattr(node, "keys") and {"S", "A", "B"} <= set(node.keys())


def _layers(node, path):
  """Yields ``(path, term)`` for every KPD layer under ``node``."""
  if not hasattr(node, "items"):
    return
  terms = _terms(node)
  if len(terms) > 1:
    raise ValueError(f"layer '{'/'.join(path)}' has {len(terms)} candidate KPD terms "
                     f"{sorted(terms)}; a BSR layer has one block shape. Drop the collapsed "
                     "candidates (block-size selection) before converting.")
  if terms:
    yield path, node[terms[0]]
    return
  for k, v in node.items():
    yield from _layers(v, path + (str(k),))


def _budget(s, path, nnz_max) -> int:
  """The layer's block budget, checked against its mask ``s != 0``."""
  if isinstance(nnz_max, Mapping):
    nnz_max = nnz_max.get("/".join(path))
  try:
    return bsr_lib.check_budget(s != 0, s.shape, nnz_max)
  except ValueError as e:
    raise ValueError(f"layer '{'/'.join(path)}': {e}") from None


def _walk(node, path, nnz_max, out_params, out_index):
  """Fills ``out_params`` / ``out_index`` with the converted copy of ``node``."""
  terms = _terms(node)
  if terms:
    [(_, term)] = list(_layers(node, path))
    s, a, b = (jnp.asarray(term[k]) for k in ("S", "A", "B"))
    budget = _budget(np.asarray(s), path, nnz_max)
    blocks, rows, cols, nnz = bsr_lib.kron_entries(s, a, b, budget)
    out_params.update({k: v for k, v in node.items() if k not in terms}, blocks=blocks)
    out_index.update(rows=rows, cols=cols, nnz=nnz)
    return
  for k, v in node.items():
    if not hasattr(v, "items"):
      out_params[k] = v
      continue
    sub_params, sub_index = {}, {}
    _walk(v, path + (str(k),), nnz_max, sub_params, sub_index)
    out_params[k] = sub_params
    if sub_index:
      out_index[k] = sub_index
