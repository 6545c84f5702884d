"""KPD math against explicit jnp.kron sums, forward and gradients."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsparse import kron, layers

jax.config.update("jax_default_matmul_precision", "highest")


def explicit_weight(s, a, b):
  """sum_k kron(s * a[k], b[k]) with jnp.kron, tap by tap for conv factors."""
  taps = a.shape[1:-2]
  a = a.reshape(a.shape[0], -1, *a.shape[-2:])
  ws = [sum(jnp.kron(s * a[k, t], b[k]) for k in range(a.shape[0])) for t in range(a.shape[1])]
  return jnp.stack(ws).reshape(*taps, *ws[0].shape)


def factors(key, m1, m2, n1, n2, r, taps=(), sparse=True):
  ks = jax.random.split(key, 3)
  s = jax.random.normal(ks[0], (m1, n1))
  if sparse:
    s = s * (jax.random.uniform(ks[0], (m1, n1)) > 0.4)
  a = jax.random.normal(ks[1], (r, *taps, m1, n1))
  b = jax.random.normal(ks[2], (r, m2, n2))
  return s, a, b


SHAPES = [  # m1, m2, n1, n2, rank
    (1, 1, 1, 1, 1), (2, 3, 4, 5, 1), (3, 4, 2, 2, 3), (4, 2, 3, 7, 5), (5, 3, 1, 6, 2),
    (2, 8, 6, 1, 4),
]


@pytest.mark.parametrize("m1,m2,n1,n2,r", SHAPES)
@pytest.mark.parametrize("order", ["b_first", "a_first"])
def test_kron_matmul_matches_explicit(m1, m2, n1, n2, r, order):
  s, a, b = factors(jax.random.key(m1 * 7 + n2), m1, m2, n1, n2, r)
  x = jax.random.normal(jax.random.key(1), (2, 3, m1 * m2))  # leading batch/sequence dims
  w = explicit_weight(s, a, b)
  chex.assert_trees_all_close(kron.dense_weight(s, a, b), w, atol=1e-5)
  chex.assert_trees_all_close(kron.kron_matmul(x, s, a, b, order), x @ w, atol=1e-4, rtol=1e-4)

  def loss_fact(x, s, a, b):
    return jnp.sum(jnp.sin(kron.kron_matmul(x, s, a, b, order)))

  def loss_ref(x, s, a, b):
    return jnp.sum(jnp.sin(x @ explicit_weight(s, a, b)))

  g = jax.grad(loss_fact, argnums=(0, 1, 2, 3))(x, s, a, b)
  g_ref = jax.grad(loss_ref, argnums=(0, 1, 2, 3))(x, s, a, b)
  chex.assert_trees_all_close(g, g_ref, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("m1,m2,n1,n2,r,order,strides,kernel", [
    (2, 3, 4, 2, 1, "b_first", (1, 1), (3, 3)),
    (2, 3, 4, 2, 1, "a_first", (2, 2), (3, 3)),
    (3, 2, 2, 3, 3, "b_first", (2, 2), (3, 3)),
    (3, 2, 2, 3, 3, "a_first", (1, 1), (1, 1)),
    (1, 4, 2, 1, 2, "b_first", (1, 1), (1, 1)),
    (1, 4, 2, 1, 2, "a_first", (1, 1), (3, 3)),
])
def test_kron_conv_matches_dense_conv(m1, m2, n1, n2, r, order, strides, kernel):
  s, a, b = factors(jax.random.key(3), m1, m2, n1, n2, r, taps=kernel)
  x = jax.random.normal(jax.random.key(4), (2, 7, 6, m1 * m2))
  w = explicit_weight(s, a, b)
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  chex.assert_trees_all_close(kron.kron_conv(x, s, a, b, strides, "SAME", order), conv(x, w),
                              atol=1e-4, rtol=1e-4)
  g = jax.grad(lambda a, b: jnp.sum(kron.kron_conv(x, s, a, b, strides, "SAME", order) ** 2),
               argnums=(0, 1))(a, b)
  g_ref = jax.grad(lambda a, b: jnp.sum(conv(x, explicit_weight(s, a, b)) ** 2),
                   argnums=(0, 1))(a, b)
  chex.assert_trees_all_close(g, g_ref, atol=1e-2, rtol=1e-3)


def test_zero_selector_zeroes_exactly_its_block():
  s, a, b = factors(jax.random.key(5), 3, 4, 2, 5, 2, sparse=False)
  s = s.at[1, 0].set(0.0)
  w = kron.dense_weight(s, a, b)
  np.testing.assert_array_equal(w[4:8, 0:5], 0.0)
  assert np.all(np.abs(np.asarray(w[0:4, 0:5])) > 0)
  rows, cols, blocks = kron.nonzero_blocks(s, a, b)
  assert (1, 0) not in set(zip(rows.tolist(), cols.tolist()))
  assert len(rows) == 5 and blocks.shape == (5, 4, 5)
  for i, j, blk in zip(rows, cols, blocks):
    np.testing.assert_allclose(blk, w[i * 4:(i + 1) * 4, j * 5:(j + 1) * 5], atol=1e-5)


def test_block_norms_match_dense_blocks():
  s, a, b = factors(jax.random.key(6), 3, 2, 4, 3, 3, taps=(3, 3))
  w = np.asarray(kron.dense_weight(s, a, b))  # (3, 3, 6, 12)
  blocks = w.reshape(3, 3, 3, 2, 4, 3)
  ref = np.sqrt((blocks ** 2).sum(axis=(0, 1, 3, 5)))
  np.testing.assert_allclose(kron.block_norms(s, a, b), ref, rtol=1e-4)


def test_costs_pick_the_cheaper_order():
  # Wide input, narrow output block: contracting B first is cheaper, and vice versa.
  assert kron.best_order(m1=2, m2=64, n1=64, n2=1, rank=2) == "b_first"
  assert kron.best_order(m1=64, m2=1, n1=2, n2=64, rank=2) == "a_first"
  c = kron.contraction_costs(28, 28, 30, 10, 4, nnz=420)
  assert c["b_first"] == 4 * (784 * 10 + 420 * 10)


def test_grid_shape_error_names_layer_and_valid_sizes():
  with pytest.raises(ValueError, match=r"layer 'fc1'.*does not divide the output dimension 300"
                     r".*Valid sizes for 300: \[1, 2, 3, 4, 5, 6, 10"):
    kron.grid_shape(784, 300, (28, 7), where="layer 'fc1'")


@pytest.mark.parametrize("block_shapes", [((16, 16),), ((16, 16), (8, 8), (32, 4))])
def test_kron_dense_init_variance_matches_he_init(block_shapes):
  """Candidates sum: their summed weight, not each of them, has He variance."""
  layer = layers.KronDense(256, block_shapes=block_shapes, rank=4, use_bias=False)
  p = layer.init(jax.random.key(0), jnp.zeros((1, 512)))["params"]
  w = sum(kron.dense_weight(t["S"], t["A"], t["B"]) for t in p.values())
  assert abs(float(jnp.var(w)) / (2 / 512) - 1) < 0.25


def test_kron_conv_init_variance_matches_he_init_with_candidates():
  layer = layers.KronConv(64, (3, 3), block_shapes=((4, 4), (2, 2), (8, 8)), rank=4,
                          use_bias=False)
  variances = []
  for seed in range(8):  # a shared factor correlates a draw's entries: average draws
    p = layer.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 32)))["params"]
    w = sum(kron.dense_weight(t["S"], t["A"], t["B"]) for t in p.values())
    variances.append(float(jnp.var(w)))
  assert w.shape == (3, 3, 32, 64)
  assert abs(np.mean(variances) / (2 / (9 * 32)) - 1) < 0.2


@pytest.mark.parametrize("shape", [(7,), (4, 28, 10), (2, 3, 3, 5, 7)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_normal_init_draws_the_values_of_flax_normal(shape, dtype):
  """The flat draw must not change any initial value (nor so any run's results)."""
  key = jax.random.key(3)
  got = kron.normal_init(0.3)(key, shape, dtype)
  assert got.shape == shape and got.dtype == dtype
  np.testing.assert_array_equal(got, nn.initializers.normal(0.3)(key, shape, dtype))


def test_kron_dense_sums_candidates():
  layer = layers.KronDense(12, block_shapes=((2, 3), (4, 4)), rank=2, use_bias=False)
  x = jax.random.normal(jax.random.key(1), (5, 8))
  v = layer.init(jax.random.key(0), x)
  p = v["params"]
  w = sum(kron.dense_weight(**{k.lower(): p[n][k] for k in "SAB"}) for n in p)
  chex.assert_trees_all_close(layer.apply(v, x), x @ w, atol=1e-5)
