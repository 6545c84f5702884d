r"""Block-sparse convolution: in place, or its patch matrix whole or in slabs, against a
dense conv.

  python -m benchmarks.bsr_conv      # the CNN's conv2 (4x4 and 2x2 blocks), two ResNet convs
  python -m benchmarks.bsr_conv --batches=1000 --passes=fwd

On the ``cpu`` kernels a ``BlockSparseConv`` convolves in place
(``ops.bsr_conv``, the form "BSR, in place", listed where it applies); elsewhere it
multiplies the patch matrix (im2col, ``kh*kw`` times its input) by the block-sparse
weight, and above ``kernels.layers.PATCH_BYTES`` of patches the forward and the backward
pass build and multiply it a slab of output rows at a time. For each
(layer, batch, pass) this compiles the dense ``lax`` convolution, the block-sparse one with
its patch matrix whole (no budget) and in slabs (``--patch_bytes``, by default
``PATCH_BYTES``) and in place, and reports
XLA's temporaries of the compiled function (activations and workspace, not arguments or
outputs) and its time: the minimum over ``--rounds`` interleaved rounds of the mean over
``--calls`` calls, and the largest difference of its output from the dense conv's. Masks
are random with ``round(density * blocks)`` blocks.
"""
from __future__ import annotations

import time

from absl import app, flags
import jax
import jax.numpy as jnp

from bsparse import baselines
from bsparse.kernels import bsr, layers, ops

_BATCHES = flags.DEFINE_list("batches", ["128", "1000"], "Batch sizes.")
_PASSES = flags.DEFINE_list("passes", ["fwd", "fwd+bwd"], "fwd and/or fwd+bwd.")
_DENSITY = flags.DEFINE_float("density", 0.1, "Block density of the weights.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds (the minimum is reported).")
_CALLS = flags.DEFINE_integer("calls", 3, "Calls per round.")
_PATCH_BYTES = flags.DEFINE_integer(
    "patch_bytes", None, "Patch budget of the slabbed form (default: "
    "kernels.layers.PATCH_BYTES).")

# name: (H = W, Cin, Cout, (bm, bn), stride); 3x3 taps, SAME padding.
LAYERS = {"cnn conv2": (14, 32, 64, (4, 4), 1), "cnn conv2, 2x2 blocks": (14, 32, 64, (2, 2), 1),
          "resnet stage-1 conv": (32, 16, 16, (4, 4), 1),
          "resnet stage-2 first conv": (32, 16, 32, (4, 4), 2)}


def _weight(cin: int, cout: int, block_shape, density: float, seed: int = 0):
  """A random ``(3, 3, cin, cout)`` HWIO kernel under a random block mask (every tap
  shares it) with ``round(density * blocks)`` blocks."""
  grid = (cin // block_shape[0], cout // block_shape[1])
  mask = baselines.random_mask(jax.random.key(seed), grid,
                               max(1, round(density * grid[0] * grid[1])))
  w = jax.random.normal(jax.random.key(seed + 1), (3, 3, cin, cout))
  return w * baselines.expand(mask, block_shape)


def _sparse(kernel, block_shape):
  """The ``(cin*9, cout)`` BSR weight of an HWIO kernel (rows ordered ``(c, kh, kw)``):
  its nonzero ``(bm*kh*kw, bn)`` blocks."""
  kh, kw, cin, cout = kernel.shape
  rows = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(cin * kh * kw, cout)
  return bsr.from_dense(rows, (block_shape[0] * kh * kw, block_shape[1]))


def _functions(kernel, block_shape, stride: int, patch_bytes: int):
  """``{name: f(x, weight)}`` and the weights they take."""
  strides = (stride, stride)

  def dense(x, k):
    return jax.lax.conv_general_dilated(x, k, strides, "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def sparse(budget, in_place=False):
    return lambda x, w: layers.conv(x, w, (3, 3), strides, "SAME", patch_bytes=budget,
                                    in_place=in_place)

  w = _sparse(kernel, block_shape)
  forms = {"dense conv": (dense, kernel), "BSR, patches whole": (sparse(1 << 62), w),
           "BSR, patches in slabs": (sparse(patch_bytes), w)}
  if ops.convolves_in_place(None, w, jnp.float32):
    forms["BSR, in place"] = (sparse(patch_bytes, in_place=True), w)
  return forms


def _compiled(f, weight, x, kind: str):
  """``f`` (``fwd``) or the value and gradients of a loss on it (``fwd+bwd``), compiled."""
  step = f
  if kind == "fwd+bwd":
    step = jax.value_and_grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=(0, 1),
                              allow_int=True)
  return jax.jit(step).lower(x, weight).compile()


def measure(name: str, batch: int, kind: str, patch_bytes: int
            ) -> list[tuple[str, float, float, float]]:
  """``[(form, ms, temporaries MB, largest |difference| from the dense conv's output)]``
  for one layer, batch and pass, timed side by side."""
  hw, cin, cout, block_shape, stride = LAYERS[name]
  kernel = _weight(cin, cout, block_shape, _DENSITY.value)
  x = jax.random.normal(jax.random.key(0), (batch, hw, hw, cin))
  functions = _functions(kernel, block_shape, stride, patch_bytes)
  dense = functions["dense conv"][0](x, kernel)
  error = {k: float(jnp.max(jnp.abs(jax.jit(f)(x, w) - dense)))
           for k, (f, w) in functions.items()}
  forms = {k: (_compiled(f, w, x, kind), w) for k, (f, w) in functions.items()}
  best = {k: float("inf") for k in forms}
  for _ in range(_ROUNDS.value):
    for k, (c, w) in forms.items():
      jax.block_until_ready(c(x, w))
      t = time.perf_counter()
      for _ in range(_CALLS.value):
        jax.block_until_ready(c(x, w))
      best[k] = min(best[k], 1e3 * (time.perf_counter() - t) / _CALLS.value)
  return [(k, best[k], c.memory_analysis().temp_size_in_bytes / 2**20, error[k])
          for k, (c, _) in forms.items()]


def main(argv):
  del argv
  budget = layers.PATCH_BYTES if _PATCH_BYTES.value is None else _PATCH_BYTES.value
  print(f"{jax.default_backend()}, {len(jax.devices())} device(s); density {_DENSITY.value}, "
        f"patch budget {budget / 2**20:g} MiB\n")
  print("| layer | batch | pass | form | ms | temporaries MB | × whole ms | × whole MB | "
        "max abs diff from dense |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name in LAYERS:
    for batch in map(int, _BATCHES.value):
      for kind in _PASSES.value:
        rows = measure(name, batch, kind, budget)
        whole = {k: (ms, mb) for k, ms, mb, _ in rows}["BSR, patches whole"]
        for form, ms, mb, err in rows:
          ratio_mb = f"{mb / whole[1]:.2f}" if whole[1] else "-"
          print(f"| {name} | {batch} | {kind} | {form} | {ms:.1f} | {mb:.0f} | "
                f"{ms / whole[0]:.2f} | {ratio_mb} | {err:.1e} |", flush=True)


if __name__ == "__main__":
  app.run(main)
