"""Tests for the model zoo: shapes, layer names, BatchNorm, training signal, KPD sizes."""
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsparse import models
from bsparse.layers import LayerFactory, term_name

NUM_CLASSES = 10
TINY_VIT = dict(dim=32, depth=2, heads=2, mlp_dim=64)
SMALL_RESNET18 = dict(widths=(16, 16, 32, 32))


def _resnet_names(stage_sizes):
  names = ["stem"]
  for s, blocks in enumerate(stage_sizes, start=1):
    for b in range(blocks):
      names += [f"stage{s}_block{b}_conv1", f"stage{s}_block{b}_conv2"]
      if s > 1 and b == 0:
        names.append(f"stage{s}_block{b}_proj")
  return names + ["head"]


def _vit_names(depth):
  blocks = [f"block{i}_{part}" for i in range(depth)
            for part in ("attn_qkv", "attn_out", "mlp_fc1", "mlp_fc2")]
  return ["patch_embed"] + blocks + ["head"]


# name, model kwargs, input shape, KPD block shape, layers kept dense, expected layer names
CASES = {
    "mlp": ({}, (2, 28, 28, 1), (4, 4), ("head",), ["fc1", "fc2", "head"]),
    "cnn": ({}, (2, 28, 28, 1), (8, 8), ("conv1", "head"), ["conv1", "conv2", "fc1", "head"]),
    "resnet20": ({}, (2, 32, 32, 3), (8, 8), ("stem", "head"), _resnet_names((3, 3, 3))),
    "resnet18": (SMALL_RESNET18, (2, 16, 16, 3), (8, 8), ("stem", "head"),
                 _resnet_names((2, 2, 2, 2))),
    "vit_tiny": (TINY_VIT, (2, 32, 32, 3), (8, 8), ("head",), _vit_names(2)),
}


def _factory(kind, name):
  _, _, block_shape, dense_layers, _ = CASES[name]
  return LayerFactory(kind=kind, block_shape=block_shape, dense_layers=dense_layers)


