"""ResNet-20 on CIFAR-10 with block-sparse KPD convolutions (stem and head dense).

python train.py --config=configs/resnet_bs.py --config.sparsity.lam=1e-4
Use --config.model=resnet18 for ResNet-18.
"""
from configs import base


def get_config():
  c = base.get_config()
  c.model = "resnet20"
  c.dataset.name = "cifar10"
  c.dataset.augment = True
  c.batch_size = 128
  c.num_epochs = 100.0
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.weight_decay = 5e-4
  c.optimizer.warmup_epochs = 1.0
  c.layers.block_shape = (4, 4)
  c.layers.rank = 4
  c.layers.dense_layers = ("stem", "head")
  c.sparsity.lam = 1e-4
  c.sparsity.start_epoch = 5.0
  c.sparsity.ramp_epochs = 20.0
  c.sparsity.freeze_epoch = 60.0
  c.sparsity.target_density = 0.5
  c.eval_every_epochs = 5.0
  c.checkpoint_every_steps = 2000
  return c
