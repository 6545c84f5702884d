r"""Train-step time of a trained run's model with each ``bsr_matmul`` implementation.

  python -m benchmarks.train_step --workdir=runs/study/cnn/kpd_r4_bsr_cubic_d0.1_s0

Restores the newest checkpoint of ``--workdir`` (for a run with ``sparsity.finetune=bsr``
past its switch, the block-sparse model), builds its train step once per implementation
in ``--impls`` and times them side by side on one batch of the run's data: each row is
the median over ``--rounds`` interleaved rounds of ``--steps`` steps, each step on the
state the previous one returned (on the same batch). Nothing is written to the workdir.
"""
from __future__ import annotations

import statistics

from absl import app, flags
import jax
import numpy as np

from benchmarks.timing import time_steps
from bsparse import checkpoints, data, train_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run's directory (required).")
_IMPLS = flags.DEFINE_list("impls", ["cpu", "xla"], "bsr_matmul implementations to time.")
_STEPS = flags.DEFINE_integer("steps", 5, "Steps per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds (the median is reported).")


def restored_step(workdir: str, config, impl: str, datasets):
  """``(train step, state, batch)`` of ``workdir``'s newest checkpoint, built for ``impl``."""
  config = config.copy_and_resolve_references()
  config.kernels.impl = impl
  state, program, _ = train_lib.read_program(config, workdir, datasets)
  n = config.batch_size
  batch = program.steps.put_batch({"image": datasets.train["image"][:n].astype(np.float32),
                                   "label": datasets.train["label"][:n]})
  return program.steps.train, state, batch


def main(argv):
  del argv
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required: the directory of a trained run.")
  config = checkpoints.load_config(_WORKDIR.value)
  datasets = data.get_datasets(config)
  runs = {impl: restored_step(_WORKDIR.value, config, impl, datasets)
          for impl in _IMPLS.value}
  times, _ = time_steps(runs, _ROUNDS.value, _STEPS.value)
  print(f"{_WORKDIR.value}: batch {config.batch_size}, jax {jax.__version__}, "
        f"backend {jax.default_backend()}")
  print("| impl | step ms (median) | min | max |\n|---|---|---|---|")
  for impl, ts in times.items():
    print(f"| {impl} | {statistics.median(ts):.1f} | {min(ts):.1f} | {max(ts):.1f} |")


if __name__ == "__main__":
  app.run(main)
