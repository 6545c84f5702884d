"""The BSR format: constructors against dense references, padding, errors, no recompiles."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsparse import kron
from bsparse.kernels import bsr


def dense_and_mask(seed, m1, n1, bm, bn, density):
  rng = np.random.default_rng(seed)
  mask = rng.random((m1, n1)) < density
  w = rng.standard_normal((m1 * bm, n1 * bn)).astype(np.float32)
  return w, mask


def masked(w, mask, bm, bn):
  return w * np.kron(mask, np.ones((bm, bn), np.float32))


@pytest.mark.parametrize("m1,n1,bm,bn,density", [
    (4, 3, 2, 5, 0.5), (1, 1, 3, 3, 1.0), (5, 6, 4, 2, 0.2), (3, 3, 1, 1, 0.7)])
def test_from_dense_round_trip(m1, n1, bm, bn, density):
  w, mask = dense_and_mask(m1 * n1, m1, n1, bm, bn, density)
  mask[0, 0] = True
  nnz = int(mask.sum())
  budget = min(nnz + 2, m1 * n1)
  a = bsr.from_dense(jnp.asarray(w), (bm, bn), nnz_max=budget, mask=jnp.asarray(mask))
  assert a.blocks.shape == (budget, bm, bn)
  assert a.shape == (m1 * bm, n1 * bn) and a.block_shape == (bm, bn)
  assert int(a.nnz) == nnz
  np.testing.assert_allclose(a.to_dense(), masked(w, mask, bm, bn))
  np.testing.assert_array_equal(a.mask(), mask)
  key = np.asarray(a.rows) * n1 + np.asarray(a.cols)
  assert np.all(np.diff(key) >= 0), "entries must be row-sorted"
  # Padding: last block of the grid, zero contents.
  assert np.all(np.asarray(a.rows[nnz:]) == m1 - 1) and np.all(np.asarray(a.cols[nnz:]) == n1 - 1)
  assert not np.any(np.asarray(a.blocks[nnz:]))


def test_from_dense_default_mask_and_budget():
  w, mask = dense_and_mask(0, 3, 4, 2, 2, 0.4)
  wm = masked(w, mask, 2, 2)
  a = bsr.from_dense(jnp.asarray(wm), (2, 2))
  assert a.nnz_max == int(mask.sum()) == int(a.nnz)
  np.testing.assert_allclose(a.to_dense(), wm)


def test_empty_mask_keeps_one_padding_entry():
  a = bsr.from_dense(jnp.ones((4, 4)), (2, 2), mask=jnp.zeros((2, 2), bool))
  assert a.nnz_max == 1 and int(a.nnz) == 0
  np.testing.assert_allclose(a.to_dense(), 0.0)


@pytest.mark.parametrize("r", [1, 3])
def test_from_kron_matches_dense_weight(r):
  k1, k2, k3 = jax.random.split(jax.random.key(r), 3)
  m1, m2, n1, n2 = 3, 4, 5, 2
  s = jax.random.normal(k1, (m1, n1)) * (jax.random.uniform(k2, (m1, n1)) > 0.5)
  a = jax.random.normal(k2, (r, m1, n1))
  b = jax.random.normal(k3, (r, m2, n2))
  w = bsr.from_kron(s, a, b, nnz_max=m1 * n1)
  assert w.block_shape == (m2, n2) and int(w.nnz) == int(jnp.count_nonzero(s))
  chex.assert_trees_all_close(w.to_dense(), kron.dense_weight(s, a, b), atol=1e-5)
  np.testing.assert_array_equal(w.mask(), s != 0)


def test_kron_entries_of_a_conv_term_match_the_kernel():
  k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
  s = jax.random.normal(k1, (2, 3)) * (jax.random.uniform(k2, (2, 3)) > 0.5)
  a = jax.random.normal(k2, (2, 3, 3, 2, 3))
  b = jax.random.normal(k3, (2, 4, 2))
  blocks, rows, cols, nnz = bsr.kron_entries(s, a, b, nnz_max=6)
  kernel = kron.dense_weight(s, a, b)  # (3, 3, 8, 6)
  for k in range(int(nnz)):
    i, j = int(rows[k]), int(cols[k])
    chex.assert_trees_all_close(blocks[k], kernel[:, :, i * 4:(i + 1) * 4, j * 2:(j + 1) * 2],
                                atol=1e-5)
  assert int(nnz) == int(jnp.count_nonzero(s)) and not np.any(np.asarray(blocks[int(nnz):]))


def test_with_blocks_zeroes_padding():
  w, mask = dense_and_mask(1, 2, 2, 2, 2, 0.5)
  mask[0, 1] = True
  a = bsr.from_dense(jnp.asarray(w), (2, 2), nnz_max=4, mask=jnp.asarray(mask))
  b = a.with_blocks(jnp.ones_like(a.blocks))
  np.testing.assert_allclose(b.to_dense(), np.kron(mask, np.ones((2, 2))))


@pytest.mark.parametrize("call,match", [
    (lambda: bsr.from_dense(jnp.ones((6, 4)), (4, 2)), "does not divide its 6 rows"),
    (lambda: bsr.from_dense(jnp.ones((4, 6)), (2, 4)), "does not divide its 6 columns"),
    (lambda: bsr.from_dense(jnp.ones((4, 4)), (2, 2), nnz_max=2), "more than the budget"),
    (lambda: bsr.from_dense(jnp.ones((4, 4)), (2, 2), nnz_max=5), r"nnz_max must be in \[1, 4\]"),
    (lambda: bsr.from_dense(jnp.ones((4, 4)), (2, 2), mask=jnp.ones((2, 3), bool)),
     "block-grid shape"),
    (lambda: bsr.from_dense(jnp.ones((4, 4)), (2,)), "2-D shape and block shape"),
    (lambda: bsr.from_kron(jnp.ones((2, 2)), jnp.ones((1, 3, 3, 2, 2)), jnp.ones((1, 2, 2))),
     "Conv terms"),
    (lambda: bsr.from_indices(jnp.ones((3, 2, 2)), jnp.zeros(2, jnp.int32),
                              jnp.zeros(2, jnp.int32), 1, (4, 4)), "rows and cols"),
])
def test_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_traced_mask_needs_budget():
  with pytest.raises(ValueError, match="nnz_max is required"):
    jax.jit(lambda w, m: bsr.from_dense(w, (2, 2), mask=m).blocks)(
        jnp.ones((4, 4)), jnp.ones((2, 2), bool))


def test_mask_change_within_budget_does_not_recompile():
  traces = []

  @jax.jit
  def rebuild_and_apply(w, mask, x):
    traces.append(1)
    a = bsr.from_dense(w, (4, 4), nnz_max=6, mask=mask)
    return x @ a.to_dense()

  @jax.jit
  def apply(a, x):
    traces.append(1)
    return x @ a.to_dense()

  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((16, 16)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((3, 16)), jnp.float32)
  masks = [np.eye(4, dtype=bool), np.zeros((4, 4), bool), rng.random((4, 4)) < 0.3]
  masks[2][0, :] = False
  for mask in masks:
    y = rebuild_and_apply(w, jnp.asarray(mask), x)
    np.testing.assert_allclose(y, x @ masked(np.asarray(w), mask, 4, 4), rtol=1e-5, atol=1e-5)
    a = bsr.from_dense(w, (4, 4), nnz_max=6, mask=jnp.asarray(mask))
    np.testing.assert_allclose(apply(a, x), y, rtol=1e-5, atol=1e-5)
  assert len(traces) == 2
  assert rebuild_and_apply._cache_size() == 1 and apply._cache_size() == 1


def test_budget_change_recompiles():
  apply = jax.jit(lambda a: a.to_dense())
  w = jnp.ones((4, 4))
  apply(bsr.from_dense(w, (2, 2), nnz_max=3, mask=jnp.eye(2, dtype=bool)))
  apply(bsr.from_dense(w, (2, 2), nnz_max=4, mask=jnp.eye(2, dtype=bool)))
  assert apply._cache_size() == 2


def test_traced_overflow_drops_blocks_beyond_budget():
  mask = jnp.ones((2, 2), bool)
  a = jax.jit(lambda m: bsr.from_dense(jnp.ones((4, 4)), (2, 2), nnz_max=3, mask=m))(mask)
  assert int(a.nnz) == 3
  np.testing.assert_array_equal(a.mask(), [[True, True], [True, False]])


@pytest.mark.parametrize("transpose", [False, True])
def test_output_schedule_covers_every_output_block(transpose):
  mask = np.array([[1, 0, 1, 0], [0, 0, 1, 0], [1, 0, 0, 0]], bool)
  a = bsr.from_dense(jnp.ones((6, 8)), (2, 2), nnz_max=6, mask=jnp.asarray(mask))
  group, entry, real = (np.asarray(v) for v in bsr.output_schedule(a, transpose))
  groups = 3 if transpose else 4
  assert group.shape == (6 + groups,)
  assert np.all(np.diff(group) >= 0) and set(group) == set(range(groups))
  out = np.asarray(a.rows if transpose else a.cols)
  stored = sorted(entry[real == 1].tolist())
  assert stored == list(range(int(a.nnz)))
  np.testing.assert_array_equal(out[entry[real == 1]], group[real == 1])


@pytest.mark.parametrize("transpose", [False, True])
def test_group_offsets(transpose):
  mask = np.array([[1, 0, 1, 0], [0, 0, 1, 0], [1, 0, 0, 0]], bool)
  a = bsr.from_dense(jnp.ones((6, 8)), (2, 2), nnz_max=6, mask=jnp.asarray(mask))
  entry, offsets = (np.asarray(v) for v in bsr.group_offsets(a, transpose))
  out = np.asarray(a.rows if transpose else a.cols)
  expected = mask.sum(1) if transpose else mask.sum(0)
  np.testing.assert_array_equal(np.diff(offsets), expected)
  for g in range(len(expected)):
    assert np.all(out[entry[offsets[g]:offsets[g + 1]]] == g)
