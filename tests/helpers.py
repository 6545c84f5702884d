"""Shared test helpers."""
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
