r"""Train-step time of a block-sparse model at block budgets from a full grid down, each
budget computed block-sparse and densely (``kernels.dense_from``), side by side.

  python -m benchmarks.dense_from                       # the CNN of configs/cnn_fmnist.py
  python -m benchmarks.dense_from --config=configs/mlp_fmnist.py --budgets=1,0.5,0.25

For each budget (a share of every sparse layer's block grid) the model of ``--config`` is
built in block-sparse form with a random mask of that many blocks per layer, and the
trainer's train step (``train_lib.Steps``, with Adam and the config's XLA options) is timed
with the blocks multiplied by the block-sparse kernels and with them scattered into a dense
weight (``benchmarks.timing.time_steps``). Each time is the median over ``--rounds``
interleaved rounds of ``--steps`` steps;
``ratio`` is block-sparse over dense time, so the dense path pays off above 1. The
crossover is where ``kernels.dense_from`` belongs on the machine.
"""
from __future__ import annotations

import dataclasses
import statistics

from absl import app, flags
import jax
import numpy as np
import optax
from ml_collections import config_flags

from benchmarks.timing import time_steps
from bsparse import train_lib
from bsparse.kernels import convert
from bsparse.kernels.layers import INDEX_COLLECTION

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cnn_fmnist.py", "Model config.")
_BUDGETS = flags.DEFINE_list("budgets", ["1", "0.75", "0.5", "0.4", "0.25", "0.1"],
                             "Block budgets, as shares of each sparse layer's block grid.")
_BATCH = flags.DEFINE_integer("batch", None, "Examples per step (default: the config's).")
_STEPS = flags.DEFINE_integer("steps", 5, "Steps per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds (the median is reported).")

IMAGE_SHAPE = (28, 28, 1)


def full_specs(config) -> dict[str, convert.LayerSpec]:
  """A ``LayerSpec`` per sparse layer of ``config``'s KPD model, holding its whole grid."""
  model = train_lib.build_model(config, 10)
  params = train_lib.init_variables(model, IMAGE_SHAPE, 0)["params"]
  return convert.bsr_layer_specs(params)  # selectors start nonzero: every block


def share_of(specs, share: float) -> dict[str, convert.LayerSpec]:
  """``specs`` with ``share`` of each layer's budget (at least one block)."""
  return {name: s._replace(nnz_max=max(1, round(share * s.nnz_max))) for name, s in specs.items()}


def train_step(config, specs, dense_from):
  """``(train step, state, batch)`` of the trainer (``train_lib.Steps``, with Adam) for the
  block-sparse model of ``specs``."""
  factory = dataclasses.replace(train_lib.layer_factory(config), kind="bsr",
                                bsr_specs=specs, dense_from=dense_from)
  model = train_lib.models.create_model(config.model, factory, 10, **config.model_kwargs)
  variables = train_lib.init_variables(model, IMAGE_SHAPE, 0)
  index = {INDEX_COLLECTION: variables[INDEX_COLLECTION]}
  tx, mesh = optax.adam(1e-3), train_lib.make_mesh()
  steps = train_lib.Steps(model, tx, 10, mesh, consts=index,
                          compiler_options=train_lib.compiler_options(config, mesh))
  state = steps.put_state(train_lib.create_state(variables, tx))
  rng, n = np.random.default_rng(0), _BATCH.value or config.batch_size
  batch = steps.put_batch({"image": rng.normal(size=(n, *IMAGE_SHAPE)).astype(np.float32),
                           "label": rng.integers(0, 10, n).astype(np.int32)})
  return steps.train, state, batch


def main(argv):
  del argv
  config = _CONFIG.value
  print(f"{config.model}, batch {_BATCH.value or config.batch_size}, "
        f"{jax.devices()[0].device_kind}, "
        f"impl {config.kernels.impl}")
  print("| budget | block-sparse ms | dense ms | ratio |\n|---|---|---|---|")
  full = full_specs(config)
  for share in map(float, _BUDGETS.value):
    specs = share_of(full, share)
    runs = {path: train_step(config, specs, dense_from)
            for path, dense_from in (("bsr", None), ("dense", 0.0))}
    times, _ = time_steps(runs, _ROUNDS.value, _STEPS.value)
    ms = {path: statistics.median(t) for path, t in times.items()}
    print(f"| {share:g} | {ms['bsr']:.1f} | {ms['dense']:.1f} | "
          f"{ms['bsr'] / ms['dense']:.2f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
