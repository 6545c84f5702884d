"""Block-sparse layers, and KPD -> BSR conversion giving the same model outputs."""
import math
import pathlib
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsparse.kernels import bsr, convert, cpu, ops
from bsparse.kernels import layers as bsr_layers
from bsparse.kernels.layers import INDEX_COLLECTION, BlockSparseConv, BlockSparseDense, patches
from bsparse.layers import KronConv, KronDense


def random_variables(layer, x, mask, seed=0):
  """Variables for a block-sparse layer without compiling its init."""
  shapes = jax.eval_shape(layer.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype),
                        shapes["params"])
  rows, cols, nnz = bsr.indices_from_mask(jnp.asarray(mask), layer.nnz_max)
  return {"params": params, INDEX_COLLECTION: {"rows": rows, "cols": cols, "nnz": nnz}}


def test_dense_layer_init_and_apply_match_its_dense_weight():
  layer = BlockSparseDense(24, (8, 6), nnz_max=5)
  x = jax.random.normal(jax.random.key(0), (2, 3, 16))
  v = jax.jit(layer.init)(jax.random.key(1), x)
  assert v["params"]["blocks"].shape == (5, 8, 6)
  idx = v[INDEX_COLLECTION]
  assert set(idx) == {"rows", "cols", "nnz"} and int(idx["nnz"]) == 5
  w = bsr.from_indices(v["params"]["blocks"], idx["rows"], idx["cols"], idx["nnz"], (16, 24))
  assert int(w.mask().sum()) == 5
  assert 0.0 < float(jnp.std(v["params"]["blocks"])) < 1.0
  y = jax.jit(layer.apply)(v, x)
  chex.assert_trees_all_close(y, x @ w.to_dense() + v["params"]["bias"], atol=1e-5)


def test_dense_layer_gradients_reach_only_blocks_and_bias():
  layer = BlockSparseDense(8, (4, 4), nnz_max=3)
  x = jax.random.normal(jax.random.key(0), (5, 8))
  v = random_variables(layer, x, np.array([[1, 0], [1, 1]], bool))
  loss = lambda p: jnp.sum(layer.apply({**v, "params": p}, x) ** 2)  # noqa: E731
  grads = jax.jit(jax.grad(loss))(v["params"])
  assert set(grads) == {"blocks", "bias"} and float(jnp.abs(grads["blocks"]).sum()) > 0


def test_changing_the_index_collection_does_not_recompile():
  layer = BlockSparseDense(16, (4, 4), nnz_max=6, use_bias=False)
  x = jnp.ones((2, 16))
  apply = jax.jit(layer.apply)
  for seed in range(3):
    mask = np.random.default_rng(seed).permutation(16).reshape(4, 4) < 2 + 2 * seed
    v = random_variables(layer, x, mask)
    idx = v[INDEX_COLLECTION]
    w = bsr.from_indices(v["params"]["blocks"], idx["rows"], idx["cols"], idx["nnz"], (16, 16))
    np.testing.assert_array_equal(w.mask(), mask)
    chex.assert_trees_all_close(apply(v, x), x @ w.to_dense(), atol=1e-5)
  assert apply._cache_size() == 1


