r"""Trains a dense or block-sparse (KPD) model.

  python train.py --config=configs/mlp_fmnist.py --workdir=runs/mlp_fmnist \
      --config.sparsity.lam=2e-3

Running the same command again resumes from the latest checkpoint in --workdir; SIGTERM
or Ctrl-C saves a checkpoint first. See docs/troubleshooting.md when things go wrong.

The same command runs as several processes (TPU pod slices, SLURM, or
--coordinator_address/--num_processes/--process_id): see docs/multihost.md.
"""
import os
import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from bsparse import cli, distributed, train_lib

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and plots "
    "(default: runs/<config file name>).")
_CONFIG = config_flags.DEFINE_config_file("config", "configs/mlp_fmnist.py",
                                          "Path to a config file with get_config().")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Start afresh: move an existing --workdir aside to "
    "<workdir>.old-<time> (nothing is deleted). Without it, a workdir whose checkpoints "
    "belong to a different config is refused.")


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("runs", name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_logging(sys.argv)
  train_lib.configure_host(_CONFIG.value)  # before JAX starts its threads
  distributed.initialize_from_flags()
  workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
  logging.info("JAX devices: %s; workdir: %s", jax.devices(), workdir)
  summary = train_lib.train_and_evaluate(_CONFIG.value, workdir, overwrite=_OVERWRITE.value)
  if jax.process_index() == 0:
    print(f"test accuracy {summary['test/accuracy']:.4f}"
          + (f", weight density {summary['density/weights']:.3f}"
             if "density/weights" in summary else "") + f"  (workdir: {workdir})")


if __name__ == "__main__":
  app.run(cli.clean_exit(main), flags_parser=cli.parse_flags)
