"""CPU implementation of the block-sparse products: fused C++ kernels behind XLA FFI.

The kernels (``cpu_kernels.cc``) read the input blocks in place and accumulate every
stored block of an output tile in registers, so the gather and scatter that dominate the
``xla`` path on a CPU are gone. They compute in float32 (bf16 inputs are widened, the
output has ``x.dtype``) on the XLA CPU client's intra-op thread pool.

The shared library is compiled on first use with the system C++ compiler (``$CXX`` or
``c++``; ``-O3 -march=native``) against the FFI headers shipped with jaxlib, and cached in
``$BSPARSE_CACHE`` (default ``~/.cache/bsparse``) under a key of the source, the flags,
the jaxlib version and the CPU's instruction set. ``scripts/setup.sh`` builds it ahead of
time (``cpu.build()``). Without a compiler ``supports`` is False and the
dispatch in ``ops`` uses the ``xla`` path instead (with one warning naming the cause).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from bsparse.kernels import bsr as bsr_lib

SOURCE = pathlib.Path(__file__).with_name("cpu_kernels.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
TARGETS = {"bsparse_bsr_matmul": "BsrMatmul", "bsparse_bsr_sddmm": "BsrSddmm",
           "bsparse_bsr_conv": "BsrConv", "bsparse_bsr_conv_sddmm": "BsrConvSddmm",
           "bsparse_bsr_conv_sddmm_by_pixels": "BsrConvSddmmByPixels"}
# Blocks at most this wide, at unit stride, put output pixels rather than channels in the
# kernels' 8 vector lanes, where a 2-wide block would leave 6 idle (kNarrow in the source).
NARROW = 4


class BuildError(RuntimeError):
  """The C++ kernels could not be compiled or loaded."""


def _compiler() -> str:
  cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if not cxx:
    raise BuildError("no C++ compiler found (set $CXX or install g++, e.g. "
                     "`apt-get install g++`); bsr_matmul uses the xla path instead.")
  return cxx


def _cpu_features() -> str:
  """The CPU's instruction-set flags (a cached ``-march=native`` build must match them)."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(("flags", "Features")):
        return line
  except OSError:
    pass
  return platform.processor()


def library_path() -> pathlib.Path:
  """Where the compiled library for this source, compiler flags, jaxlib and CPU lives."""
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), jaxlib.__version__.encode(),
               _cpu_features().encode(), platform.machine().encode()):
    key.update(part)
  cache = pathlib.Path(os.environ.get("BSPARSE_CACHE", pathlib.Path.home() / ".cache/bsparse"))
  return cache / f"bsr_cpu-{key.hexdigest()[:16]}.so"


def build() -> pathlib.Path:
  """Compiles the kernels unless a matching library is cached; returns its path."""
  path = library_path()
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
    out = pathlib.Path(tmp) / path.name
    cmd = [_compiler(), *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out)]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
      raise BuildError(f"compiling {SOURCE.name} failed: {e}") from e
    if proc.returncode:
      raise BuildError(f"compiling {SOURCE.name} failed:\n{' '.join(cmd)}\n{proc.stderr}")
    os.replace(out, path)  # atomic: concurrent builds leave one complete library
  return path


@functools.cache
def _load() -> BuildError | None:
  """Builds, loads and registers the kernels once per process; the error if that failed."""
  try:
    lib = ctypes.cdll.LoadLibrary(str(build()))
    for target, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform="cpu")
  except (BuildError, OSError, AttributeError) as e:
    err = e if isinstance(e, BuildError) else BuildError(f"loading the CPU kernels: {e}")
    logging.warning("bsparse CPU kernels unavailable: %s", err)
    return err
  return None


def available() -> bool:
  """Whether the compiled kernels are loaded (builds them on first call)."""
  return _load() is None


