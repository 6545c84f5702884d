"""Shared test helpers."""
import importlib
import os
import shutil

import tensorflow_datasets as tfds

from bsparse import checkpoints, sparsity, train_lib


def restore(c, workdir, steps_per_epoch: int = 4):
  """The state in the newest intact checkpoint of ``workdir`` of a tiny Fashion-MNIST-shaped
  config ``c``, restored as eval.py does (read-only, nothing set aside)."""
  model = train_lib.build_model(c, 10)
  tx, _, _ = sparsity.make_optimizer(c, steps_per_epoch, c.num_train_steps)
  # A concrete target carries a sharding, so checkpoints of any process count restore.
  state = train_lib.create_state(train_lib.init_variables(model, (28, 28, 1), c.seed), tx)
  manager = checkpoints.checkpoint_manager(str(workdir), c, read_only=True)
  try:
    return checkpoints.restore_latest(manager, state, set_aside=False)
  finally:
    manager.close()


def tiny(name: str, steps: int = 3, **changes):
  """A config file's config shrunk to ``steps`` steps of batch 8 on mock data (4 steps
  per epoch with 48 mock examples), then ``changes`` (flattened keys) applied."""
  c = importlib.import_module(f"configs.{name}").get_config()
  c.dataset.source = "tfds"
  c.dataset.val_size = 16
  c.batch_size = 8
  c.eval_batch_size = 16
  c.num_train_steps = steps
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.progress_bar = False
  c.plots = False
  c.optimizer.warmup_epochs = 0.0
  c.sparsity.start_epoch = 0.0
  c.sparsity.ramp_epochs = 0.0
  c.sparsity.freeze_epoch = -1.0
  if c.model == "mlp":
    c.model_kwargs.hidden = (40, 20)  # 28x10 and 10x10 blocks still divide
  if c.model.startswith("resnet"):
    c.model_kwargs.stage_sizes = (1, 1, 1)  # one block per stage: same layer kinds, less compile
  if c.model == "vit_tiny":
    c.model_kwargs.update(dim=32, depth=1, heads=2, mlp_dim=64)
  c.update_from_flattened_dict(changes)
  return c


def train(c, workdir, num_examples: int = 48):
  """``train_and_evaluate`` of a ``tiny`` config on mock data."""
  with tfds.testing.mock_data(num_examples=num_examples):
    return train_lib.train_and_evaluate(c, str(workdir))


def restored(c, workdir, steps_per_epoch: int = 4):
  """``(state, program)`` of the newest checkpoint of a ``tiny`` run, as eval.py gets them
  (the program of the model that checkpoint holds)."""
  manager = checkpoints.checkpoint_manager(str(workdir), c, read_only=True)
  try:
    state, program, _ = train_lib.restore_program(
        c, str(workdir), manager, 10, (28, 28, 1), steps_per_epoch, c.num_train_steps,
        set_aside=False)
  finally:
    manager.close()
  return state, program


def copy_up_to(src, dst, step: int):
  """A copy of workdir ``src`` (a pathlib path) as if its run had been killed after
  saving checkpoint ``step``."""
  shutil.copytree(src, dst)
  for name in os.listdir(dst / "checkpoints"):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(dst / "checkpoints" / name)
  os.remove(dst / "summary.json")
  return dst
