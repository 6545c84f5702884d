"""Baselines on dense kernels: exact target densities, schedules, regrowth, moment resets."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bsparse import baselines, models, sparsity
from bsparse import layers as layers_lib
from configs import base

LAYOUT = layers_lib.LayerFactory(block_shape=(2, 3), block_shapes={"fc1": (3, 2)},
                                 dense_layers=("head",))
GRIDS = {"conv": (4, 2), "fc1": (4, 4)}  # conv (3, 3, 8, 6) in 2x3 blocks, fc1 (12, 8) in 3x2


def toy_params(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  conv = jax.random.normal(k1, (3, 3, 8, 6)) / 3  # block norms near those of fc1
  return {"conv": {"kernel": conv, "bias": jnp.zeros(6)},
          "fc1": {"kernel": jax.random.normal(k2, (12, 8)), "bias": jnp.zeros(8)},
          "head": {"kernel": jax.random.normal(k3, (8, 3)), "bias": jnp.zeros(3)}}


def random_grads(params, step):
  key = jax.random.key(1000 + step)
  return jax.tree.map(lambda p: jax.random.normal(key, p.shape), params)


def run(tx, params, steps, grads_fn=random_grads):
  """``steps`` jitted updates; returns the params and states after every step."""
  update = jax.jit(tx.update)
  state = tx.init(params)
  history = []
  for step in range(steps):
    updates, state = update(grads_fn(params, step), state, params)
    params = optax.apply_updates(params, updates)
    history.append((params, state))
  return history


def norms(params, name):
  shape = LAYOUT.shapes_for(name)[0]
  return np.asarray(baselines.block_norms(params[name]["kernel"], shape))


def assert_exact(params, state, density):
  """Exactly ``num_kept`` blocks per layer, and every pruned block exactly zero."""
  for name, grid in GRIDS.items():
    mask = np.asarray(state.masks[name])
    assert mask.sum() == baselines.num_kept(density, grid[0] * grid[1]), name
    assert np.all(norms(params, name)[~mask] == 0), name


ALGORITHMS = {
    "static": baselines.Static(0.3),
    "group_lasso": baselines.GroupLasso(0.3, lam=0.2, lr=lambda t: 0.05, lr_peak=0.05,
                                        prune_step=10),
    "gradual": baselines.Gradual(0.3, start_step=2, end_step=14, every=3),
    "set": baselines.SET(0.3, end_step=14, every=2, drop_fraction=0.8),
    "rigl": baselines.RigL(0.3, end_step=14, every=2, drop_fraction=0.8),
}


@pytest.mark.parametrize("method", sorted(ALGORITHMS))
def test_every_method_reaches_the_exact_target_density(method):
  tx = baselines.block_masked(optax.adam(0.05), ALGORITHMS[method], LAYOUT)
  params, state = run(tx, toy_params(), 18)[-1]
  assert_exact(params, state, 0.3)
  density = baselines.block_density(params, state)
  assert float(density["fc1"]) == 4 / 16 and float(density["conv"]) == 2 / 8
  assert abs(float(density["weights"]) - (4 / 16 * 96 + 2 / 8 * 432) / 528) < 1e-6
  assert np.all(np.asarray(params["head"]["kernel"]) != 0)  # dense layers stay dense


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_dynamic_sparse_keeps_density_and_changes_the_mask(method):
  tx = baselines.block_masked(optax.adam(0.05), ALGORITHMS[method], LAYOUT)
  history = run(tx, toy_params(), 16)
  masks = [np.asarray(s.masks["fc1"]) for _, s in history]
  for (params, state), mask in zip(history, masks):
    assert_exact(params, state, 0.3)
  changed = [t for t in range(1, 16) if not np.array_equal(masks[t], masks[t - 1])]
  assert changed and all(t % 2 == 0 and t < 14 for t in changed)  # update steps only


def test_rigl_drops_the_smallest_and_grows_the_largest_gradient_blocks():
  layout = layers_lib.LayerFactory(block_shape=(3, 2))
  rigl = baselines.RigL(0.25, end_step=100, every=1, drop_fraction=0.6)  # drops 2 of 4
  tx = baselines.block_masked(optax.sgd(0.0), rigl, layout)
  grid_values = jnp.arange(1.0, 17.0).reshape(4, 4)  # block norms ordered by index
  params = {"fc1": {"kernel": baselines.expand(grid_values, (3, 2))}}
  mask0 = np.asarray(tx.init(params).masks["fc1"])
  targets = np.flatnonzero(~mask0.reshape(-1))[[0, -1]]
  big = np.zeros(16)
  big[targets] = 1.0
  grads = {"fc1": {"kernel": baselines.expand(jnp.asarray(big.reshape(4, 4)), (3, 2))}}
  _, (_, state) = run(tx, params, 2, lambda p, t: grads)
  active = np.flatnonzero(mask0.reshape(-1))
  expected = mask0.reshape(-1).copy()
  expected[active[:2]] = False  # the two smallest norms
  expected[targets] = True
  np.testing.assert_array_equal(np.asarray(state.masks["fc1"]).reshape(-1), expected)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_regrown_blocks_start_at_zero_with_reset_moments(optimizer):
  base_tx = optax.chain(optax.clip_by_global_norm(1.0),
                        sparsity.base_optimizer(optimizer, lambda t: 0.05, 1e-4, 0.9, None))
  tx = baselines.block_masked(base_tx, ALGORITHMS["set"], LAYOUT)
  history = run(tx, toy_params(), 3)
  (_, before), (params, after) = history[1], history[2]  # step 2 is an update step
  kinds = (optax.ScaleByAdamState, optax.TraceState)
  found = [s for s in jax.tree.leaves(after.inner, is_leaf=lambda s: isinstance(s, kinds))
           if isinstance(s, kinds)]
  assert len(found) == 1
  trees = [found[0].mu, found[0].nu] if optimizer == "adamw" else [found[0].trace]
  for name, grid in GRIDS.items():
    grown = np.asarray(after.masks[name] & ~before.masks[name])
    kept = np.asarray(after.masks[name] & before.masks[name])
    assert grown.any() and kept.any(), name
    assert np.all(norms(params, name)[grown] == 0) and np.all(norms(params, name)[kept] > 0)
    for tree in trees:
      stat = np.asarray(baselines.block_norms(tree[name]["kernel"], LAYOUT.shapes_for(name)[0]))
      assert np.all(stat[grown] == 0) and np.all(stat[kept] > 0), name


def test_group_lasso_zeros_blocks_then_prunes_to_the_target():
  lasso = baselines.GroupLasso(0.3, lam=0.25, lr=lambda t: 0.01, lr_peak=0.01, prune_step=10)
  tx = baselines.block_masked(optax.adam(0.01), lasso, LAYOUT)
  history = run(tx, toy_params(), 16)
  params, state = history[9]  # the last step with the penalty
  for name, grid in GRIDS.items():
    zero = norms(params, name) == 0
    assert zero.any() and not zero.all(), name
    np.testing.assert_array_equal(np.asarray(state.masks[name]), ~zero)
  masks = [np.asarray(s.masks["fc1"]) for _, s in history[10:]]
  assert masks[0].sum() == 4 and all(np.array_equal(m, masks[0]) for m in masks)
  for params, state in history[10:]:
    assert_exact(params, state, 0.3)


def test_group_lasso_is_the_block_soft_threshold():
  lasso = baselines.GroupLasso(0.5, lam=1.0, lr=lambda t: 0.5, lr_peak=1.0, prune_step=5)
  tx = baselines.block_masked(optax.sgd(0.0), lasso, LAYOUT)
  params = toy_params()
  (new, _), = run(tx, params, 1)
  w = np.asarray(params["fc1"]["kernel"]).reshape(4, 3, 4, 2)
  n = np.sqrt((w ** 2).sum(axis=(1, 3), keepdims=True))
  expected = (w * np.maximum(0, 1 - 0.5 / n)).reshape(12, 8)
  np.testing.assert_allclose(new["fc1"]["kernel"], expected, rtol=1e-5, atol=1e-6)


def test_gradual_follows_the_cubic_schedule():
  gradual = baselines.Gradual(0.25, start_step=4, end_step=16, every=4)
  tx = baselines.block_masked(optax.sgd(0.0), gradual, LAYOUT)  # frozen weights
  params = toy_params()
  history = run(tx, params, 20)
  for t in range(20):
    pruned_at = 4 * (t // 4) if t >= 4 else None
    for name, (m1, n1) in GRIDS.items():
      size = m1 * n1
      if pruned_at is None:
        k = size
      else:
        d = 0.25 + 0.75 * (1 - min((pruned_at - 4) / 12, 1)) ** 3
        k = max(int(np.floor(d * size)), baselines.num_kept(0.25, size))
      mask = np.asarray(history[t][1].masks[name])
      assert mask.sum() == k, (t, name)
      order = np.argsort(-norms(params, name).reshape(-1), stable=True)
      assert set(np.flatnonzero(mask.reshape(-1))) == set(order[:k]), (t, name)
  assert [int(history[t][1].masks["fc1"].sum()) for t in (3, 8, 12, 16)] == [16, 7, 4, 4]


def test_static_mask_never_changes():
  tx = baselines.block_masked(optax.adam(0.05), ALGORITHMS["static"], LAYOUT)
  mask0 = np.asarray(tx.init(toy_params()).masks["conv"])
  for params, state in run(tx, toy_params(), 8):
    np.testing.assert_array_equal(np.asarray(state.masks["conv"]), mask0)
    assert_exact(params, state, 0.3)


def test_block_shape_that_does_not_divide_names_the_layer():
  layout = layers_lib.LayerFactory(block_shape=(2, 3), block_shapes={"fc1": (5, 2)},
                                   dense_layers=("head",))
  tx = baselines.block_masked(optax.sgd(0.1), baselines.Static(0.5), layout)
  with pytest.raises(ValueError, match=r"layer 'fc1'.*block size 5"):
    tx.init(toy_params())


def mlp_config(method):
  c = base.dense(base.get_config())
  c.method = method
  c.layers.block_shapes.fc1 = (28, 10)
  c.layers.block_shapes.fc2 = (10, 10)
  c.baseline.target_density = 0.3
  c.baseline.prune_epoch = 0.5
  c.baseline.update_every_steps = 1
  c.optimizer.warmup_epochs = 0.0
  return c


def test_unknown_method_and_kpd_layers_are_rejected():
  with pytest.raises(ValueError, match=r"unknown method 'rigL'.*'kpd', 'dense'.*'rigl'"):
    sparsity.make_optimizer(mlp_config("rigL"), 4, 8)
  c = mlp_config("gradual")
  c.layers.kind = "kpd"
  with pytest.raises(ValueError, match=r"layers.kind='dense'"):
    sparsity.make_optimizer(c, 4, 8)


@pytest.mark.parametrize("method", ["dense", "group_lasso"])
def test_make_optimizer_trains_a_dense_mlp(method):
  model = models.MLP(layers_lib.LayerFactory(kind="dense"), 10, hidden=(40, 20))
  x = jax.random.normal(jax.random.key(0), (16, 28, 28, 1))
  y = jnp.arange(16) % 10
  params = model.init(jax.random.key(1), x)["params"]
  tx, _, lam = sparsity.make_optimizer(mlp_config(method), 4, 8)
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply(
      {"params": p}, x), y).mean()
  grad = jax.jit(jax.grad(loss))
  params, state = run(tx, params, 4, lambda p, t: grad(p))[-1]
  density = baselines.block_density(params, state)
  if method == "dense":
    assert density == {} and float(lam(0)) == 0.0
    return
  assert float(lam(1)) == pytest.approx(3e-4) and float(lam(2)) == 0.0  # prune at step 2
  assert set(density) == {"fc1", "fc2", "weights"}
  assert float(density["fc1"]) == pytest.approx(33 / 112)  # 28x4 blocks of 28x10
  assert float(density["fc2"]) == pytest.approx(2 / 8)


def given_masks(seed=0, counts=None):
  """A mask per layer of GRIDS with ``counts[layer]`` blocks (default: num_kept at 0.3)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, grid in GRIDS.items():
    k = (counts or {}).get(name, baselines.num_kept(0.3, grid[0] * grid[1]))
    flat = np.zeros(grid[0] * grid[1], bool)
    flat[rng.choice(flat.size, k, replace=False)] = True
    out[name] = flat.reshape(grid)
  return out