def supports(w: bsr_lib.BSR, dtype, interpret: bool = False) -> bool:
  """Any block shape; float32 and narrower float inputs; the CPU backend only."""
  del w, interpret
  return (jax.default_backend() == "cpu" and jnp.issubdtype(dtype, jnp.floating)
          and jnp.finfo(dtype).bits <= 32 and available())


def _call(target: str, shape, *args, **attrs) -> jax.Array:
  error = _load()
  if error is not None:
    raise error
  out = jax.ShapeDtypeStruct(shape, jnp.float32)
  attrs = {k: np.int64(v) for k, v in attrs.items()}
  return jax.ffi.ffi_call(target, out, vmap_method="sequential")(*args, **attrs)


def matmul(x: jax.Array, w: bsr_lib.BSR, transpose: bool = False,
           interpret: bool = False) -> jax.Array:
  """``x @ W`` (or ``x @ W.T``) for ``x: (M, K)``; returns ``(M, N)`` in ``x.dtype``."""
  del interpret
  m1, n1 = w.grid
  bm, bn = w.block_shape
  blocks, src, width = w.blocks, w.rows, n1 * bn
  if transpose:
    blocks, src, width = jnp.swapaxes(w.blocks, 1, 2), w.cols, m1 * bm
  if x.shape[0] == 0:
    return jnp.zeros((0, width), x.dtype)
  entry, offsets = bsr_lib.group_offsets(w, transpose)
  y = _call("bsparse_bsr_matmul", (x.shape[0], width), x.astype(jnp.float32),
            blocks.astype(jnp.float32), src, entry, offsets)
  return y.astype(x.dtype)


def sddmm(a: jax.Array, b: jax.Array, w: bsr_lib.BSR, interpret: bool = False) -> jax.Array:
  """Stored blocks of ``a.T @ b``: ``(nnz_max, bm, bn)`` f32 (zero for padding).

  Args:
    a: ``(M, m)``, read in ``bm``-wide column blocks ``rows[k]``.
    b: ``(M, n)``, read in ``bn``-wide column blocks ``cols[k]``.
  """
  del interpret
  return _call("bsparse_bsr_sddmm", (w.nnz_max, *w.block_shape), a.astype(jnp.float32),
               b.astype(jnp.float32), w.rows, w.cols, w.nnz.reshape(1))


def conv(x: jax.Array, w: bsr_lib.BSR, taps, pad, out_hw, strides=(1, 1)) -> jax.Array:
  """The convolution of NHWC ``x`` by the taps of ``w`` with ``strides``, zero-padded by
  ``pad = (top, left)`` (each below its tap count; below and right as far as ``out_hw``
  asks), read in place: no patch matrix, no padded copy of ``x``.

  Args:
    x: ``(N, H, W, Cin)``.
    w: the ``(Cin*kh*kw, Cout)`` weight of a ``BlockSparseConv``.
    taps: ``(kh, kw)``.
    out_hw: ``(Ho, Wo)``.
  Returns:
    ``(N, Ho, Wo, Cout)`` in ``x.dtype``.
  """
  entry, offsets = bsr_lib.group_offsets(w)
  return _conv_call(x, bsr_lib.tap_blocks(w, taps), w.rows, entry, offsets, pad, out_hw,
                    strides)


def pad_beyond_taps(x: jax.Array, pad, taps) -> tuple[jax.Array, tuple[int, int]]:
  """Splits a convolution's top and left padding ``pad`` of NHWC ``x`` between the kernels,
  which pad by less than a tap's reach, and XLA, which pads (or, where negative, crops)
  what lies beyond: ``(x as the kernels take it, their padding)``."""
  inner = tuple(min(max(p, 0), k - 1) for p, k in zip(pad, taps))
  outer = (pad[0] - inner[0], pad[1] - inner[1])
  if outer != (0, 0):
    x = jax.lax.pad(x, jnp.zeros((), x.dtype),
                    ((0, 0, 0), (outer[0], 0, 0), (outer[1], 0, 0), (0, 0, 0)))
  return x, inner


