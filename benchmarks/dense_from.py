r"""Train-step time of a block-sparse model at block budgets from a full grid down, each
budget computed block-sparse and densely (``kernels.dense_from``), side by side.

  python -m benchmarks.dense_from                       # the CNN of configs/cnn_fmnist.py
  python -m benchmarks.dense_from --config=configs/mlp_fmnist.py --budgets=1,0.5,0.25

For each budget (a share of every sparse layer's block grid) the model of ``--config`` is
built in block-sparse form with a random mask of that many blocks per layer, and its train
step (loss, gradient and an Adam update, jitted with the config's XLA options) is timed with
the blocks multiplied by the block-sparse kernels and with them scattered into a dense
weight. Each time is the median over ``--rounds`` interleaved rounds of ``--steps`` steps;
``ratio`` is block-sparse over dense time, so the dense path pays off above 1. The
crossover is where ``kernels.dense_from`` belongs on the machine.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import config_flags

from bsparse import train_lib
from bsparse.kernels import convert

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cnn_fmnist.py", "Model config.")
_BUDGETS = flags.DEFINE_list("budgets", ["1", "0.75", "0.5", "0.4", "0.25", "0.1"],
                             "Block budgets, as shares of each sparse layer's block grid.")
_BATCH = flags.DEFINE_integer("batch", None, "Examples per step (default: the config's).")
_STEPS = flags.DEFINE_integer("steps", 5, "Steps per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds (the median is reported).")

IMAGE_SHAPE = (28, 28, 1)


def sparse_specs(config, share: float) -> dict[str, convert.LayerSpec]:
  """A ``LayerSpec`` per sparse layer of ``config``'s KPD model, ``share`` of its grid."""
  model = train_lib.build_model(config, 10)
  params = train_lib.init_variables(model, IMAGE_SHAPE, 0)["params"]
  full = convert.bsr_layer_specs(params)  # selectors start nonzero: every block
  return {name: s._replace(nnz_max=max(1, round(share * s.nnz_max))) for name, s in full.items()}


def train_step(config, specs, dense_from):
  """``(jitted step, state, batch)`` for the block-sparse model of ``specs``."""
  factory = dataclasses.replace(train_lib.layer_factory(config), kind="bsr",
                                bsr_specs=specs, dense_from=dense_from)
  model = train_lib.models.create_model(config.model, factory, 10, **config.model_kwargs)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *IMAGE_SHAPE))))(
      jax.random.key(0))
  params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  opt = optax.adam(1e-3)

  def step(state, batch):
    params, opt_state = state

    def loss(p):
      logits = model.apply({"params": p, **rest}, batch["image"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    grads = jax.grad(loss)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng, n = np.random.default_rng(0), _BATCH.value or config.batch_size
  batch = {"image": jnp.asarray(rng.normal(size=(n, *IMAGE_SHAPE)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, n), jnp.int32)}
  state = (params, opt.init(params))
  options = train_lib.compiler_options(config, train_lib.make_mesh())
  compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile(options)
  return compiled, state, batch


def median_ms(runs: dict, rounds: int, steps: int) -> dict:
  """Interleaved rounds of ``{key: (step, state, batch)}``: ``{key: median ms per step}``."""
  states = {k: jax.block_until_ready(step(state, batch)) for k, (step, state, batch) in runs.items()}
  times = {k: [] for k in runs}
  for _ in range(rounds):
    for k, (step, _, batch) in runs.items():
      t = time.perf_counter()
      for _ in range(steps):
        states[k] = step(states[k], batch)
      jax.block_until_ready(states[k])
      times[k].append(1e3 * (time.perf_counter() - t) / steps)
  return {k: statistics.median(v) for k, v in times.items()}


def main(argv):
  del argv
  config = _CONFIG.value
  print(f"{config.model}, batch {_BATCH.value or config.batch_size}, "
        f"{jax.devices()[0].device_kind}, "
        f"impl {config.kernels.impl}")
  print("| budget | block-sparse ms | dense ms | ratio |\n|---|---|---|---|")
  for share in map(float, _BUDGETS.value):
    specs = sparse_specs(config, share)
    runs = {path: train_step(config, specs, dense_from)
            for path, dense_from in (("bsr", None), ("dense", 0.0))}
    ms = median_ms(runs, _ROUNDS.value, _STEPS.value)
    print(f"| {share:g} | {ms['bsr']:.1f} | {ms['dense']:.1f} | "
          f"{ms['bsr'] / ms['dense']:.2f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