def test_conv_layer_matches_lax_conv_with_its_kernel():
  layer = BlockSparseConv(12, (3, 3), (4, 6), nnz_max=3, strides=(2, 1), padding="VALID")
  x = jax.random.normal(jax.random.key(0), (2, 7, 6, 8))
  v = random_variables(layer, x, np.array([[1, 0], [1, 1]], bool))
  idx = jax.tree.map(np.asarray, v[INDEX_COLLECTION])
  blocks = np.asarray(v["params"]["blocks"])  # (3, 3, 3, 4, 6)
  kernel = np.zeros((3, 3, 8, 12), np.float32)
  for k in range(int(idx["nnz"])):
    i, j = idx["rows"][k], idx["cols"][k]
    kernel[:, :, i * 4:(i + 1) * 4, j * 6:(j + 1) * 6] += blocks[k]
  ref = jax.lax.conv_general_dilated(x, kernel, (2, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  chex.assert_trees_all_close(jax.jit(layer.apply)(v, x), ref + v["params"]["bias"], atol=1e-4)


def dense_kernel(v, kh, kw, cin, cout, block_shape):
  """The ``(kh, kw, cin, cout)`` kernel of a ``BlockSparseConv``'s variables."""
  idx = jax.tree.map(np.asarray, v[INDEX_COLLECTION])
  (bm, bn), blocks = block_shape, v["params"]["blocks"]
  kernel = jnp.zeros((kh, kw, cin, cout), blocks.dtype)
  for k in range(int(idx["nnz"])):
    i, j = idx["rows"][k], idx["cols"][k]
    kernel = kernel.at[:, :, i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].add(blocks[k])
  return kernel


def test_computes_dense_from_a_share_of_the_grid():
  assert bsr_layers.computes_dense(8, (4, 4), 0.5)
  assert not bsr_layers.computes_dense(7, (4, 4), 0.5)
  assert bsr_layers.computes_dense(1, (4, 4), 0.0)
  assert not bsr_layers.computes_dense(16, (4, 4), None)
  assert not bsr_layers.computes_dense(16, (4, 4), 1.5)


def _same_function(make, x, mask):
  """``make(dense_from)``'s layer multiplying densely (0) and block-sparse (None): the
  same outputs and gradients for ``x`` and every stored block, padding included."""
  dense, sparse = make(0.0), make(None)
  v = random_variables(sparse, x, mask)

  def loss(layer):
    def f(x, blocks):
      return jnp.sum(jnp.sin(layer.apply({**v, "params": {**v["params"], "blocks": blocks}}, x)))
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

  blocks = v["params"]["blocks"]
  (got, (gx, gb)), (want, (wx, wb)) = loss(dense)(x, blocks), loss(sparse)(x, blocks)
  chex.assert_trees_all_close((got, gx, gb), (want, wx, wb), atol=1e-4, rtol=1e-4)
  padding = int(v[INDEX_COLLECTION]["nnz"])
  assert padding < blocks.shape[0] and float(jnp.abs(gb[padding:]).max()) == 0.0


@pytest.mark.parametrize("shape,block,mask", [
    ((5, 8), (4, 4), [[1, 0], [1, 1]]),
    ((2, 3, 15), (5, 7), [[1, 0, 0], [0, 1, 1], [0, 0, 0]]),
    ((7, 6), (1, 2), [[1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0], [0, 1, 0], [1, 0, 0]])])
def test_dense_layer_multiplying_densely_is_the_same_function(shape, block, mask):
  mask = np.array(mask, bool)
  features = mask.shape[1] * block[1]
  make = lambda d: BlockSparseDense(features, block, nnz_max=int(mask.sum()) + 1,  # noqa: E731
                                    dense_from=d)
  _same_function(make, jax.random.normal(jax.random.key(0), shape), mask)


@pytest.mark.parametrize("hw,taps,strides,padding", [
    ((9, 9), (3, 3), (1, 1), "SAME"), ((8, 7), (3, 3), (2, 2), "SAME"),
    ((7, 6), (3, 2), (1, 2), "VALID"), ((9, 7), (3, 3), (2, 1), ((1, 0), (2, 1)))])
def test_conv_layer_multiplying_densely_is_the_same_function(hw, taps, strides, padding):
  make = lambda d: BlockSparseConv(12, taps, (4, 6), nnz_max=4, strides=strides,  # noqa: E731
                                   padding=padding, dense_from=d)
  _same_function(make, jax.random.normal(jax.random.key(0), (3, *hw, 8)),
                 np.array([[1, 0], [1, 1]], bool))


def test_a_budget_from_dense_from_multiplies_densely(monkeypatch):
  calls = []
  monkeypatch.setattr(bsr_layers, "bsr_matmul", lambda *a, **k: calls.append(1) or a[0][..., :8])
  x = jnp.ones((2, 8))
  for nnz_max, sparse_calls in ((2, 1), (3, 0), (4, 0)):  # 3 of 4 blocks: 0.75
    layer = BlockSparseDense(8, (4, 4), nnz_max=nnz_max, dense_from=0.75, use_bias=False)
    v = random_variables(layer, x, np.eye(2, dtype=bool))
    calls.clear()
    layer.apply(v, x)
    assert len(calls) == sparse_calls, nnz_max


@pytest.mark.parametrize("impl", ["xla", "cpu"])
@pytest.mark.parametrize("hw,taps,strides,padding", [
    ((14, 9), (3, 3), (1, 1), "SAME"), ((13, 7), (3, 3), (2, 2), "SAME"),
    ((11, 6), (3, 2), (1, 2), "VALID"), ((9, 7), (3, 3), (2, 1), ((1, 0), (2, 1)))])
def test_conv_in_slabs_matches_lax_conv_forward_and_gradients(monkeypatch, impl, hw, taps,
                                                              strides, padding):
  layer = BlockSparseConv(12, taps, (4, 6), nnz_max=4, strides=strides, padding=padding,
                          impl=impl)
  x = jax.random.normal(jax.random.key(0), (3, *hw, 8))
  v = random_variables(layer, x, np.array([[1, 0], [1, 1]], bool))
  _, ho, wo, _ = jax.eval_shape(layer.apply, v, x).shape
  row_bytes = 3 * wo * 8 * taps[0] * taps[1] * 4  # one output row's patches, f32
  monkeypatch.setattr(bsr_layers, "PATCH_BYTES", 2 * row_bytes)
  assert bsr_layers.slab_rows(ho, row_bytes) < ho  # the forward pass runs in slabs

  def loss(f):
    return lambda x, b: jnp.sum(jnp.sin(f(x, b)))

  def sparse(x, blocks):
    return layer.apply({**v, "params": {**v["params"], "blocks": blocks}}, x)

  def reference(x, blocks):
    kernel = dense_kernel({**v, "params": {"blocks": blocks}}, *taps, 8, 12, (4, 6))
    y = jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + v["params"]["bias"]

  blocks = v["params"]["blocks"]
  chex.assert_trees_all_close(jax.jit(sparse)(x, blocks), reference(x, blocks), atol=1e-4)
  got = jax.jit(jax.grad(loss(sparse), argnums=(0, 1)))(x, blocks)
  want = jax.grad(loss(reference), argnums=(0, 1))(x, blocks)
  chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cin,cout,block,taps,hw,strides,padding,mask", [
    (8, 12, (4, 6), (3, 3), (9, 7), (1, 1), "SAME", [[1, 0], [1, 1]]),
    (8, 12, (4, 6), (3, 2), (6, 11), (1, 1), "VALID", [[0, 0], [1, 1]]),  # an empty input block
    (6, 10, (2, 5), (1, 1), (5, 4), (1, 1), "SAME", [[1, 0], [0, 0], [0, 1]]),
    (3, 7, (1, 7), (5, 5), (8, 9), (1, 1), ((2, 0), (1, 3)), [[1], [0], [1]]),
    (8, 12, (4, 6), (3, 3), (9, 8), (1, 1), ((3, -1), (-1, 2)), [[1, 1], [0, 1]]),  # beyond a tap
    (16, 16, (16, 16), (2, 3), (1, 13), (1, 1), "SAME", [[1]]),  # a full grid: no padding
    (8, 12, (4, 6), (3, 3), (9, 8), (2, 2), "SAME", [[1, 0], [1, 1]]),  # rows left over
    (6, 10, (2, 5), (1, 1), (7, 5), (2, 3), "VALID", [[1, 0], [0, 1], [1, 1]]),  # 1x1 strided
    (8, 12, (4, 6), (3, 2), (10, 11), (3, 2), ((2, 1), (0, 2)), [[0, 1], [1, 1]]),
    (8, 12, (4, 6), (3, 3), (9, 10), (2, 2), ((2, 1), (2, 0)), [[1, 1], [0, 1]]),  # a crop
    (8, 12, (4, 6), (2, 2), (11, 7), (3, 3), "SAME", [[1, 0], [1, 1]]),  # untapped phases
    # Blocks at most cpu.NARROW wide: output pixels in the vector lanes; lines longer than
    # a register tile's pixels and images taller than a chunk of the block gradient's lines
    (8, 12, (4, 4), (3, 3), (19, 37), (1, 1), "SAME", [[1, 0, 1], [0, 1, 1]]),
    (6, 8, (2, 2), (3, 5), (6, 9), (1, 1), ((2, 0), (1, 3)), [[1, 0, 0, 1], [0, 0, 0, 0],
                                                              [1, 1, 0, 1]]),
    (6, 8, (2, 2), (3, 3), (9, 8), (1, 1), ((3, -1), (-1, 2)), [[0, 1, 0, 0], [1, 0, 0, 1],
                                                                [0, 0, 1, 1]]),
    (9, 4, (3, 1), (1, 1), (4, 3), (1, 1), "VALID", [[1, 0, 1, 1], [0, 1, 0, 0], [1, 1, 0, 1]]),
    (9, 4, (3, 2), (2, 2), (7, 5), (2, 1), "SAME", [[1, 0], [0, 1], [1, 1]])])  # sh 2, sw 1
