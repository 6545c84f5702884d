"""Small CNN on Fashion-MNIST; conv2 and fc1 block-sparse (conv1 has 1 input channel)."""
from configs import base


def get_config():
  c = base.get_config()
  c.model = "cnn"
  c.dataset.name = "fashion_mnist"
  c.num_epochs = 8.0
  # CPU: XLA's older emitters compile KPD's steps without the 116-143 MB peaks of the
  # fusion emitters (peak RSS 513 +- 4 against 564 +- 10 MB, seeds 0-2, docs/results_cnn6.md)
  # at 3-4% of step time; the baselines' results are the same to the bit, KPD's move within
  # its seeds' spread.
  c.xla_cpu_fusion_emitters = False
  c.layers.dense_layers = ("conv1", "head")
  c.layers.block_shapes.conv2 = (4, 4)  # 32x64 channel plane -> 8x16 grid, shared by 3x3 taps
  c.layers.block_shapes.fc1 = (16, 16)  # 3136x128 -> 196x8 grid
  c.layers.rank = 4
  c.layers.ranks.conv2 = 1  # its factored phase then costs ~1/4 of a dense conv (kron.conv_costs)
  # Factor entries are ~4x larger than dense weights here (fc1: 0.11 vs 0.025): 3x steps.
  # 2 epochs at density 0.1, lr 1e-2, seeds 0-2: 89.34/89.31/88.90% against 88.81/88.52/88.90%.
  c.optimizer.factor_lr_scale = 3.0
  c.sparsity.lam = 2e-3
  c.sparsity.start_epoch = 1.0
  c.sparsity.ramp_epochs = 2.0
  c.sparsity.freeze_epoch = 5.0
  c.sparsity.target_density = 0.5
  # Return freed buffers of 128 kB or more at once: without it the glance row's KPD run
  # crept from 612 to 658 MB of peak RSS by step 1700 (seed 1); its 100+ ms steps do not
  # notice the mapping, where the MLP's 2-5 ms steps ran 2.4x slower (configs/base.py).
  c.host_malloc.mmap_threshold_kb = 128
  return c