def conv_input_grad(dy: jax.Array, w: bsr_lib.BSR, taps, pad, strides, in_hw) -> jax.Array:
  """The gradient for ``x`` of ``conv(x, w, taps, pad, out_hw, strides)`` given its output
  gradient ``dy`` ``(N, Ho, Wo, Cout)``: ``(N, *in_hw, Cin)`` in ``dy.dtype``.

  Along an axis with stride ``s``, tap count ``k`` and padding ``p``, input row ``s*q + r``
  (phase ``r < s``) takes its gradient from the taps ``i = r + p (mod s)`` only: from
  ``dy[q + c - j]`` through tap ``i0 + s*j``, where ``i0 = (r + p) % s`` and ``c = (r + p -
  i0) / s``. Each phase is one stride-1 convolution of ``dy`` by that phase's flipped,
  transposed taps (``sh*sw`` of them, one at stride 1), and the phases
  interleave into the input's rows and columns: no zero is multiplied.
  """
  flipped = jnp.swapaxes(bsr_lib.tap_blocks(w, taps)[:, ::-1, ::-1], 3, 4)
  entry, offsets = bsr_lib.group_offsets(w, transpose=True)
  cin = (offsets.shape[0] - 1) * flipped.shape[-1]
  sizes = [-(-n // s) for n, s in zip(in_hw, strides)]  # rows and columns of phase 0
  phases = []
  for rh in range(strides[0]):
    for rw in range(strides[1]):
      axes = [_phase(r, k, p, s, n) for r, k, p, s, n in
              zip((rh, rw), taps, pad, strides, in_hw)]
      shape = (dy.shape[0], axes[0][3], axes[1][3], cin)
      if any(a[1] == 0 for a in axes):  # no tap reaches this phase
        part = jnp.zeros(shape, dy.dtype)
      else:
        (fh, jh, ph, qh), (fw, jw, pw, qw) = axes
        sub = flipped[:, fh:fh + strides[0] * (jh - 1) + 1:strides[0],
                      fw:fw + strides[1] * (jw - 1) + 1:strides[1]]
        d, inner = pad_beyond_taps(dy, (ph, pw), (jh, jw))
        part = _conv_call(d, sub, w.cols, entry, offsets, inner, (qh, qw), (1, 1))
      phases.append(jnp.pad(part, ((0, 0), (0, sizes[0] - shape[1]),
                                   (0, sizes[1] - shape[2]), (0, 0))))
  # (sh*sw, N, Qh, Qw, C) -> (N, Qh, sh, Qw, sw, C): row s*q + r of phase r.
  grid = jnp.stack(phases).reshape(*strides, dy.shape[0], *sizes, cin)
  dx = jnp.transpose(grid, (2, 3, 0, 4, 1, 5)).reshape(
      dy.shape[0], sizes[0] * strides[0], sizes[1] * strides[1], cin)
  return dx[:, :in_hw[0], :in_hw[1]]


def _phase(r: int, k: int, p: int, s: int, n: int) -> tuple[int, int, int, int]:
  """One axis of ``conv_input_grad``'s phase ``r``: ``(first, count, pad, rows)``, its taps
  ``flipped[first::s][:count]``, the top padding of ``dy`` that its stride-1 convolution
  needs (negative: a crop), and the input rows ``r, r + s, ...`` below ``n``."""
  i0 = (r + p) % s
  count = max(0, -(-(k - i0) // s))
  c = (r + p - i0) // s
  return k - 1 - i0 - s * (count - 1), count, count - 1 - c, -(-(n - r) // s)


def _conv_call(x, blocks, src, entry, offsets, pad, out_hw, strides) -> jax.Array:
  """``bsparse_bsr_conv`` of NHWC ``x`` by ``(nnz_max, kh, kw, bk, bo)`` tap ``blocks``
  read from input blocks ``src``, in ``x.dtype``."""
  shape = (x.shape[0], *out_hw, (offsets.shape[0] - 1) * blocks.shape[-1])
  y = _call("bsparse_bsr_conv", shape, x.astype(jnp.float32), blocks.astype(jnp.float32),
            src, entry, offsets, **_window(pad, strides))
  return y.astype(x.dtype)


def _window(pad, strides) -> dict[str, int]:
  """The convolution kernels' padding and stride attributes."""
  return dict(pad_top=int(pad[0]), pad_left=int(pad[1]), stride_h=int(strides[0]),
              stride_w=int(strides[1]))


# The entries' own copies may cost up to this many times the block-major copies of x and
# dy: they stay in cache while the entry's taps read them, where XLA's transposes go
# through memory. conv2 of configs/cnn_fmnist.py at batch 128: at a tenth of its 128
# blocks (13 entries) its forward and backward pass ran faster with them
# (`python -m benchmarks.bsr_conv`), at a quarter (32) the trainer's step ran slower
# (`python -m benchmarks.dense_from`).
_ENTRY_COPY_RATIO = 2.0


def _copies_per_entry(x_shape, dy_shape, nnz_max: int, bm: int, bn: int) -> bool:
  """Whether ``conv_sddmm``'s kernel should copy each entry's channel blocks out of NHWC
  ``x`` and ``dy`` (``nnz_max`` copies of a block each) rather than read block-major copies
  of both (one copy of each array)."""
  pixels_in, pixels_out = math.prod(x_shape[:3]), math.prod(dy_shape[:3])
  per_entry = nnz_max * (bm * pixels_in + bn * pixels_out)
  whole = x_shape[3] * pixels_in + dy_shape[3] * pixels_out
  return per_entry <= _ENTRY_COPY_RATIO * whole


def conv_sddmm(x: jax.Array, dy: jax.Array, w: bsr_lib.BSR, taps, pad, strides=(1, 1)
               ) -> jax.Array:
  """The gradient of ``conv`` (padded by ``pad``, with ``strides``) for the stored blocks:
  ``(nnz_max, bm*kh*kw, bn)`` f32 in the layout of ``w.blocks`` (zero for padding).

  At unit strides with blocks at most ``NARROW`` on each side the kernel copies chunks of
  each image's rows of ``x`` and ``dy`` channel-major and reads 8 neighbouring pixels at
  a time. Otherwise each entry reads its channel block of ``x`` and of ``dy`` as
  a contiguous slab: with few entries the kernel copies them out of the NHWC arrays itself,
  entry by entry; with more it reads block-major copies of both (XLA transposes), made once
  (``_copies_per_entry``).

  Args:
    x: the input ``(N, H, W, Cin)``; dy: the output gradient ``(N, Ho, Wo, Cout)``.
  """
  (kh, kw), bn = taps, w.block_shape[1]
  bm = w.block_shape[0] // (kh * kw)
  x, dy = x.astype(jnp.float32), dy.astype(jnp.float32)
  shape = (w.nnz_max, kh, kw, bm, bn)
  if tuple(strides) == (1, 1) and max(bm, bn) <= NARROW:
    out = _call("bsparse_bsr_conv_sddmm_by_pixels", shape, x, dy, w.rows, w.cols,
                w.nnz.reshape(1), **_window(pad, strides))
    return bsr_lib.patch_blocks(out)
  if not _copies_per_entry(x.shape, dy.shape, w.nnz_max, bm, bn):

    def block_major(a, width):  # (N, H, W, C) -> (C/width, N, H, W, width)
      return jnp.moveaxis(a.reshape(*a.shape[:3], -1, width), 3, 0)

    x, dy = block_major(x, bm), block_major(dy, bn)
  out = _call("bsparse_bsr_conv_sddmm", shape, x, dy, w.rows, w.cols, w.nnz.reshape(1),
              **_window(pad, strides))
  return bsr_lib.patch_blocks(out)