# The block gradient's kernel copies each entry's channel blocks out of x and dy (inf), or
# reads block-major copies of both (0); narrow blocks at unit strides take neither.
@pytest.mark.parametrize("copy_ratio", [math.inf, 0.0])
def test_conv_in_place_matches_lax_conv_forward_and_gradients(monkeypatch, copy_ratio, cin,
                                                              cout, block, taps, hw, strides,
                                                              padding, mask):
  monkeypatch.setattr(cpu, "_ENTRY_COPY_RATIO", copy_ratio)
  mask = np.array(mask, bool)
  nnz = int(mask.sum())
  layer = BlockSparseConv(cout, taps, block, strides=strides, nnz_max=min(nnz + 1, mask.size),
                          padding=padding, impl="cpu")
  x = jax.random.normal(jax.random.key(0), (3, *hw, cin))
  v = random_variables(layer, x, mask)

  def sparse(x, blocks):
    return layer.apply({**v, "params": {**v["params"], "blocks": blocks}}, x)

  def reference(x, blocks):
    kernel = dense_kernel({**v, "params": {"blocks": blocks}}, *taps, cin, cout, block)
    y = jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + v["params"]["bias"]

  loss = lambda f: lambda x, b: jnp.sum(jnp.sin(f(x, b)))  # noqa: E731
  blocks = v["params"]["blocks"]
  assert sparse(x, blocks).shape == reference(x, blocks).shape
  hlo = jax.jit(jax.grad(loss(sparse), argnums=(0, 1))).lower(x, blocks).as_text()
  # forward, block gradient, and the input gradient once per phase of the strides that a
  # tap reaches: no patches
  phases = min(strides[0], taps[0]) * min(strides[1], taps[1])
  assert hlo.count("bsparse_bsr_conv") == 2 + phases and "bsparse_bsr_matmul" not in hlo
  chex.assert_trees_all_close(jax.jit(sparse)(x, blocks), reference(x, blocks), atol=1e-4)
  got = jax.jit(jax.grad(loss(sparse), argnums=(0, 1)))(x, blocks)
  want = jax.grad(loss(reference), argnums=(0, 1))(x, blocks)
  chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)
  assert not np.any(got[1][nnz:])  # padding gets no gradient


