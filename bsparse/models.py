"""Image classifiers whose weight layers come from a ``LayerFactory``.

Every weight layer is created through the factory with a stable, flat name (``fc1``,
``stage2_block0_conv1``, ``block3_attn_qkv``, ...), so one model runs dense or
block-sparse and per-layer block shapes and ranks are set by name. Models take NHWC float
images and return logits ``(batch, num_classes)``.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bsparse import kron
from bsparse.layers import LayerFactory


class MLP(nn.Module):
  """Fully connected net on flattened images; LeNet-300-100 by default.

  Layers: ``fc1 .. fc{len(hidden)}``, ``head``.
  """
  layers: LayerFactory
  num_classes: int
  hidden: Sequence[int] = (300, 100)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.hidden, start=1):
      x = nn.relu(self.layers.dense(width, f"fc{i}")(x))
    return self.layers.dense(self.num_classes, "head")(x)


def max_pool(x: jax.Array, size: int) -> jax.Array:
  """``size x size`` max-pooling with stride ``size`` of NHWC ``x``, as ``nn.max_pool`` with
  VALID padding (trailing rows and columns that do not fill a window are dropped).

  Written as a max over reshaped axes: its gradient is a comparison with the broadcast
  maximum, where ``nn.max_pool``'s (select-and-scatter) becomes a scatter on XLA:CPU with an
  index array per element. On the CNN's train step at batch 128 that scatter held 78 of its
  135 MB of temporaries and made the step 1.5x slower (docs/study_notes.md). A window with
  tied maxima shares its gradient between them instead of giving it all to the first one;
  after a ReLU the only likely tie is at zero, where the ReLU passes no gradient anyway.
  """
  b, h, w, c = x.shape
  x = x[:, :h - h % size, :w - w % size]
  return x.reshape(b, h // size, size, w // size, size, c).max(axis=(2, 4))


class CNN(nn.Module):
  """Small CNN for 28x28 inputs: (3x3 conv, ReLU, 2x2 max-pool) per entry of ``features``,
  then a dense hidden layer and the head.

  Layers: ``conv1 .. conv{len(features)}``, ``fc1``, ``head``.
  """
  layers: LayerFactory
  num_classes: int
  features: Sequence[int] = (32, 64)
  hidden: int = 128

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, width in enumerate(self.features, start=1):
      x = nn.relu(self.layers.conv(width, (3, 3), f"conv{i}", use_bias=True)(x))
      x = max_pool(x, 2)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(self.layers.dense(self.hidden, "fc1")(x))
    return self.layers.dense(self.num_classes, "head")(x)


class ResNet(nn.Module):
  """CIFAR-style ResNet with basic blocks; ResNet-20 by default.

  3x3 stem without max-pool, stages of basic blocks (stride 2 at the first block of every
  stage after the first), 1x1 projection shortcuts where the shape changes, global average
  pooling. Layers: ``stem``, ``stage{s}_block{b}_conv1``, ``stage{s}_block{b}_conv2``,
  ``stage{s}_block{b}_proj`` (projections only), ``head``; each conv is followed by a
  BatchNorm named ``<conv>_bn``.
  """
  layers: LayerFactory
  num_classes: int
  stage_sizes: Sequence[int] = (3, 3, 3)
  widths: Sequence[int] = (16, 32, 64)

  @nn.compact
  def __call__(self, x, train: bool = False):
    if len(self.stage_sizes) != len(self.widths):
      raise ValueError(f"ResNet: stage_sizes {tuple(self.stage_sizes)} and widths "
                       f"{tuple(self.widths)} must have the same length.")
    x = nn.relu(self._conv_bn(x, self.widths[0], (3, 3), "stem", (1, 1), train))
    for s, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths), start=1):
      for b in range(blocks):
        strides = (2, 2) if s > 1 and b == 0 else (1, 1)
        x = self._block(x, width, strides, f"stage{s}_block{b}", train)
    x = jnp.mean(x, axis=(1, 2))
    return self.layers.dense(self.num_classes, "head")(x)

  def _conv_bn(self, x, features, kernel_size, name, strides, train):
    x = self.layers.conv(features, kernel_size, name, strides=strides)(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        name=f"{name}_bn")(x)

  def _block(self, x, features, strides, name, train):
    y = nn.relu(self._conv_bn(x, features, (3, 3), f"{name}_conv1", strides, train))
    y = self._conv_bn(y, features, (3, 3), f"{name}_conv2", (1, 1), train)
    if strides != (1, 1) or x.shape[-1] != features:
      x = self._conv_bn(x, features, (1, 1), f"{name}_proj", strides, train)
    return nn.relu(x + y)


class ViT(nn.Module):
  """Vision Transformer (pre-norm); ViT-Tiny sizes by default.

  Non-overlapping ``patch_size`` patches are flattened and embedded by a dense layer, a
  learned position embedding is added, and ``pool`` picks a class token (``'cls'``) or the
  mean of the patch tokens (``'mean'``). Layers: ``patch_embed``, ``block{i}_attn_qkv``,
  ``block{i}_attn_out``, ``block{i}_mlp_fc1``, ``block{i}_mlp_fc2`` for ``i < depth``,
  ``head``.
  """
  layers: LayerFactory
  num_classes: int
  patch_size: int = 4
  dim: int = 192
  depth: int = 12
  heads: int = 3
  mlp_dim: int = 768
  pool: str = "cls"

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.pool not in ("cls", "mean"):
      raise ValueError(f"ViT: pool must be 'cls' or 'mean', got '{self.pool}'.")
    if self.dim % self.heads:
      raise ValueError(f"ViT: dim {self.dim} is not divisible by heads {self.heads}.")
    x = self.layers.dense(self.dim, "patch_embed")(self._patches(x))
    if self.pool == "cls":
      cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.dim))
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.dim)).astype(x.dtype),
                           x], axis=1)
    pos = self.param("pos_embed", kron.normal_init(0.02), (1, *x.shape[1:]))
    x = x + pos.astype(x.dtype)
    for i in range(self.depth):
      x = x + self._attention(nn.LayerNorm(name=f"block{i}_ln1")(x), f"block{i}_attn")
      x = x + self._mlp(nn.LayerNorm(name=f"block{i}_ln2")(x), f"block{i}_mlp")
    x = nn.LayerNorm(name="norm")(x)
    x = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
    return self.layers.dense(self.num_classes, "head")(x)

  def _patches(self, x):
    n, h, w, c = x.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"ViT: patch_size {p} does not divide the {h}x{w} input.")
    x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // p) * (w // p), p * p * c)

  def _attention(self, x, name):
    n, t, _ = x.shape
    qkv = self.layers.dense(3 * self.dim, f"{name}_qkv")(x)
    qkv = qkv.reshape(n, t, 3, self.heads, self.dim // self.heads)
    y = nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return self.layers.dense(self.dim, f"{name}_out")(y.reshape(n, t, self.dim))

  def _mlp(self, x, name):
    x = nn.gelu(self.layers.dense(self.mlp_dim, f"{name}_fc1")(x))
    return self.layers.dense(self.dim, f"{name}_fc2")(x)


MODELS = {
    "mlp": MLP,
    "cnn": CNN,
    "resnet20": functools.partial(ResNet, stage_sizes=(3, 3, 3), widths=(16, 32, 64)),
    "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2),
                                  widths=(64, 128, 256, 512)),
    "vit_tiny": functools.partial(ViT, dim=192, depth=12, heads=3, mlp_dim=768),
}


def create_model(name: str, layers: LayerFactory, num_classes: int, **kwargs) -> nn.Module:
  """Builds the model registered as ``name``; ``kwargs`` override its attributes."""
  if name not in MODELS:
    raise ValueError(f"unknown model '{name}'; valid: {sorted(MODELS)}.")
  return MODELS[name](layers=layers, num_classes=num_classes, **kwargs)


def weight_layer_names(model: nn.Module, input_shape: Sequence[int]) -> tuple[str, ...]:
  """Names of the weight layers of ``model`` on inputs of ``input_shape``, in call order.

  Traces ``model.init`` abstractly (no arrays are built) and keeps the submodules that own
  a dense/conv ``kernel`` or a KPD term; nested paths are joined by ``/``.
  """
  order = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      order.append(context.module.path)
    return next_fun(*args, **kwargs)

  def init(x):
    with nn.intercept_methods(record):
      return model.init(jax.random.key(0), x)

  params = jax.eval_shape(init, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
  weights = set(_weight_layers(params["params"], ()))
  return tuple("/".join(path) for path in dict.fromkeys(order) if path in weights)


def _weight_layers(tree, path):
  for key, node in tree.items():
    if not hasattr(node, "items"):
      continue
    if "kernel" in node or any(_is_term(child) for child in node.values()):
      yield path + (key,)
    else:
      yield from _weight_layers(node, path + (key,))


def _is_term(node) -> bool:
  return hasattr(node, "keys") and {"S", "A", "B"} <= set(node.keys())
