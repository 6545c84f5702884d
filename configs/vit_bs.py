"""ViT-Tiny (patch 4) on CIFAR-10 with block-sparse attention and MLP projections."""
from configs import base


def get_config():
  c = base.get_config()
  c.model = "vit_tiny"
  c.model_kwargs.patch_size = 4
  c.dataset.name = "cifar10"
  c.dataset.augment = True
  c.batch_size = 128
  c.num_epochs = 100.0
  c.label_smoothing = 0.1
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 0.05
  c.optimizer.warmup_epochs = 5.0
  c.optimizer.grad_clip = 1.0
  c.layers.block_shape = (16, 16)
  c.layers.rank = 8
  c.layers.dense_layers = ("patch_embed", "head")
  c.sparsity.lam = 1e-4
  c.sparsity.start_epoch = 10.0
  c.sparsity.ramp_epochs = 20.0
  c.sparsity.freeze_epoch = 60.0
  c.sparsity.target_density = 0.5
  c.eval_every_epochs = 5.0
  c.checkpoint_every_steps = 2000
  return c
