"""The optax sparsity chain: exact zeros from the prox step, frozen masks stay frozen."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from bsparse import kron, selection, sparsity


def term(key, m1=4, n1=5, r=2, m2=3, n2=2):
  ka, kb = jax.random.split(key)
  return {"S": jnp.ones((m1, n1)), "A": jax.random.normal(ka, (r, m1, n1)),
          "B": jax.random.normal(kb, (r, m2, n2))}


def params_tree():
  return {"fc1": {"kron_3x2": term(jax.random.key(0)), "bias": jnp.zeros(10)},
          "head": {"kernel": jnp.ones((10, 3)), "bias": jnp.zeros(3)}}


def test_labels_and_term_paths():
  labels = sparsity.param_labels(params_tree())
  assert labels["fc1"]["kron_3x2"] == {"S": "selector", "A": "factor", "B": "factor"}
  assert labels["head"] == {"kernel": "kernel", "bias": "other"}
  assert sparsity.term_paths(params_tree()) == [("fc1", "kron_3x2")]


def test_prox_step_gives_exact_zeros_and_keeps_large_entries():
  params = params_tree()
  s = jnp.linspace(-1.0, 1.0, 20).reshape(4, 5)
  params["fc1"]["kron_3x2"]["S"] = s
  tx = sparsity.block_sparsity(lam=lambda t: 0.3, lr=lambda t: 1e-3, lr_peak=1e-3)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, state = tx.update(zeros, state, params)
  new_s = optax.apply_updates(params, updates)["fc1"]["kron_3x2"]["S"]
  expected = np.sign(s) * np.maximum(np.abs(s) - 0.3, 0)
  np.testing.assert_allclose(new_s, expected, atol=1e-6)
  assert np.sum(np.asarray(new_s) == 0) == np.sum(np.abs(np.asarray(s)) <= 0.3) > 0
  np.testing.assert_array_equal(state.masks["fc1/kron_3x2"], np.asarray(new_s) != 0)
  # Non-selector params pass through untouched.
  np.testing.assert_array_equal(updates["head"]["kernel"], 0.0)
  np.testing.assert_array_equal(updates["fc1"]["kron_3x2"]["A"], 0.0)


def test_threshold_scales_with_learning_rate():
  params = params_tree()
  tx = sparsity.block_sparsity(lam=lambda t: 0.5, lr=lambda t: 0.5e-3, lr_peak=1e-3)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates["fc1"]["kron_3x2"]["S"], -0.25)


def random_steps(tx, params, steps: int):
  """``steps`` updates of ``tx`` with random gradients: final params, the mask after each."""
  state = tx.init(params)
  key = jax.random.key(1)
  masks = []
  for _ in range(steps):
    key, sub = jax.random.split(key)
    grads = jax.tree.map(lambda p: jax.random.normal(sub, p.shape), params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    masks.append(np.asarray(state.masks["fc1/kron_3x2"]))
  return params, masks


def test_frozen_mask_stays_frozen_and_target_density_is_exact():
  tx = sparsity.block_sparsity(lam=lambda t: 0.0, lr=lambda t: 1.0, lr_peak=1.0,
                               freeze_step=2, target_density=0.3)
  params, masks = random_steps(tx, params_tree(), 6)
  s = np.asarray(params["fc1"]["kron_3x2"]["S"])
  assert masks[1].all()  # before the freeze nothing was pruned (lam = 0)
  assert masks[2].sum() == 6  # 0.3 * 20 blocks kept at the freeze
  for m in masks[3:]:
    np.testing.assert_array_equal(m, masks[2])  # random updates could not revive a block
  np.testing.assert_array_equal(s == 0, ~masks[2])


def test_cubic_pruning_reaches_the_target_gradually_and_never_revives_a_block():
  tx = sparsity.block_sparsity(lam=lambda t: 0.0, lr=lambda t: 1.0, lr_peak=1.0,
                               freeze_step=8, target_density=0.25, prune_start=2,
                               prune_every=2)
  params, kept = random_steps(tx, params_tree(), 12)
  counts = [int(m.sum()) for m in kept]
  # 20 blocks: all until step 2, then floor(20 * d(t)) on the cubic schedule at the
  # pruning steps 2, 4, 6, 8 (d = 1, 0.47, 0.28, 0.25), then 5 blocks for good.
  assert counts == [20, 20, 20, 20, 9, 9, 5, 5, 5, 5, 5, 5]
  for before, after in zip(kept, kept[1:]):
    assert not (after & ~before).any()  # random updates could not revive a block
  np.testing.assert_array_equal(np.asarray(params["fc1"]["kron_3x2"]["S"]) == 0, ~kept[-1])


def test_target_density_keeps_the_largest_blocks():
  scores = jnp.array([[0.1, 5.0], [3.0, 0.0]])
  np.testing.assert_array_equal(sparsity.prune_to_density(scores, 0.5),
                                [[False, True], [True, False]])
  np.testing.assert_array_equal(sparsity.prune_to_density(scores, 1.0),
                                [[True, True], [True, False]])


def test_make_optimizer_decays_factors_not_selectors():
  c = base.get_config()
  c.optimizer.weight_decay = 0.5
  c.optimizer.warmup_epochs = 0.0
  c.optimizer.schedule = "constant"
  tx, lr, lam = sparsity.make_optimizer(c, steps_per_epoch=10, total_steps=100)
  params = params_tree()
  state = tx.init(params)
  for _ in range(3):  # past the warm-up step with lr = 0
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  assert np.all(np.asarray(updates["fc1"]["kron_3x2"]["S"]) == 0)
  assert np.all(np.abs(np.asarray(updates["fc1"]["kron_3x2"]["A"])) > 0)
  assert np.all(np.asarray(updates["fc1"]["bias"]) == 0)
  assert sparsity.sparsity_state(state) is not None


def test_factor_lr_scale_multiplies_the_factor_steps_only():
  params = params_tree()
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(3), p.shape), params)

  def third_update(scale):  # past the warm-up step with lr = 0
    c = base.get_config()
    c.optimizer.warmup_epochs = 0.0
    c.optimizer.factor_lr_scale = scale
    tx, _, _ = sparsity.make_optimizer(c, steps_per_epoch=10, total_steps=100)
    state = tx.init(params)
    for _ in range(3):
      updates, state = tx.update(grads, state, params)
    return updates

  one, three = third_update(1.0), third_update(3.0)
  assert np.all(np.asarray(one["fc1"]["kron_3x2"]["A"]) != 0)
  for layer, leaf in (("kron_3x2", "A"), ("kron_3x2", "B")):
    np.testing.assert_allclose(three["fc1"][layer][leaf], 3 * one["fc1"][layer][leaf],
                               rtol=1e-6)
  np.testing.assert_array_equal(three["fc1"]["kron_3x2"]["S"], one["fc1"]["kron_3x2"]["S"])
  for layer, leaf in (("fc1", "bias"), ("head", "kernel")):
    assert np.all(np.asarray(one[layer][leaf]) != 0)
    np.testing.assert_array_equal(three[layer][leaf], one[layer][leaf])


def test_lam_schedule_warms_up_then_ramps():
  lam = sparsity.lam_schedule(1.0, start_step=10, ramp_steps=10)
  assert float(lam(5)) == 0.0
  assert abs(float(lam(15)) - 0.5) < 1e-6
  assert float(lam(40)) == 1.0


def test_rewarmed_schedule_warms_up_again_from_the_restart():
  lr = optax.linear_schedule(2.0, 1.0, 100)
  again = sparsity.rewarmed(lr, restart_step=10, warmup_steps=4)
  steps = np.arange(30)
  ramp = np.where(steps < 10, 1.0, np.clip((steps - 9) / 4, 0.0, 1.0))
  want = np.asarray(lr(steps)) * ramp
  np.testing.assert_allclose(np.asarray(again(steps)), want, rtol=1e-6)
  assert float(again(10)) == pytest.approx(float(lr(10)) / 4)  # the first fresh update
  assert sparsity.rewarmed(lr, 10, 0) is lr


def test_unknown_optimizer_names_the_choices():
  with pytest.raises(ValueError, match=r"unknown optimizer 'adam_w'.*adamw"):
    sparsity.base_optimizer("adam_w", lambda t: 1.0, 0.0, 0.0, None)


def two_candidates(key):
  k1, k2 = jax.random.split(key)
  return {"fc1": {"kron_3x2": term(k1), "kron_6x5": term(k2, m1=2, n1=2, m2=6, n2=5)}}


def test_annealing_drops_the_weaker_candidate_at_the_selection_step():
  params = two_candidates(jax.random.key(3))
  params["fc1"]["kron_6x5"]["S"] = 0.1 * params["fc1"]["kron_6x5"]["S"]  # the weaker one
  tx = sparsity.block_sparsity(lam=lambda t: 0.01, lr=lambda t: 1.0, lr_peak=1.0,
                               anneal=lambda t: 1.0, anneal_strength=4.0, select_step=3)
  state = tx.init(params)
  for step in range(6):
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    if step == 0:  # annealing: the weaker candidate is thresholded harder
      weak = 1.0 - np.asarray(params["fc1"]["kron_6x5"]["S"]).mean() / 0.1
      strong = 1.0 - np.asarray(params["fc1"]["kron_3x2"]["S"]).mean()
      assert weak > strong > 0
  assert bool(state.alive["fc1/kron_3x2"]) and not bool(state.alive["fc1/kron_6x5"])
  np.testing.assert_array_equal(params["fc1"]["kron_6x5"]["S"], 0.0)
  assert np.all(np.asarray(params["fc1"]["kron_3x2"]["S"]) != 0)


def test_losers_fade_out_linearly_and_rest_before_the_selection_step():
  params = two_candidates(jax.random.key(3))
  params["fc1"]["kron_6x5"]["S"] = 0.1 * params["fc1"]["kron_6x5"]["S"]  # the loser
  tx = sparsity.block_sparsity(lam=lambda t: 0.0, lr=lambda t: 1.0, lr_peak=1.0,
                               select_step=5, fade_steps=3)  # the choice in step 2
  state = tx.init(params)
  grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
  loser = lambda p: np.asarray(p["fc1"]["kron_6x5"]["S"])
  s_at_choice = None
  for step in range(7):
    before = params
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    gate = float(state.alive["fc1/kron_6x5"])
    assert float(state.alive["fc1/kron_3x2"]) == 1.0
    if step < 2:  # both compete and train
      assert gate == 1.0 and np.any(np.asarray(updates["fc1"]["kron_6x5"]["A"]) != 0)
      continue
    if step == 2:
      s_at_choice = loser(before)  # the step of the choice scales it instead of training it
      np.testing.assert_allclose(loser(params), 0.75 * s_at_choice, rtol=1e-5)
    assert gate == pytest.approx(max(0.0, (5 - step) / 4))
    np.testing.assert_allclose(loser(params), gate * s_at_choice, rtol=1e-5, atol=1e-9)
    for k in "AB":  # the loser's factors rest, the winner's train on
      np.testing.assert_array_equal(updates["fc1"]["kron_6x5"][k], 0.0)
      assert np.all(np.asarray(updates["fc1"]["kron_3x2"][k]) != 0)
    dead = [("fc1", "kron_6x5")] if step >= 5 else []
    assert selection.dead_terms(state) == dead


def test_single_candidate_layers_are_never_dropped():
  params = params_tree()
  tx = sparsity.block_sparsity(lam=lambda t: 0.0, lr=lambda t: 1.0, lr_peak=1.0,
                               anneal=lambda t: 1.0, anneal_strength=4.0, select_step=0)
  updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  assert bool(state.alive["fc1/kron_3x2"])
  np.testing.assert_array_equal(updates["fc1"]["kron_3x2"]["S"], 0.0)


def test_trimmed_penalty_spares_the_largest_blocks_and_never_goes_below_the_target():
  params = params_tree()
  t = params["fc1"]["kron_3x2"]
  t["S"] = jnp.linspace(0.1, 2.0, 20).reshape(4, 5)
  norms = np.asarray(kron.block_norms(t["S"], t["A"], t["B"]))
  largest = norms >= np.sort(norms.ravel())[-5]  # 0.25 * 20 blocks
  zeros = jax.tree.map(jnp.zeros_like, params)

  def prox(**kwargs):
    tx = sparsity.block_sparsity(lam=lambda t: 0.5, lr=lambda t: 1.0, lr_peak=1.0, **kwargs)
    updates, _ = tx.update(zeros, tx.init(params), params)
    return np.asarray(optax.apply_updates(params, updates)["fc1"]["kron_3x2"]["S"])

  plain, trimmed = prox(), prox(trim_density=0.25)
  s = np.asarray(t["S"])
  np.testing.assert_allclose(trimmed[largest], s[largest])  # spared: no shrinkage
  np.testing.assert_allclose(trimmed[~largest], plain[~largest])  # the rest: plain L1
  assert not np.allclose(plain[largest], s[largest])
  # However strong, the trimmed penalty leaves the target's blocks; plain L1 leaves none.
  strong = sparsity.block_sparsity(lam=lambda t: 10.0, lr=lambda t: 1.0, lr_peak=1.0,
                                   trim_density=0.25)
  _, state = strong.update(zeros, strong.init(params), params)
  np.testing.assert_array_equal(state.masks["fc1/kron_3x2"], largest)


@pytest.mark.parametrize("penalty,kept", [("l1", 0), ("trimmed", 5)])
def test_make_optimizer_applies_the_configured_penalty(penalty, kept):
  c = base.get_config()
  c.optimizer.warmup_epochs = 0.0
  c.sparsity.update(lam=10.0, start_epoch=0.0, ramp_epochs=0.0, freeze_epoch=5.0,
                    target_density=0.25, penalty=penalty)
  tx, _, _ = sparsity.make_optimizer(c, steps_per_epoch=10, total_steps=100)
  params = params_tree()
  state = tx.init(params)
  for _ in range(2):  # past the warm-up step with lr = 0
    _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  assert int(sparsity.sparsity_state(state).masks["fc1/kron_3x2"].sum()) == kept
