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
from bsparse import (checkpoints, cli, distributed, export, report, sparsity, train_lib,
                     validate)

_WORKDIR = flags.DEFINE_string("workdir", None, "The --workdir of a train.py run.",
                               required=True)
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "val"], "Split to evaluate.")
_SERVING = flags.DEFINE_bool(
    "serving", True, "For KPD models: also evaluate the block-sparse (BSR) form, time the "
    "factored, BSR and dense forms, and export the nonzero blocks to <workdir>/blocks.npz.")
_LATENCY_BATCH = flags.DEFINE_integer("latency_batch", 256, "Batch size for the latency runs.")


def serving_report(model, variables, split, config, image_shape) -> dict:
  """Accuracy of the BSR form and forward latency of the factored (KPD models), BSR and
  dense forms."""
  forms = export.serving_forms(model, jax.device_get(variables), (1, *image_shape))
  batches = list(data_lib.eval_batches(split, batch_size=config.eval_batch_size))
  x = next(data_lib.eval_batches(split, batch_size=_LATENCY_BATCH.value))["image"]
  out = {"bsr_accuracy": export.accuracy(*forms["bsr"], batches),
         "latency_ms": {k: export.latency_ms(m, v, x) for k, (m, v) in forms.items()},
         "latency_batch": int(x.shape[0]), "backend": jax.default_backend()}
  return out


def has_single_kpd_terms(params) -> bool:
  groups = sparsity.layer_groups(params)
  return bool(groups) and all(len(t) == 1 for t in groups.values())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_logging(sys.argv)
  workdir = _WORKDIR.value
  config = checkpoints.load_config(workdir)
  train_lib.configure_host(config)  # before JAX starts its threads
  distributed.initialize_from_flags()
  validate.validate_config(config, train_lib.build_model, training=False)
  datasets = data_lib.get_datasets(config)
  spe, total = train_lib.num_steps(config, len(datasets.train["label"]))
  manager = checkpoints.checkpoint_manager(workdir, config, read_only=True)
  if manager.latest_step() is None:
    raise SystemExit(f"No checkpoint in {workdir}/checkpoints: train first with train.py.")
  # Restoring into replicated arrays reads the checkpoint straight onto every device of
  # every process, whatever process count wrote it; after a block-size selection the
  # model is built with the chosen sizes.
  state, program, _ = train_lib.restore_program(
      config, workdir, manager, datasets.num_classes, datasets.image_shape, spe, total,
      set_aside=False)
  model, steps = program.model, program.steps
  split = datasets.test if _SPLIT.value == "test" else datasets.val
  if split is None:
    raise SystemExit("This run has no validation split (config.dataset.val_size = 0).")
  result = train_lib.evaluate(steps, state, split, config.eval_batch_size)

  variables = program.variables(state)
  rows = report.layer_table(model, variables, (1, *datasets.image_shape))
  out = {"step": int(state.step), f"{_SPLIT.value}/accuracy": result["accuracy"],
         f"{_SPLIT.value}/loss": result["loss"], "examples": result["examples"],
         "layers": rows, "totals": report.totals(rows)}
  if jax.process_index() == 0:
    print(f"{_SPLIT.value} accuracy {result['accuracy']:.4f} over {result['examples']} "
          f"examples (step {out['step']})\n")
    print(report.format_table(rows))
    print("\nMACs are per example, forward; kpd = factored, bsr = nonzero blocks only "
          "(a layer fine-tuned in block-sparse form has no factored form).")
    sparse_model = program.switch is not None or has_single_kpd_terms(state.params)
    if _SERVING.value and jax.process_count() == 1 and sparse_model:
      out["serving"] = serving_report(model, variables, split, config,
                                      datasets.image_shape)
      export.save_blocks(jax.device_get(state.params), os.path.join(workdir, "blocks.npz"),
                         jax.device_get(program.consts.get("bsr_index")))
      s = out["serving"]
      trained = "block-sparse" if program.switch is not None else "factored"
      print(f"\nblock-sparse form: {_SPLIT.value} accuracy {s['bsr_accuracy']:.4f} "
            f"(as trained, {trained}: {result['accuracy']:.4f}); nonzero blocks in "
            "blocks.npz")
      print(f"forward latency, batch {s['latency_batch']} on {s['backend']}: " + ", ".join(
          f"{k} {v:.2f} ms" for k, v in s["latency_ms"].items()))
    with open(os.path.join(workdir, "eval.json"), "w", encoding="utf-8") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  app.run(cli.clean_exit(main), flags_parser=cli.parse_flags)
