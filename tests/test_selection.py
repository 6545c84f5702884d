"""Dropping losing block-size candidates from params, optimizer state and config, and
doing it inside the training loop (resume on either side of the selection)."""
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from bsparse import (checkpoints, data, layers, metric_writers, selection, sparsity,
                     train_lib, validate)
from tests import helpers
from tests.test_sparsity import two_candidates


def test_prune_tree_removes_dead_terms_everywhere():
  params = two_candidates(jax.random.key(0))
  params["fc1"]["kron_6x5"]["S"] = 0.01 * params["fc1"]["kron_6x5"]["S"]
  tx = optax.chain(optax.adam(1e-3), sparsity.block_sparsity(
      lam=lambda t: 0.0, lr=lambda t: 1.0, lr_peak=1.0, select_step=0))
  state = tx.init(params)
  updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  params = optax.apply_updates(params, updates)
  dead = selection.dead_terms(state)
  assert dead == [("fc1", "kron_6x5")]
  params2, state2 = selection.prune_tree(params, dead), selection.prune_tree(state, dead)
  assert set(params2["fc1"]) == {"kron_3x2"}
  adam = state2[0][0]
  assert set(adam.mu["fc1"]) == {"kron_3x2"} and set(adam.nu["fc1"]) == {"kron_3x2"}
  sp = sparsity.sparsity_state(state2)
  assert set(sp.masks) == {"fc1/kron_3x2"} and set(sp.alive) == {"fc1/kron_3x2"}
  assert selection.block_shapes(params2) == {"fc1": ((3, 2),)}
  # The pruned state keeps working with the pruned params.
  grads = jax.tree.map(jnp.ones_like, params2)
  updates, _ = tx.update(grads, state2, params2)
  assert np.all(np.isfinite(np.asarray(updates["fc1"]["kron_3x2"]["A"])))


# --------------------------------------------------------------------------- in the loop


def selecting(steps: int = 10):
  """Tiny MLP whose fc1 holds two candidates; 4 steps per epoch, so the selection runs in
  the update of step 5 (select_step 4) and checkpoint 5 holds the smaller model."""
  c = helpers.tiny("mlp_fmnist", steps)
  c.layers.block_shapes.fc1 = ((28, 10), (14, 10))
  c.selection.start_epoch = 0.0
  c.selection.anneal_epochs = 0.5
  c.selection.select_epoch = 1.0
  c.checkpoint_every_steps = 3  # and at the selection: checkpoints 3, 5, 6, 9, 10
  c.keep_checkpoints = 20
  return c