def _build(kind, name):
  kwargs, shape, *_ = CASES[name]
  model = models.create_model(name, _factory(kind, name), NUM_CLASSES, **kwargs)
  x = jax.random.normal(jax.random.key(1), shape)
  return model, x


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("kind", ["dense", "kpd"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_shape_and_layer_names(name, kind):
  model, x = _build(kind, name)
  variables = model.init(jax.random.key(0), x)
  logits = model.apply(variables, x)
  assert logits.shape == (x.shape[0], NUM_CLASSES)
  assert np.all(np.isfinite(logits))
  names = models.weight_layer_names(model, x.shape)
  assert list(names) == CASES[name][-1]
  params = variables["params"]
  for layer in names:
    sparse = kind == "kpd" and layer not in CASES[name][3]
    assert ("kernel" in params[layer]) != sparse, layer
    if sparse:
      assert term_name(CASES[name][2]) in params[layer], layer


@pytest.mark.parametrize("name", sorted(CASES))
def test_kpd_has_fewer_params(name):
  kwargs, shape, *_ = CASES[name]
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  counts = {}
  for kind in ("dense", "kpd"):
    model = models.create_model(name, _factory(kind, name), NUM_CLASSES, **kwargs)
    counts[kind] = _count(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
  assert counts["kpd"] < counts["dense"]


@pytest.mark.parametrize("kind", ["dense", "kpd"])
def test_resnet_batch_stats_update_in_train_mode(kind):
  model, x = _build(kind, "resnet20")
  variables = model.init(jax.random.key(0), x)
  logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert logits.shape == (x.shape[0], NUM_CLASSES)
  before = variables["batch_stats"]
  after = updates["batch_stats"]
  assert jax.tree.structure(before) == jax.tree.structure(after)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after)
  assert all(jax.tree.leaves(changed))
  # Eval mode uses the running averages: each example is independent of the batch.
  eval_vars = {**variables, "batch_stats": after}
  full = model.apply(eval_vars, x)
  np.testing.assert_allclose(model.apply(eval_vars, x[:1]), full[:1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "kpd"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_gradient_steps_reduce_loss(name, kind):
  model, _ = _build(kind, name)
  x = jax.random.normal(jax.random.key(2), (8, 28, 28, 1))
  labels = jnp.arange(8) % NUM_CLASSES
  params = model.init(jax.random.key(0), x)["params"]

  def loss_fn(p):
    logits = model.apply({"params": p}, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  @jax.jit
  def step(p):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    return jax.tree.map(lambda w, g: w - 0.01 * g, p, grads), loss

  losses = []
  for _ in range(5):
    params, loss = step(params)
    losses.append(float(loss))
  assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_unknown_model_lists_valid_names():
  with pytest.raises(ValueError, match="unknown model 'resnet99'") as err:
    models.create_model("resnet99", LayerFactory(), NUM_CLASSES)
  for name in models.MODELS:
    assert name in str(err.value)


def test_bad_block_shape_names_layer():
  layers = LayerFactory(kind="kpd", block_shape=(4, 4), block_shapes={"fc2": (3, 3)})
  model = models.create_model("mlp", layers, NUM_CLASSES)
  with pytest.raises(ValueError, match="fc2"):
    models.weight_layer_names(model, (1, 28, 28, 1))


def test_per_layer_block_shape_and_rank_by_name():
  layers = LayerFactory(kind="kpd", block_shape=(4, 4), block_shapes={"fc1": (16, 4)},
                        ranks={"fc1": 2}, dense_layers=("head",))
  model = models.create_model("mlp", layers, NUM_CLASSES)
  x = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  assert params["fc1"]["kron_16x4"]["A"].shape == (2, 49, 75)
  assert params["fc2"]["kron_4x4"]["A"].shape == (1, 75, 25)


def test_create_model_forwards_kwargs():
  model = models.create_model("mlp", LayerFactory(), NUM_CLASSES, hidden=(64,))
  assert models.weight_layer_names(model, (1, 28, 28, 1)) == ("fc1", "head")
  model = models.create_model("resnet18", LayerFactory(), NUM_CLASSES, widths=(8, 8, 8, 8))
  assert isinstance(model, models.ResNet)
  assert model.stage_sizes == (2, 2, 2, 2) and model.widths == (8, 8, 8, 8)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_on_28x28_with_patch_7(pool):
  layers = LayerFactory(kind="kpd", block_shape=(8, 8), dense_layers=("patch_embed", "head"))
  model = models.create_model("vit_tiny", layers, NUM_CLASSES, patch_size=7, pool=pool,
                              **TINY_VIT)
  x = jnp.ones((2, 28, 28, 1))
  variables = model.init(jax.random.key(0), x)
  assert variables["params"]["pos_embed"].shape == (1, 16 + (pool == "cls"), 32)
  assert model.apply(variables, x).shape == (2, NUM_CLASSES)


def test_vit_rejects_patch_that_does_not_divide_input():
  model = models.create_model("vit_tiny", LayerFactory(), NUM_CLASSES, patch_size=5,
                              **TINY_VIT)
  with pytest.raises(ValueError, match="patch_size 5"):
    models.weight_layer_names(model, (1, 28, 28, 1))


@pytest.mark.parametrize("shape,size", [((2, 28, 28, 3), 2), ((3, 7, 9, 5), 2),
                                        ((1, 14, 13, 2), 3), ((2, 5, 5, 1), 5)])
def test_max_pool_matches_flax_forward_and_gradient(shape, size):
  x = jax.random.normal(jax.random.key(sum(shape)), shape)  # no ties: one max per window
  cot = jax.random.normal(jax.random.key(1), models.max_pool(x, size).shape)

  def ref(x):
    return nn.max_pool(x, (size, size), strides=(size, size))

  np.testing.assert_array_equal(models.max_pool(x, size), ref(x))
  got = jax.grad(lambda x: jnp.sum(models.max_pool(nn.relu(x), size) * cot))(x)
  want = jax.grad(lambda x: jnp.sum(ref(nn.relu(x)) * cot))(x)
  np.testing.assert_array_equal(got, want)  # each window's gradient lands on its maximum


def test_max_pool_gradient_has_no_scatter():
  # The point of writing it by hand: nn.max_pool's gradient is a select-and-scatter, which
  # XLA:CPU turns into a scatter with an index array per element.
  def grad_hlo(pool):
    x = jnp.zeros((4, 28, 28, 8))
    return jax.jit(jax.grad(lambda x: jnp.sum(pool(x) ** 2))).lower(x).as_text()

  assert "scatter" not in grad_hlo(lambda x: models.max_pool(x, 2))
  assert "select_and_scatter" in grad_hlo(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)))


def test_max_pool_benchmark_times_both_forms_with_the_same_gradient():
  cmd = [sys.executable, "-m", "benchmarks.max_pool", "--batches=2", "--rounds=1",
         "--calls=1"]
  root = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run(cmd, check=True, cwd=root, capture_output=True, text=True,
                       timeout=300).stdout
  rows = [r.split("|")[1:-1] for r in out.splitlines() if r.startswith("| cnn")]
  assert [(r[0].strip(), r[2].strip()) for r in rows] == [
      (layer, form) for layer in ("cnn pool1", "cnn pool2")
      for form in ("nn.max_pool", "models.max_pool")]
  assert all(float(r[4]) > 0 and r[6].strip() == "0" for r in rows)
