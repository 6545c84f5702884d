"""Block-sparse (BSR) weights: format, ``bsr_matmul`` kernels, layers and KPD conversion.

- ``bsr``: the ``BSR`` pytree with a static block budget, and its constructors.
- ``ops``: ``bsr_matmul`` (custom VJP) and the dispatch over the implementations in
  ``cpu`` (C++ kernels through XLA FFI), ``xla``, ``pallas_tpu`` and ``pallas_gpu``.
- ``layers``: ``BlockSparseDense`` / ``BlockSparseConv``.
- ``convert``: KPD params -> BSR layer variables.
"""
from bsparse.kernels.bsr import BSR, from_dense, from_indices, from_kron, indices_from_mask
from bsparse.kernels.ops import bsr_matmul, resolve_impl, set_impl, split_batch, use_impl

__all__ = ["BSR", "bsr_matmul", "from_dense", "from_indices", "from_kron",
           "indices_from_mask", "resolve_impl", "set_impl", "split_batch", "use_impl"]
