"""``bsr_matmul``: the one entry point for block-sparse products, and its dispatch (and
``bsr_conv``, the convolution that the ``'cpu'`` kernels compute without patches).

``bsr_matmul(x, w, transpose=False, impl=None, interpret=None)`` computes ``x @ W`` (or
``x @ W.T``) for a ``BSR`` weight ``w`` and ``x`` with any leading dims, under a
``jax.custom_vjp``:

- ``dx = dy @ W.T`` (``dy @ W`` for the transpose): the same block-sparse product;
- ``dW`` only for the stored blocks: block ``k`` is ``x[:, rows[k]].T @ dy[:, cols[k]]``
  (a sampled dense-dense product), zero for padding entries; indices get no gradient.

Implementations: ``'xla'`` (plain XLA ops, any backend), ``'cpu'`` (fused C++ kernels
through XLA FFI, compiled on first use), ``'pallas_tpu'`` (Mosaic), ``'pallas_gpu'``
(Triton). ``impl=None`` or ``'auto'`` takes the process-wide setting (``set_impl`` /
``use_impl``, e.g. from a ``kernels.impl`` config flag) and, when that is ``'auto'`` too,
picks by ``jax.default_backend()``: tpu -> pallas_tpu, gpu -> pallas_gpu, cpu -> cpu.
A choice falls back to ``'xla'`` when its constraints are not met (Pallas block shapes,
no C++ compiler for ``'cpu'``; ``resolve_impl`` says what will run), except in interpret
mode, where the Pallas kernels run on any backend and any block shape (for tests).
Accumulation is f32; the output has ``x.dtype``.

Data parallelism: XLA cannot split a custom call (the FFI and Pallas kernels) over a
mesh, so under ``jit`` with the batch sharded it would gather the whole batch onto every
device and repeat the product there. Traced inside ``split_batch(mesh, axis)`` (the
trainer's steps are), the kernels run under ``jax.shard_map`` instead: each device
multiplies its own rows of ``x`` by the replicated ``W``, and the block gradient is the
``psum`` over ``axis`` of each device's sampled product.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import PartitionSpec as P

from bsparse.kernels import bsr as bsr_lib
from bsparse.kernels import cpu, pallas_gpu, pallas_tpu, xla

IMPLS = {"xla": xla, "cpu": cpu, "pallas_tpu": pallas_tpu, "pallas_gpu": pallas_gpu}
_BY_BACKEND = {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cpu": "cpu"}


@dataclasses.dataclass
class _Settings:
  impl: str = "auto"
  interpret: bool = False
  split: tuple[jax.sharding.Mesh, str] | None = None  # (mesh, batch axis): split_batch


_SETTINGS = _Settings()


def _check(impl: str | None) -> str:
  impl = impl or "auto"
  if impl != "auto" and impl not in IMPLS:
    raise ValueError(f"unknown bsr_matmul impl '{impl}'; valid: {['auto', *IMPLS]}.")
  return impl


def set_impl(impl: str | None = "auto", interpret: bool | None = None) -> None:
  """Sets the process-wide default implementation (and interpret mode)."""
  _SETTINGS.impl = _check(impl)
  if interpret is not None:
    _SETTINGS.interpret = bool(interpret)


@contextlib.contextmanager
def use_impl(impl: str | None = "auto", interpret: bool | None = None):
  """Context manager form of ``set_impl``; restores the previous setting on exit.

  The setting is read when a function is traced: use it around the first call of a
  jitted function.
  """
  old = dataclasses.replace(_SETTINGS)
  set_impl(impl, interpret)
  try:
    yield
  finally:
    _SETTINGS.impl, _SETTINGS.interpret = old.impl, old.interpret


@contextlib.contextmanager
def split_batch(mesh: jax.sharding.Mesh, axis: str):
  """Products traced inside run on each device's rows of ``x`` (``x``'s leading dims
  sharded over ``mesh`` axis ``axis``, the weight replicated), under ``jax.shard_map``.
  Like ``use_impl``, it is read when a function is traced."""
  old = _SETTINGS.split
  _SETTINGS.split = (mesh, axis)
  try:
    yield
  finally:
    _SETTINGS.split = old


def _split_for(rows: int) -> tuple[jax.sharding.Mesh, str] | None:
  """The ``split_batch`` setting when it applies to ``rows`` rows of ``x``: an axis of
  more than one device that divides them (otherwise XLA places the product)."""
  if _SETTINGS.split is None:
    return None
  mesh, axis = _SETTINGS.split
  size = mesh.shape[axis]
  return (mesh, axis) if size > 1 and rows % size == 0 else None


def resolve_impl(impl: str | None, w: bsr_lib.BSR, dtype, interpret: bool = False) -> str:
  """The implementation ``bsr_matmul`` runs for ``impl`` on this weight and dtype."""
  impl = _check(impl)
  if impl == "auto":
    impl = _SETTINGS.impl
  if impl == "auto":
    impl = _BY_BACKEND.get(jax.default_backend(), "xla")
  if IMPLS[impl].supports(w, dtype, interpret):
    return impl
  return "xla"


def bsr_matmul(x: jax.Array, w: bsr_lib.BSR, transpose: bool = False,
               impl: str | None = None, interpret: bool | None = None) -> jax.Array:
  """``x @ W`` (or ``x @ W.T`` with ``transpose=True``) for a block-sparse ``W``.

  Args:
    x: ``(..., m)`` (``(..., n)`` when transposed) for ``W`` of shape ``(m, n)``.
    w: the ``BSR`` weight.
    transpose: multiply by ``W.T``.
    impl: ``None``/``'auto'``, ``'xla'``, ``'cpu'``, ``'pallas_tpu'`` or ``'pallas_gpu'``.
    interpret: run Pallas kernels in interpret mode; defaults to the process setting.
  Returns:
    ``(..., n)`` (``(..., m)`` when transposed) in ``x.dtype``.
  """
  k_in = w.shape[1] if transpose else w.shape[0]
  if x.shape[-1] != k_in:
    op = "x @ W.T" if transpose else "x @ W"
    raise ValueError(f"{op}: x has {x.shape[-1]} features, W is {w.shape[0]}x{w.shape[1]}.")
  interpret = _SETTINGS.interpret if interpret is None else bool(interpret)
  impl = resolve_impl(impl, w, x.dtype, interpret)
  lead = x.shape[:-1]
  x = x.reshape(-1, k_in)
  y = _matmul(impl, interpret, transpose, _split_for(x.shape[0]), x, w)
  return y.reshape(*lead, y.shape[-1])


def _per_shard(fn, split, row_args: tuple[bool, ...], rows_out: bool):
  """``fn`` itself, or under ``shard_map`` over ``split``: the arguments flagged in
  ``row_args`` (and the output when ``rows_out``) split by rows, the others replicated."""
  if split is None:
    return fn
  mesh, axis = split
  spec = lambda by_rows: P(axis) if by_rows else P()
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(map(spec, row_args)),
                       out_specs=spec(rows_out), check_vma=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _matmul(impl, interpret, transpose, split, x, w):
  product = lambda x, w: IMPLS[impl].matmul(x, w, transpose, interpret=interpret)
  return _per_shard(product, split, (True, False), True)(x, w)


def _matmul_fwd(impl, interpret, transpose, split, x, w):
  return _matmul(impl, interpret, transpose, split, x, w), (x, w)


def _matmul_bwd(impl, interpret, transpose, split, res, dy):
  x, w = res
  kernel = IMPLS[impl]
  back = lambda dy, w: kernel.matmul(dy, w, not transpose, interpret=interpret)
  dx = _per_shard(back, split, (True, False), True)(dy, w)

  def sampled(a, b, w):  # this device's rows' share of every stored block's gradient
    d = kernel.sddmm(a, b, w, interpret=interpret)
    return d if split is None else jax.lax.psum(d, split[1])

  a, b = (dy, x) if transpose else (x, dy)
  dblocks = _per_shard(sampled, split, (True, True, False), False)(a, b, w)
  dblocks = jnp.where(w.valid()[:, None, None], dblocks, 0).astype(w.blocks.dtype)
  return dx.astype(x.dtype), blocks_cotangent(w, dblocks)


def blocks_cotangent(w: bsr_lib.BSR, dblocks: jax.Array) -> bsr_lib.BSR:
  """The cotangent of ``w`` whose blocks are ``dblocks``; its indices get none."""
  zero = lambda v: np.zeros(v.shape, jax.dtypes.float0)
  return w.replace(blocks=dblocks, rows=zero(w.rows), cols=zero(w.cols), nnz=zero(w.nnz))


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def convolves_in_place(impl: str | None, w: bsr_lib.BSR, dtype) -> bool:
  """Whether ``bsr_conv`` takes a convolution: on the ``'cpu'`` kernels."""
  return resolve_impl(impl, w, dtype) == "cpu"


def bsr_conv(x: jax.Array, w: bsr_lib.BSR, taps, padding, strides=(1, 1)) -> jax.Array:
  """The convolution of NHWC ``x`` ``(N, H, W, Cin)`` by the block-sparse taps of ``w``,
  the ``(Cin*kh*kw, Cout)`` weight of a ``BlockSparseConv``, with ``strides``, zero-padded
  by ``padding`` ``((top, bottom), (left, right))`` (as ``lax.conv_general_dilated``'s),
  with the ``'cpu'`` kernels: each output line copies the input rows it reads into a padded
  window and every tap reads it in place, so neither a patch matrix nor a padded copy of
  ``x`` is built (``convolves_in_place`` says when it applies).

  Its gradient: ``dx`` is the convolution of ``dy`` by the flipped, transposed taps, one
  stride-1 convolution per phase of the strides (``cpu.conv_input_grad``; at stride 1 a
  single one padded by ``(kh-1-top, kw-1-left)``); each stored block's gradient sums
  ``x[.., rows[k]].T @ dy[.., cols[k]]`` over the pixels, per tap. Inside ``split_batch`` both run on each
  device's images, the block gradient summed over devices.

  Returns ``(N, (H+top+bottom-kh)//sh + 1, (W+left+right-kw)//sw + 1, Cout)`` in
  ``x.dtype``.
  """
  taps, strides = tuple(int(t) for t in taps), tuple(int(s) for s in strides)
  (top, bottom), (left, right) = ((int(a), int(b)) for a, b in padding)
  out_hw = ((x.shape[1] + top + bottom - taps[0]) // strides[0] + 1,
            (x.shape[2] + left + right - taps[1]) // strides[1] + 1)
  x, inner = cpu.pad_beyond_taps(x, (top, left), taps)
  return _conv(taps, inner, out_hw, strides, _split_for(x.shape[0]), x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _conv(taps, pad, out_hw, strides, split, x, w):
  product = lambda x, w: cpu.conv(x, w, taps, pad, out_hw, strides)
  return _per_shard(product, split, (True, False), True)(x, w)


def _conv_fwd(taps, pad, out_hw, strides, split, x, w):
  return _conv(taps, pad, out_hw, strides, split, x, w), (x, w)


def _conv_bwd(taps, pad, out_hw, strides, split, res, dy):
  x, w = res
  back = lambda dy, w: cpu.conv_input_grad(dy, w, taps, pad, strides, x.shape[1:3])
  dx = _per_shard(back, split, (True, False), True)(dy, w)

  def sampled(x, dy, w):  # this device's images' share of every stored block's gradient
    d = cpu.conv_sddmm(x, dy, w, taps, pad, strides)
    return d if split is None else jax.lax.psum(d, split[1])

  dblocks = _per_shard(sampled, split, (True, True, False), False)(x, dy, w)
  return dx.astype(x.dtype), blocks_cotangent(w, dblocks.astype(w.blocks.dtype))


_conv.defvjp(_conv_fwd, _conv_bwd)