def test_static_trains_exactly_the_given_blocks():
  masks = given_masks(counts={"fc1": 3})  # fewer than num_kept(0.3, 16) = 4 is allowed
  tx = baselines.block_masked(optax.adam(0.05), baselines.Static(0.3, masks), LAYOUT)
  for params, state in run(tx, toy_params(), 6):
    for name, mask in masks.items():
      np.testing.assert_array_equal(np.asarray(state.masks[name]), mask)
      assert np.all(norms(params, name)[~mask] == 0) and np.all(norms(params, name)[mask] > 0)


@pytest.mark.parametrize("counts,grid", [({"fc1": 5}, None), ({"fc1": 0}, None),
                                         (None, (2, 4))])
def test_static_rejects_a_given_mask_that_does_not_fit(counts, grid):
  masks = given_masks(counts=counts)
  if grid:
    masks["conv"] = np.ones(grid, bool)
  tx = baselines.block_masked(optax.sgd(0.1), baselines.Static(0.3, masks), LAYOUT)
  with pytest.raises(ValueError, match=r"layer '(fc1|conv)' needs a \d+x\d+ block mask with "
                     r"1 to \d+ blocks"):
    tx.init(toy_params())


def test_mask_from_takes_the_blocks_a_kpd_run_ended_with(tmp_path):
  from bsparse import finetune
  layer = lambda rows, cols: {"block_shape": [3, 2], "kernel_size": None, "rows": rows,
                              "cols": cols, "nnz": len(rows), "grid": [4, 4]}
  early = finetune.Switch(5, {"fc1": layer([0, 1, 2, 3, 3], [0, 1, 2, 0, 3])}, {})
  final = finetune.Switch(9, {"fc1": layer([1, 3], [1, 3])}, {})
  finetune.save_switches(str(tmp_path), [early, final])
  mask = baselines.kept_blocks(str(tmp_path))["fc1"]
  assert sorted(zip(*np.nonzero(mask))) == [(1, 1), (3, 3)]

  c = mlp_config("static")
  c.baseline.mask_from = str(tmp_path / "missing")
  with pytest.raises(ValueError, match="records no block-sparse model.*finetune='bsr'"):
    baselines.algorithm_from_config(c, lambda t: 0.1, 10)
