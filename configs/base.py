"""Defaults shared by every config; each config file edits a copy in its get_config()."""
from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.seed = 0
  c.model = "mlp"  # mlp | cnn | resnet20 | resnet18 | vit_tiny
  c.model_kwargs = config_dict.ConfigDict()

  c.dataset = config_dict.ConfigDict()
  c.dataset.name = "fashion_mnist"  # fashion_mnist | mnist | cifar10 | cifar100
  c.dataset.source = "auto"  # auto | debian | tfds
  c.dataset.data_dir = config_dict.placeholder(str)  # TFDS data_dir
  c.dataset.download = True  # let TFDS download when the data is missing
  c.dataset.val_size = 5000  # carved from train for model selection
  c.dataset.augment = False  # random crop + flip (CIFAR)

  c.batch_size = 128  # global, over all devices and processes
  # Divides 8-, 16- and 32-device meshes. At 1000 the block-sparse CNN's evaluation program
  # held 189 MB of XLA temporaries (256: 88 MB); each evaluation raised RSS by ~200 MB.
  c.eval_batch_size = 256
  c.num_epochs = 12.0
  c.num_train_steps = -1  # > 0 overrides num_epochs
  c.compute_dtype = "float32"  # float32 | bfloat16 | float16
  c.label_smoothing = 0.0
  c.nan_policy = "stop"  # NaN/Inf loss or gradients: stop | skip (the step, counted)
  # XLA:CPU's fusion emitters. False compiles the train and eval steps with the older
  # emitters: far less compile memory (the KPD MLP's factored step: 410 against 555 MB of
  # peak RSS) but slower convolutions (the CNN's steps 3-4%). The Fashion-MNIST configs
  # set False. No effect off CPU.
  c.xla_cpu_fusion_emitters = True
  # glibc malloc of the host process (bsparse/memory.py; no effect without glibc). Its
  # defaults keep what XLA frees: an arena per allocating thread and an mmap threshold
  # that adapts upward. Two arenas lowered the KPD CNN's compile peak by ~60 MB. A fixed
  # threshold (128) returns freed buffers too, but every step then maps and faults in its
  # large buffers afresh: the rank-32 MLP trained 2.4x slower.
  c.host_malloc = config_dict.ConfigDict()
  c.host_malloc.arena_max = 2  # 0: glibc's default, 8 per core
  c.host_malloc.mmap_threshold_kb = -1  # blocks this large go to mmap; -1: adaptive

  c.optimizer = config_dict.ConfigDict()
  c.optimizer.name = "adamw"  # adamw | sgd
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = "cosine"  # cosine | constant
  c.optimizer.warmup_epochs = 0.5
  c.optimizer.weight_decay = 1e-4  # dense kernels and KPD factors A, B
  c.optimizer.momentum = 0.9  # sgd only
  c.optimizer.grad_clip = 0.0  # global-norm clip; 0 = off
  c.optimizer.factor_lr_scale = 1.0  # KPD factors A, B step at this times the learning rate

  # Weight layers: 'dense' or 'kpd' (W = sum_k (S * A_k) kron B_k, block = shape of B).
  c.layers = config_dict.ConfigDict()
  c.layers.kind = "kpd"
  c.layers.block_shape = (4, 4)  # default (rows, cols) of a block
  c.layers.rank = 4
  c.layers.block_shapes = config_dict.ConfigDict()  # per layer name: (rows, cols)
  c.layers.ranks = config_dict.ConfigDict()  # per layer name: rank
  c.layers.dense_layers = ("head",)  # layers kept dense

  # Proximal L1 on selectors S; see bsparse/sparsity.py.
  c.sparsity = config_dict.ConfigDict()
  c.sparsity.lam = 0.0  # |S| shrinkage per step at peak learning rate
  c.sparsity.start_epoch = 0.0  # penalty is 0 before this
  c.sparsity.ramp_epochs = 1.0  # then ramps linearly to lam
  c.sparsity.freeze_epoch = -1.0  # mask fixed from here on (< 0: never)
  c.sparsity.target_density = 1.0  # at the freeze, prune each layer to this block density
  # once: top-k at the freeze; cubic: from start_epoch to the freeze, every
  # prune_every_steps, on the cubic schedule of the gradual baseline (Zhu & Gupta).
  c.sparsity.prune_schedule = "once"
  c.sparsity.prune_every_steps = 100
  c.sparsity.penalty_after_freeze = False
  # l1: every block shrinks; trimmed: each layer's target_density * blocks largest blocks
  # are spared, so the penalty cannot take a layer below its target (bsparse/sparsity.py).
  c.sparsity.penalty = "l1"
  # After the freeze: keep training the factors (kpd: every block stays in the span of the
  # rank-r basis B_k) or the kept blocks themselves in block-sparse form (bsr: free blocks,
  # nnz*bm*bn MACs per position; see bsparse/finetune.py).
  c.sparsity.finetune = "kpd"
  # bsr with cubic pruning only: switch to block-sparse form at this epoch, before the
  # freeze, and prune the free blocks on to the target (bsparse/finetune.py). < 0: switch
  # at the freeze.
  c.sparsity.switch_epoch = -1.0
  # After an early switch, also repack the free blocks every this many steps until the
  # freeze, so the stored blocks (and a step's cost) follow the pruning instead of staying
  # at the switch's density until the freeze (one re-jit each). 0: only at the freeze.
  c.sparsity.repack_every_steps = 0
  # After the switch to block-sparse form the optimizer's moments start over; the learning
  # rate warms up again from 0 over this many epochs (0: none; sparsity.rewarmed).
  c.sparsity.switch_warmup_epochs = 0.25

  # Block-size selection in one run: a layer given several candidate block shapes
  # (layers.block_shapes.<layer> = ((28, 10), (14, 10))) sums one KPD term per candidate.
  # From start_epoch the penalty on each candidate grows with its deficit of weight norm
  # (annealed in over anneal_epochs, scaled by strength). At select_epoch - fade_epochs each
  # layer picks its largest candidate; the others stop training and fade out linearly, so
  # the winner takes the layer over while training goes on, and at select_epoch they are
  # dropped from the model (fade_epochs 0: zeroed at once).
  c.selection = config_dict.ConfigDict()
  c.selection.start_epoch = 1.0
  c.selection.anneal_epochs = 1.5
  c.selection.strength = 4.0
  c.selection.select_epoch = 3.0  # < 0: never (candidates keep summing)
  c.selection.fade_epochs = 0.5

  # Training method: kpd (KPD layers + c.sparsity) or a baseline on dense layers
  # (layers.kind='dense'; see bsparse/baselines.py): dense | group_lasso | gradual | set |
  # rigl | static.
  c.method = "kpd"
  c.baseline = config_dict.ConfigDict()
  c.baseline.target_density = 0.5  # final block density of every masked layer
  c.baseline.lam = 3e-4  # group_lasso: block-norm shrinkage per step at peak learning rate
  c.baseline.prune_epoch = 4.0  # group_lasso: prune to target here, then fine-tune, no penalty
  c.baseline.start_epoch = 1.0  # gradual: first pruning step
  c.baseline.end_epoch = 8.0  # gradual: target reached; set/rigl: last mask update
  c.baseline.update_every_steps = 100  # gradual, set, rigl: steps between mask updates
  c.baseline.drop_fraction = 0.3  # set/rigl: share of active blocks replaced, cosine to 0
  # static: train the blocks this KPD workdir ended with (sparsity.finetune='bsr') from a
  # fresh initialisation instead of random ones; '' draws them at random.
  c.baseline.mask_from = ""

  c.kernels = config_dict.ConfigDict()
  c.kernels.impl = "auto"  # auto | xla | cpu | pallas_tpu | pallas_gpu
  # A block-sparse layer whose block budget is at least this share of its block grid
  # multiplies its blocks as a dense weight (above 1: always block-sparse). On a 2-core
  # Intel Xeon (AVX-512) the CNN's train step took 110 ms dense against 176 ms block-sparse
  # at a full budget, 85 vs 138 at 0.75, 92 vs 127 at 0.5 (python -m benchmarks.dense_from).
  # At 0.75 the budgets of an early switch, before a repack shrinks them, multiply densely,
  # and a model pruned to a block density of 0.5 or below stays block-sparse, in FLOPs as in
  # memory.
  c.kernels.dense_from = 0.75

  c.log_every_steps = 50
  c.eval_every_epochs = 1.0
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.progress_bar = True
  c.plots = True
  return c


def dense(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """Turns a KPD config into its dense counterpart (same model, data and budget)."""
  c.layers.kind = "dense"
  c.sparsity.lam = 0.0
  c.sparsity.freeze_epoch = -1.0
  c.sparsity.target_density = 1.0
  return c