@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run of ``selecting()``: (config, workdir, summary, final state)."""
  c, workdir = selecting(), tmp_path_factory.mktemp("reference")
  summary = helpers.train(c, workdir)
  return c, workdir, summary, helpers.restored(c, workdir)[0]


def test_the_loop_drops_the_losers_and_trains_on(reference):
  c, workdir, summary, _ = reference
  choice = selection.load_choice(str(workdir))
  assert choice is not None and choice.step == 5 and set(choice.block_shapes) == {"fc1"}
  kept = layers.term_name(choice.block_shapes["fc1"])
  assert kept in ("kron_28x10", "kron_14x10")
  state, program = helpers.restored(c, workdir)
  assert int(state.step) == 10
  assert set(state.params["fc1"]) == {kept, "bias"}
  assert set(sparsity.sparsity_state(state.opt_state).masks) == {f"fc1/{kept}",
                                                                  "fc2/kron_10x10"}
  # The checkpoint holds the model the program builds: it evaluates to the run's accuracy.
  with tfds.testing.mock_data(num_examples=48):
    test = data.get_datasets(c).test
  assert train_lib.evaluate(program.steps, state, test, 16)["accuracy"] == pytest.approx(
      summary["test/accuracy"])
  rows = metric_writers.read_metrics(str(workdir))
  train_rows = [r for r in rows if "train/loss" in r]
  assert all(np.isfinite(r["train/loss"]) for r in train_rows)
  assert all(f"share/fc1/{kept}" in r for r in train_rows if r["step"] < 5)
  assert not any(k.startswith("share/") for r in train_rows if r["step"] >= 5 for k in r)


def test_a_conv_layer_selects_its_block_size_and_trains_on(tmp_path):
  c = helpers.tiny("cnn_fmnist", 7, **{"selection.start_epoch": 0.0,
                                       "selection.anneal_epochs": 0.5,
                                       "selection.select_epoch": 1.0})
  c.layers.block_shapes.conv2 = ((4, 4), (2, 2))
  summary = helpers.train(c, tmp_path)
  choice = selection.load_choice(str(tmp_path))
  assert choice is not None and set(choice.block_shapes) == {"conv2"}
  kept = layers.term_name(choice.block_shapes["conv2"])
  state, program = helpers.restored(c, tmp_path)
  assert int(state.step) == 7 and set(state.params["conv2"]) == {kept, "bias"}
  with tfds.testing.mock_data(num_examples=48):
    test = data.get_datasets(c).test
  assert train_lib.evaluate(program.steps, state, test, 16)["accuracy"] == pytest.approx(
      summary["test/accuracy"])


@pytest.mark.parametrize("resume_at", [6, 3])  # after the selection, before it
def test_resuming_around_the_selection_equals_one_run(reference, tmp_path, resume_at):
  c, workdir, _, final = reference
  b = helpers.copy_up_to(workdir, tmp_path / "b", resume_at)
  if resume_at < 5:
    os.remove(b / selection.CHOICE_FILE)
  helpers.train(c, b)
  chex.assert_trees_all_close(final.params, helpers.restored(c, b)[0].params, atol=1e-6)
  assert selection.load_choice(str(b)) == selection.load_choice(str(workdir))


@pytest.fixture(scope="module")
def fading(tmp_path_factory):
  """``selecting()`` whose loser fades out over half an epoch: the choice in the update of
  step 3 (count 2), the loser's weight at 2/3 and 1/3 of it after steps 3 and 4, gone
  after step 5; checkpoint 3 is taken during the fade."""
  c = selecting()
  c.selection.fade_epochs = 0.5
  workdir = tmp_path_factory.mktemp("fading")
  summary = helpers.train(c, workdir)
  return c, workdir, summary, helpers.restored(c, workdir)[0]


def test_the_loser_hands_over_to_the_winner_before_the_drop(fading, tmp_path):
  c, workdir, _, final = fading
  choice = selection.load_choice(str(workdir))
  assert choice is not None and choice.step == 5
  kept = layers.term_name(choice.block_shapes["fc1"])
  lost = ({"kron_28x10", "kron_14x10"} - {kept}).pop()
  share = {r["step"]: r[f"share/fc1/{lost}"] for r in metric_writers.read_metrics(str(workdir))
           if f"share/fc1/{lost}" in r}
  assert share[4] < share[3] < share[2] and share[4] > 0  # fading, not yet dropped
  # Resuming in the middle of the fade gives the run that did not stop.
  b = helpers.copy_up_to(workdir, tmp_path / "b", 3)
  os.remove(b / selection.CHOICE_FILE)
  helpers.train(c, b)
  chex.assert_trees_all_close(final.params, helpers.restored(c, b)[0].params, atol=1e-6)
  assert selection.load_choice(str(b)) == choice


def test_a_fade_longer_than_the_selection_is_refused():
  c = selecting()
  c.selection.fade_epochs = 1.5
  with pytest.raises(validate.ConfigError, match=r"config.selection.fade_epochs = 1.5: .*"
                     r"valid: 0 <= fade_epochs <= select_epoch"):
    validate.validate_config(c, train_lib.build_model)


def test_checkpoints_after_the_selection_need_their_record(reference, tmp_path):
  c, workdir, _, _ = reference
  b = helpers.copy_up_to(workdir, tmp_path / "b", 6)
  os.remove(b / selection.CHOICE_FILE)
  before = sorted(os.listdir(b / "checkpoints"))
  with pytest.raises(checkpoints.CheckpointError, match="selection.json"):
    helpers.train(c, b)
  assert sorted(os.listdir(b / "checkpoints")) == before


def test_a_layer_whose_candidates_all_collapsed_is_reported(tmp_path, caplog):
  c = selecting(steps=6)
  c.sparsity.lam = 10.0  # every selector is zero after the first steps
  summary = helpers.train(c, tmp_path)
  assert "collapsed before the selection" in caplog.text and "fc1/kron_" in caplog.text
  assert caplog.text.count("has no block left") == 2  # fc1 and fc2, once each
  assert summary["density/weights"] == 0.0