def test_conv_in_place_takes_the_cpu_kernels_only():
  w = bsr.from_dense(jnp.ones((8 * 9, 12)), (4 * 9, 6))
  assert ops.convolves_in_place("cpu", w, jnp.float32)
  assert not ops.convolves_in_place("xla", w, jnp.float32)


def test_conv_in_place_kernel_rejects_out_of_range_blocks():
  layer = BlockSparseConv(12, (3, 3), (4, 6), nnz_max=2, impl="cpu")
  x = jnp.ones((1, 5, 5, 8))
  v = random_variables(layer, x, np.eye(2, dtype=bool))
  bad = {**v, INDEX_COLLECTION: {**v[INDEX_COLLECTION], "rows": jnp.array([0, 7], jnp.int32)}}
  with pytest.raises(Exception, match="bsr_conv: block index out of range"):
    jax.block_until_ready(layer.apply(bad, x))


def test_conv_gradient_in_slabs_holds_one_slab_of_patches(monkeypatch):
  # The CNN's conv2 at batch 16: 3.6 MB of patches whole, a seventh of that per slab.
  layer = BlockSparseConv(64, (3, 3), (4, 4), nnz_max=16, impl="xla")
  x = jax.random.normal(jax.random.key(0), (16, 14, 14, 32))
  v = layer.init(jax.random.key(1), x)

  def grad_temp_mb(patch_bytes):
    monkeypatch.setattr(bsr_layers, "PATCH_BYTES", patch_bytes)
    loss = lambda p, x: jnp.sum(layer.apply({**v, "params": p}, x) ** 2)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(v["params"], x).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20

  row_bytes = 16 * 14 * 32 * 9 * 4
  whole, slabs = grad_temp_mb(14 * row_bytes), grad_temp_mb(2 * row_bytes)
  assert whole > 2 * 3.6 and slabs < whole / 2, (whole, slabs)


