r"""Evaluates a trained run: test accuracy and a per-layer block-sparsity report.

  python eval.py --workdir=runs/mlp_fmnist

Prints the table and writes it to <workdir>/eval.json. Runs as several processes with the
flags of train.py (docs/multihost.md).
"""
import json
import os
import sys

from absl import app, flags
import jax

from bsparse import data as data_lib
from bsparse import checkpoints, cli, distributed, report, sparsity, train_lib, validate

_WORKDIR = flags.DEFINE_string("workdir", None, "The --workdir of a train.py run.",
                               required=True)
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "val"], "Split to evaluate.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_logging(sys.argv)
  distributed.initialize_from_flags()
  workdir = _WORKDIR.value
  config = checkpoints.load_config(workdir)
  validate.validate_config(config, train_lib.build_model, training=False)
  datasets = data_lib.get_datasets(config)
  model = train_lib.build_model(config, datasets.num_classes)
  spe, total = train_lib.num_steps(config, len(datasets.train["label"]))
  tx, _, _ = sparsity.make_optimizer(config, spe, total)
  variables = train_lib.init_variables(model, datasets.image_shape, config.seed)
  manager = checkpoints.checkpoint_manager(workdir, config, read_only=True)
  if manager.latest_step() is None:
    raise SystemExit(f"No checkpoint in {workdir}/checkpoints: train first with train.py.")
  steps = train_lib.Steps(model, tx, datasets.num_classes, train_lib.make_mesh())
  # Restoring into replicated arrays reads the checkpoint straight onto every device of
  # every process, whatever process count wrote it.
  state = checkpoints.restore_latest(
      manager, steps.put_state(train_lib.create_state(variables, tx)), set_aside=False)
  split = datasets.test if _SPLIT.value == "test" else datasets.val
  if split is None:
    raise SystemExit("This run has no validation split (config.dataset.val_size = 0).")
  result = train_lib.evaluate(steps, state, split, config.eval_batch_size)

  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  rows = report.layer_table(model, variables, (1, *datasets.image_shape))
  out = {"step": int(state.step), f"{_SPLIT.value}/accuracy": result["accuracy"],
         f"{_SPLIT.value}/loss": result["loss"], "examples": result["examples"],
         "layers": rows, "totals": report.totals(rows)}
  if jax.process_index() == 0:
    print(f"{_SPLIT.value} accuracy {result['accuracy']:.4f} over {result['examples']} "
          f"examples (step {out['step']})\n")
    print(report.format_table(rows))
    print("\nMACs are per example, forward; kpd = factored, bsr = nonzero blocks only.")
    with open(os.path.join(workdir, "eval.json"), "w", encoding="utf-8") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  app.run(cli.clean_exit(main), flags_parser=cli.parse_flags)
