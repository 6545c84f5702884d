r"""Max-pooling's backward pass: ``nn.max_pool`` against ``models.max_pool``.

  python -m benchmarks.max_pool
  python -m benchmarks.max_pool --batches=128,1000 --rounds=5

For the CNN's two pooled activations (ReLU, then 2x2 max-pool with stride 2) this compiles
the forward and backward pass of each form and reports XLA's temporaries of the compiled
function (activations and workspace, not arguments or outputs) and its time: the minimum
over ``--rounds`` interleaved rounds of the mean over ``--calls`` calls, and the ratio of
the two forms' times, and how many gradient entries differ between them (only a window
with tied maxima can: ``nn.max_pool`` gives its gradient to the first, ``models.max_pool``
shares it). ``nn.max_pool``'s gradient is a select-and-scatter, which XLA:CPU
turns into a scatter with an index array per element; ``models.max_pool`` takes the max
over reshaped axes, whose gradient is a comparison with the broadcast maximum.
"""
from __future__ import annotations

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks.timing import timed
from bsparse import models

_BATCHES = flags.DEFINE_list("batches", ["128"], "Batch sizes.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds (the minimum is reported).")
_CALLS = flags.DEFINE_integer("calls", 5, "Calls per round.")

# name: (H = W, channels) of the CNN's activations before each pool.
LAYERS = {"cnn pool1": (28, 32), "cnn pool2": (14, 64)}
FORMS = {"nn.max_pool": lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)),
         "models.max_pool": lambda x: models.max_pool(x, 2)}


def _fwd_bwd(pool):
  """``x -> d/dx sum(pool(relu(x)) * g)``: the backward pass a train step runs."""
  def grad(x, g):
    return jax.grad(lambda x: jnp.sum(pool(nn.relu(x)) * g))(x)
  return jax.jit(grad)


def main(argv):
  del argv
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s)")
  print("| layer | batch | form | temporaries MB | ms | × models.max_pool | gradient "
        "entries that differ |")
  print("|---|---|---|---|---|---|---|")
  for name, (hw, c) in LAYERS.items():
    for batch in map(int, _BATCHES.value):
      x = jax.random.normal(jax.random.key(0), (batch, hw, hw, c))
      g = jax.random.normal(jax.random.key(1), (batch, hw // 2, hw // 2, c))
      compiled = {k: _fwd_bwd(f).lower(x, g).compile() for k, f in FORMS.items()}
      outs = [f(x, g) for f in compiled.values()]  # also the warm-up
      differ = int(jnp.sum(outs[0] != outs[1]))
      best = dict.fromkeys(compiled, float("inf"))
      for _ in range(_ROUNDS.value):
        for k, f in compiled.items():
          best[k] = min(best[k], timed(f, (x, g), _CALLS.value))
      for k, f in compiled.items():
        temp = f.memory_analysis().temp_size_in_bytes / 2**20
        print(f"| {name} | {batch} | {k} | {temp:.1f} | {1000 * best[k]:.2f} | "
              f"{best[k] / best['models.max_pool']:.2f} | {differ} |")


if __name__ == "__main__":
  app.run(main)