def test_slab_rows_is_the_largest_divisor_within_the_budget(monkeypatch):
  monkeypatch.setattr(bsr_layers, "PATCH_BYTES", 1000)
  assert bsr_layers.slab_rows(14, 100) == 7
  assert bsr_layers.slab_rows(14, 400) == 2
  assert bsr_layers.slab_rows(13, 100) == 1  # a prime row count: one row at a time
  assert bsr_layers.slab_rows(14, 5000) == 1  # one row over the budget still runs
  assert bsr_layers.slab_rows(8, 125) == 8  # fits whole: no slabs


@pytest.mark.parametrize("impl,platform,call", [
    ("pallas_tpu", "tpu", "tpu_custom_call"), ("pallas_gpu", "cuda", "__gpu$xla.gpu.triton")])
def test_conv_in_slabs_lowers_for_accelerators(monkeypatch, impl, platform, call):
  monkeypatch.setattr(bsr_layers, "PATCH_BYTES", 1 << 16)
  # 2x2 taps of 32x128 blocks: (128, 128) blocks of the patch matrix, which both kernels take.
  layer = BlockSparseConv(256, (2, 2), (32, 128), nnz_max=2, impl=impl)
  x = jax.ShapeDtypeStruct((16, 8, 8, 64), jnp.float32)
  v = jax.eval_shape(layer.init, jax.random.key(0), x)

  def forward(params, index, x):
    return layer.apply({"params": params, INDEX_COLLECTION: index}, x)

  def step(params, index, x):
    loss = lambda p, x: jnp.sum(forward(p, index, x) ** 2)
    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  lower = lambda f: jax.export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)(
      v["params"], v[INDEX_COLLECTION], x).mlir_module()
  text = lower(forward)
  assert "stablehlo.while" in text and text.count(call) == 1  # one slab's product in a loop
  text = lower(step)
  # Slabs both ways: a loop of the product, then a loop of each slab's dx and dW.
  assert text.count("stablehlo.while") == 2 and text.count(call) == 3


def test_layer_errors():
  with pytest.raises(ValueError, match="layer 'bad'.*does not divide"):
    BlockSparseDense(10, (4, 4), name="bad").init(jax.random.key(0), jnp.ones((1, 8)))
  with pytest.raises(ValueError, match=r"nnz_max must be in \[1, 4\]"):
    BlockSparseDense(8, (4, 4), nnz_max=9).init(jax.random.key(0), jnp.ones((1, 8)))


class KronNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(KronConv(16, (3, 3), block_shapes=((4, 8),), rank=2, name="conv")(x))
    x = nn.relu(KronConv(8, (1, 1), strides=(2, 2), block_shapes=((16, 4),), name="proj")(x))
    x = nn.Dense(32, name="bridge")(x.reshape(x.shape[0], -1))
    return KronDense(10, block_shapes=((8, 5),), rank=3, name="head")(x)


class SparseNet(nn.Module):
  specs: dict

  @nn.compact
  def __call__(self, x):
    conv = lambda n, f, **kw: BlockSparseConv(  # noqa: E731
        f, self.specs[n].kernel_size, self.specs[n].block_shape, self.specs[n].nnz_max,
        name=n, **kw)
    x = nn.relu(conv("conv", 16)(x))
    x = nn.relu(conv("proj", 8, strides=(2, 2))(x))
    x = nn.Dense(32, name="bridge")(x.reshape(x.shape[0], -1))
    s = self.specs["head"]
    return BlockSparseDense(10, s.block_shape, s.nnz_max, name="head")(x)


def random_params(model, x, seed, keep=0.5):
  """Random params for ``model`` (no init compile); selectors keep ``keep`` of the blocks."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]

  def draw(path, s):
    v = rng.standard_normal(s.shape).astype(np.float32) / np.sqrt(max(s.shape[-2:]))
    if path[-1].key == "S":
      v = v * (rng.random(s.shape) < keep)
    return jnp.asarray(v)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize("budget", [None, 4])
def test_converted_model_matches_kpd_model(budget):
  x = jax.random.normal(jax.random.key(0), (3, 6, 6, 8))
  params = random_params(KronNet(), x, seed=2)
  y_kpd = jax.jit(KronNet().apply)({"params": params}, x)
  nnz_max = None if budget is None else {"head": 8, "conv": budget}
  variables = convert.kpd_to_bsr_params(params, nnz_max)
  specs = convert.bsr_layer_specs(params, nnz_max)
  assert set(specs) == {"conv", "proj", "head"}
  assert specs["conv"].kernel_size == (3, 3) and specs["head"].kernel_size is None
  assert specs["head"].block_shape == (8, 5)
  if budget is not None:
    assert specs["conv"].nnz_max == 4 and variables["params"]["conv"]["blocks"].shape[0] == 4
    assert variables["params"]["head"]["blocks"].shape == (8, 8, 5)
  np.testing.assert_array_equal(variables["params"]["bridge"]["kernel"],
                                params["bridge"]["kernel"])
  y_bsr = jax.jit(SparseNet(specs).apply)(variables, x)
  chex.assert_trees_all_close(y_bsr, y_kpd, atol=1e-4, rtol=1e-4)


def test_conversion_rejects_several_candidate_terms():
  x = jnp.ones((2, 16))
  layer = KronDense(8, block_shapes=((4, 4), (8, 2)))
  params = {"fc": random_params(layer, x, seed=0)}
  with pytest.raises(ValueError, match="layer 'fc' has 2 candidate KPD terms"):
    convert.kpd_to_bsr_params(params)


def test_conversion_rejects_a_budget_below_the_block_count():
  x = jnp.ones((2, 16))
  params = {"fc": random_params(KronDense(8, block_shapes=((4, 4),)), x, seed=0, keep=1.0)}
  with pytest.raises(ValueError, match="layer 'fc': the mask has 8 blocks"):
    convert.kpd_to_bsr_params(params, nnz_max=3)


@pytest.mark.parametrize("taps,strides,padding", [
    ((3, 3), (1, 1), "SAME"), ((3, 3), (2, 2), "SAME"), ((1, 1), (2, 2), "SAME"),
    ((3, 2), (1, 2), "VALID"), ((3, 3), (2, 1), ((1, 0), (2, 1)))])
def test_sliced_patches_equal_the_xla_patches_op(taps, strides, padding):
  x = jax.random.normal(jax.random.key(0), (2, 9, 7, 5))
  want = jax.lax.conv_general_dilated_patches(x, taps, strides, padding,
                                              dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_array_equal(patches(x, taps, strides, padding), want)


def test_conv_benchmark_times_one_convolution_in_every_form():
  # A budget of under one output row's patches: the slabbed form runs a row at a time.
  cmd = [sys.executable, "-m", "benchmarks.bsr_conv", "--batches=2", "--passes=fwd",
         "--rounds=1", "--calls=1", "--patch_bytes=4096"]
  root = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run(cmd, check=True, cwd=root, capture_output=True, text=True,
                       timeout=300).stdout
  cells = [r.split("|")[1:-1] for r in out.splitlines() if r.startswith("| ")]
  rows = [c for c in cells if c[1].strip().isdigit()]  # not the header
  assert len(rows) == 4 * 4  # four layers, four forms, batch 2, forward only
  assert {r[3].strip() for r in rows} == {"dense conv", "BSR, patches whole",
                                          "BSR, patches in slabs", "BSR, in place"}
  assert all(float(r[4]) > 0 and r[2].strip() == "fwd" for r in rows)
  assert all(float(r[8]) < 1e-3 for r in rows)  # the same convolution as the dense one
