"""Fine-tuning in block-sparse form after the mask freeze (``sparsity.finetune='bsr'``):
the switch keeps the function, the loop trains free blocks on, resumes on either side of
the switch, and eval / export / the report read the block-sparse model; an early switch
prunes the free blocks on to the target and repacks them."""
import contextlib
import dataclasses
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from bsparse import (baselines, checkpoints, data, export, finetune, metric_writers, report,
                     sparsity, train_lib, validate)
from benchmarks import timing, train_step
from tests import helpers


def _zero_some_selectors(params, key, keep: float = 0.4):
  """``params`` with about ``1 - keep`` of every selector's entries set to zero."""
  def visit(node, key):
    if not hasattr(node, "items"):
      return node
    out = {}
    for i, (k, v) in enumerate(sorted(node.items())):
      sub = jax.random.fold_in(key, i)
      if k == "S":
        out[k] = v * (jax.random.uniform(sub, v.shape) < keep)
      else:
        out[k] = visit(v, sub)
    return out
  return visit(params, key)


@pytest.mark.parametrize("name,shape", [("mlp_fmnist", (3, 28, 28, 1)),
                                        ("cnn_fmnist", (2, 28, 28, 1))])
def test_the_switch_keeps_the_function(name, shape):
  c = helpers.tiny(name, 2)
  model = train_lib.build_model(c, 10)
  x = jax.random.normal(jax.random.key(1), shape)
  params = model.init(jax.random.key(0), x)["params"]
  params = jax.device_get(_zero_some_selectors(params, jax.random.key(2)))
  switch, bsr_params = finetune.switch_from_params(params, step=7)
  assert switch.step == 7
  sparse_layers = {"mlp_fmnist": {"fc1", "fc2"}, "cnn_fmnist": {"conv2", "fc1"}}[name]
  assert set(switch.layers) == sparse_layers
  for layer in sparse_layers:
    term = next(iter(params[layer][k] for k in params[layer] if k.startswith("kron_")))
    assert switch.layers[layer]["nnz"] == int((np.asarray(term["S"]) != 0).sum())
  assert switch.scalars["density/weights"] == pytest.approx(
      float(sparsity.weight_density(params)))
  bsr_model = train_lib.build_model(c, 10, switch)
  want = model.apply({"params": params}, x)
  got = bsr_model.apply({"params": bsr_params, **switch.index()}, x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dense_from", [2.0, 0.0])  # block-sparse products, dense ones
def test_sharded_block_sparse_step_equals_single_device(dense_from):
  c = helpers.tiny("cnn_fmnist", 2)
  c.kernels.dense_from = dense_from
  model = train_lib.build_model(c, 10)
  x = jnp.zeros((1, 28, 28, 1))
  params = jax.device_get(_zero_some_selectors(
      model.init(jax.random.key(0), x)["params"], jax.random.key(2)))
  switch, bsr_params = finetune.switch_from_params(params, step=0)
  bsr_params = jax.device_get(bsr_params)  # host copies: the steps donate the state
  bsr_model = train_lib.build_model(c, 10, switch)
  tx = optax.adam(1e-2)
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(16, 28, 28, 1)).astype(np.float32),
              "label": rng.integers(0, 10, 16).astype(np.int32)} for _ in range(2)]
  results = []
  for n in (1, 8):
    steps = train_lib.Steps(bsr_model, tx, 10, train_lib.data_mesh(jax.devices()[:n]),
                            consts=switch.index())
    state = steps.put_state(train_lib.create_state({"params": bsr_params}, tx))
    for b in batches:
      state, _ = steps.train(state, steps.put_batch(b))
    results.append(jax.device_get(state.params))
  chex.assert_trees_all_close(results[0], results[1], rtol=1e-4, atol=1e-5)
  # The products see each device's 2 images: no device gathers the batch.
  hlo = steps.lower_train(state, steps.put_batch(batches[0])).compile().as_text()
  assert "all-gather" not in hlo


def test_continue_schedules_restarts_the_moments_but_not_the_learning_rate():
  lr = optax.linear_schedule(1.0, 0.0, 100)
  tx = optax.adamw(lr, weight_decay=0.0)
  params = {"w": jnp.ones((3,))}
  state = finetune.continue_schedules(tx.init(params), 40)
  adam = next(s for s in jax.tree.leaves(
      state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
              if isinstance(s, optax.ScaleByAdamState))
  assert int(adam.count) == 0
  updates, _ = tx.update({"w": jnp.ones((3,))}, state, params)
  # Adam's first step is -1 per coordinate (bias-corrected), times lr(40) = 0.6.
  np.testing.assert_allclose(updates["w"], -0.6 * np.ones(3), rtol=1e-3)


# --------------------------------------------------------------------------- in the loop


def switching(steps: int = 10):
  """Tiny MLP, rank 2, 4 steps per epoch: the mask freezes in the update of step 5
  (freeze_step 4) and checkpoint 5 holds the block-sparse model."""
  return helpers.tiny("mlp_fmnist", steps, **{
      "layers.rank": 2, "sparsity.freeze_epoch": 1.0, "sparsity.target_density": 0.3,
      "sparsity.finetune": "bsr", "checkpoint_every_steps": 3, "keep_checkpoints": 20})






@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run of ``switching()``: (config, workdir, summary, final state)."""
  c, workdir = switching(), tmp_path_factory.mktemp("reference")
  summary = helpers.train(c, workdir)
  return c, workdir, summary, helpers.restored(c, workdir)[0]


def _stored_blocks(state, program, layer):
  nnz = int(program.consts["bsr_index"][layer]["nnz"])
  return np.asarray(state.params[layer]["blocks"])[:nnz]


def test_the_loop_switches_and_trains_the_free_blocks(reference, tmp_path):
  c, workdir, summary, _ = reference
  [record] = finetune.load_switches(str(workdir))
  assert record.step == 5 and set(record.layers) == {"fc1", "fc2"}
  # fc1: 784x40 with 28x10 blocks is a 28x4 grid; 30% of it is 33 blocks.
  assert record.layers["fc1"]["nnz"] == 33 and record.layers["fc1"]["block_shape"] == [28, 10]
  state, program = helpers.restored(c, workdir)
  assert int(state.step) == 10 and program.switch == record
  assert set(state.params["fc1"]) == {"blocks", "bias"}
  assert state.params["fc1"]["blocks"].shape == (33, 28, 10)
  assert summary["density/fc1/kron_28x10"] == pytest.approx(33 / 112)
  # At the switch every block is a combination of the rank-2 basis B; five free steps
  # later the blocks span more than two dimensions.
  at_switch, _ = helpers.restored(c, helpers.copy_up_to(workdir, tmp_path / "at5", 5))
  rank = lambda s: np.linalg.matrix_rank(_stored_blocks(s, program, "fc1").reshape(33, -1),
                                         tol=1e-5)
  assert rank(at_switch) <= 2 < rank(state)
  # The optimizer restarted its moments at the switch; the schedule went on.
  kinds = (optax.ScaleByAdamState, optax.ScaleByScheduleState)
  counts = {type(s).__name__: int(s.count) for s in jax.tree.leaves(
      state.opt_state, is_leaf=lambda s: isinstance(s, kinds)) if isinstance(s, kinds)}
  assert counts["ScaleByAdamState"] == 5 and counts["ScaleByScheduleState"] == 10
  with tfds.testing.mock_data(num_examples=48):
    test = data.get_datasets(c).test
  assert train_lib.evaluate(program.steps, state, test, 16)["accuracy"] == pytest.approx(
      summary["test/accuracy"])
  rows = [r for r in metric_writers.read_metrics(str(workdir)) if "train/loss" in r]
  assert all(np.isfinite(r["train/loss"]) for r in rows)
  assert [r["density/weights"] for r in rows if r["step"] >= 5] == [
      record.scalars["density/weights"]] * 6


def test_eval_forms_of_the_block_sparse_model_agree(reference, tmp_path):
  c, workdir, _, _ = reference
  state, program = helpers.restored(c, workdir)
  variables = jax.device_get(program.variables(state))
  forms = export.serving_forms(program.model, variables, (1, 28, 28, 1))
  assert set(forms) == {"bsr", "dense"}
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  outs = {k: m.apply(v, x) for k, (m, v) in forms.items()}
  np.testing.assert_allclose(outs["dense"], outs["bsr"], rtol=1e-4, atol=1e-4)
  rows = {r["layer"]: r for r in report.layer_table(program.model, variables, (1, 28, 28, 1))}
  assert rows["fc1"]["block"] == "28x10 bsr" and rows["fc1"]["density"] == pytest.approx(33 / 112)
  assert rows["fc1"]["bsr_macs"] == 33 * 28 * 10 and rows["head"]["block"] == "dense"
  densely = program.model.clone(  # a layer at a quarter of its grid multiplies densely
      layers=dataclasses.replace(program.model.layers, dense_from=0.25))
  fc1 = {r["layer"]: r for r in report.layer_table(densely, variables, (1, 28, 28, 1))}["fc1"]
  assert fc1["bsr_macs"] == fc1["dense_macs"] == 112 * 28 * 10
  assert fc1["bsr_params"] == rows["fc1"]["bsr_params"]
  export.save_blocks(variables["params"], str(tmp_path / "blocks.npz"), variables["bsr_index"])
  saved = np.load(tmp_path / "blocks.npz")
  assert saved["fc1/bsr/blocks"].shape == (33, 28, 10)
  dense_kernel = forms["dense"][1]["params"]["fc1"]["kernel"]
  r, col = saved["fc1/bsr/rows"][0], saved["fc1/bsr/cols"][0]
  np.testing.assert_array_equal(dense_kernel[28 * r:28 * (r + 1), 10 * col:10 * (col + 1)],
                                saved["fc1/bsr/blocks"][0])


def test_train_step_benchmark_times_both_kernels_on_the_same_model(reference):
  c, workdir, _, _ = reference
  with tfds.testing.mock_data(num_examples=48):
    datasets = data.get_datasets(c)
  runs = {impl: train_step.restored_step(str(workdir), c, impl, datasets)
          for impl in ("cpu", "xla")}
  times, states = timing.time_steps(runs, rounds=2, steps=2)
  assert {k: len(v) for k, v in times.items()} == {"cpu": 2, "xla": 2}
  assert all(t > 0 for ts in times.values() for t in ts)
  # Five steps from the same checkpoint on the same batch: the kernels agree.
  chex.assert_trees_all_close(states["cpu"].params, states["xla"].params, rtol=1e-4, atol=1e-5)


def test_the_learning_rate_warms_up_again_after_the_switch(reference, tmp_path):
  c, workdir, _, _ = reference
  warm = switching()  # the reference's default 0.25 epochs is one step here: no ramp
  warm.sparsity.switch_warmup_epochs = 1.0  # 4 steps
  helpers.train(warm, tmp_path / "warm")
  lr = lambda d: {r["step"]: r["lr"] for r in metric_writers.read_metrics(str(d)) if "lr" in r}
  plain, again = lr(workdir), lr(tmp_path / "warm")
  # The rows of steps 6-9 log the updates of counts 5-8, the first four with fresh moments.
  assert [again[s] / plain[s] for s in range(2, 11)] == pytest.approx(
      [1, 1, 1, 1, 0.25, 0.5, 0.75, 1, 1])  # step 1 logs lr(0) = 0 in both
  # So the first update after the switch moves the kept blocks a quarter as far.
  def moved(config, d):
    at = lambda step: np.asarray(helpers.restored(
        config, helpers.copy_up_to(d, tmp_path / f"{d.name}{step}", step))[0]
                                 .params["fc1"]["blocks"])
    return np.abs(at(6) - at(5)).mean()

  assert moved(warm, tmp_path / "warm") / moved(c, workdir) == pytest.approx(0.25, rel=0.05)


@pytest.mark.parametrize("resume_at", [6, 3])  # after the switch, before it
def test_resuming_around_the_switch_equals_one_run(reference, tmp_path, resume_at):
  c, workdir, _, final = reference
  b = helpers.copy_up_to(workdir, tmp_path / "b", resume_at)
  if resume_at < 5:
    os.remove(b / finetune.RECORD_FILE)
  helpers.train(c, b)
  chex.assert_trees_all_close(final.params, helpers.restored(c, b)[0].params, atol=1e-6)
  assert finetune.load_switches(str(b)) == finetune.load_switches(str(workdir))


def test_checkpoints_after_the_switch_need_their_record(reference, tmp_path):
  c, workdir, _, _ = reference
  b = helpers.copy_up_to(workdir, tmp_path / "b", 6)
  os.remove(b / finetune.RECORD_FILE)
  before = sorted(os.listdir(b / "checkpoints"))
  with pytest.raises(checkpoints.CheckpointError, match=finetune.RECORD_FILE):
    helpers.train(c, b)
  assert sorted(os.listdir(b / "checkpoints")) == before
  (b / finetune.RECORD_FILE).write_text("{not json")
  with pytest.raises(checkpoints.CheckpointError, match="unreadable"):
    helpers.train(c, b)


@pytest.mark.parametrize("changes,match", [
    ({"method": "gradual", "layers.kind": "dense"}, "needs method='kpd'"),
    ({"sparsity.freeze_epoch": -1.0}, "set sparsity.freeze_epoch >= 0"),
    ({"layers.block_shapes.fc1": ((28, 10), (14, 10)), "selection.select_epoch": 2.0},
     "must select one before the switch"),
    ({"sparsity.finetune": "csr"}, "valid: kpd, bsr"),
    ({"sparsity.prune_schedule": "cubic", "sparsity.start_epoch": 1.0},
     "set freeze_epoch > start_epoch"),
    ({"sparsity.switch_epoch": 0.5}, "needs prune_schedule='cubic'"),
    ({"sparsity.finetune": "kpd", "sparsity.switch_epoch": 0.5}, "needs sparsity.finetune"),
    ({"sparsity.prune_schedule": "cubic", "sparsity.switch_epoch": 1.0},
     "switch_epoch < freeze_epoch"),
    ({"layers.block_shapes.fc1": ((28, 10), (14, 10)), "selection.select_epoch": 0.75,
      "sparsity.prune_schedule": "cubic", "sparsity.switch_epoch": 0.5},
     "valid: 0 <= select_epoch <= 0.5"),
])
def test_bad_finetune_and_pruning_settings_are_named(changes, match):
  c = switching()
  c.update_from_flattened_dict(changes)
  with pytest.raises(validate.ConfigError, match=match):
    validate.validate_config(c, train_lib.build_model)


# --------------------------------------------------------------------------- early switch


def early(steps: int = 12, **changes):
  """``switching()`` with cubic pruning from step 0 to the freeze at step 8 (to density
  0.2, every step) and the switch after step 2: the free blocks are pruned in steps 3-8,
  checkpoint 9 holds the repacked model."""
  return helpers.tiny("mlp_fmnist", steps, **{
      "layers.rank": 2, "sparsity.freeze_epoch": 2.0, "sparsity.target_density": 0.2,
      "sparsity.finetune": "bsr", "sparsity.prune_schedule": "cubic",
      "sparsity.prune_every_steps": 1, "sparsity.switch_epoch": 0.5,
      "checkpoint_every_steps": 3, "keep_checkpoints": 20, **changes})


@pytest.fixture(scope="module")
def early_run(tmp_path_factory):
  c, workdir = early(), tmp_path_factory.mktemp("early")
  summary = helpers.train(c, workdir)
  return c, workdir, summary, helpers.restored(c, workdir)[0]


def test_an_early_switch_prunes_the_free_blocks_then_keeps_only_the_survivors(early_run,
                                                                               tmp_path):
  c, workdir, summary, final = early_run
  first, second = finetune.load_switches(str(workdir))
  assert (first.step, second.step) == (3, 9)
  # fc1: a 28x4 grid; fc2: 4x2. The cubic schedule reaches floor(0.2 * blocks) exactly.
  assert {k: v["nnz"] for k, v in second.layers.items()} == {"fc1": 22, "fc2": 1}
  assert all(first.layers[k]["nnz"] > second.layers[k]["nnz"] for k in first.layers)
  assert final.params["fc1"]["blocks"].shape == (22, 28, 10)
  assert summary["density/fc1/kron_28x10"] == pytest.approx(22 / 112)
  # The blocks the repack kept sit where they were: a subset of the first switch's.
  pairs = lambda layer: list(zip(layer["rows"], layer["cols"]))
  assert set(pairs(second.layers["fc1"])) < set(pairs(first.layers["fc1"]))
  # Between the switches the stored blocks are pruned: blocks out of the logged density
  # are exactly zero in checkpoint 6, the model still stores all of the first switch's.
  mid, program = helpers.restored(c, helpers.copy_up_to(workdir, tmp_path / "at6", 6))
  assert program.switch == first
  blocks = np.asarray(mid.params["fc1"]["blocks"])
  live = int((np.abs(blocks).sum(axis=(1, 2)) > 0).sum())
  rows = {r["step"]: r for r in metric_writers.read_metrics(str(workdir)) if "train/loss" in r}
  assert blocks.shape[0] == first.layers["fc1"]["nnz"] > live
  assert live == round(rows[6]["density/fc1/kron_28x10"] * 112)
  logged = [rows[t]["density/weights"] for t in range(3, 13)]
  assert logged == sorted(logged, reverse=True) and logged[-1] == second.scalars[
      "density/weights"]
  # The optimizer's moments of the kept blocks went on through the repack.
  adam = [s for s in jax.tree.leaves(final.opt_state, is_leaf=lambda s: isinstance(
      s, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
  assert int(adam[0].count) == 12 - 3


def test_static_trains_the_blocks_the_early_switch_kept(early_run, tmp_path):
  """``baseline.mask_from``: a dense model whose static mask is the KPD run's final blocks."""
  workdir = early_run[1]
  c = helpers.tiny("mlp_fmnist_dense", 4, **{
      "method": "static", "baseline.target_density": 0.2, "baseline.mask_from": str(workdir)})
  summary = helpers.train(c, tmp_path)
  masks = baselines.baseline_state(helpers.restored(c, tmp_path)[0].opt_state).masks
  [_, second] = finetune.load_switches(str(workdir))
  for name, layer in second.layers.items():
    assert sorted(zip(*np.nonzero(np.asarray(masks[name])))) == sorted(
        zip(layer["rows"], layer["cols"]))
  assert summary["density/fc1"] == pytest.approx(22 / 112)


@pytest.mark.parametrize("keep_budget", [False, True])
def test_the_repack_keeps_the_function_and_the_moments(early_run, tmp_path, keep_budget):
  c, workdir, _, _ = early_run
  first, _ = finetune.load_switches(str(workdir))
  state, program = helpers.restored(c, helpers.copy_up_to(workdir, tmp_path / "at6", 6))
  state = jax.device_get(state)
  second, params, opt_state = finetune.repack(first, state.params, state.opt_state, 6,
                                              keep_budget)
  x = jax.random.normal(jax.random.key(0), (3, 28, 28, 1))
  repacked = train_lib.build_model(c, 10, second)
  np.testing.assert_allclose(
      repacked.apply({"params": params, **second.index()}, x),
      program.model.apply(program.variables(state), x), rtol=1e-5, atol=1e-5)
  nnz, budget = second.layers["fc1"]["nnz"], len(first.layers["fc1"]["rows"])
  pairs = lambda layer: list(zip(layer["rows"], layer["cols"]))
  kept = pairs(first.layers["fc1"]).index(pairs(second.layers["fc1"])[nnz - 1])
  mu = lambda s: next(l for l in jax.tree.leaves(s, is_leaf=lambda l: isinstance(
      l, optax.ScaleByAdamState)) if isinstance(l, optax.ScaleByAdamState)).mu
  old, new = mu(state.opt_state)["fc1"]["blocks"], mu(opt_state)["fc1"]["blocks"]
  np.testing.assert_array_equal(new[nnz - 1], old[kept])
  # Within the budget nothing changes shape; the entries after the kept blocks are padding.
  assert new.shape[0] == len(second.layers["fc1"]["rows"]) == (budget if keep_budget else nnz)
  masks = sparsity.sparsity_state(opt_state).masks["fc1/blocks"]
  assert masks.shape == new.shape[:1] and masks[:nnz].all() and not masks[nnz:].any()
  assert not np.any(new[nnz:]) and not np.any(params["fc1"]["blocks"][nnz:])


@pytest.mark.parametrize("resume_at", [6, 9])  # between the switches, after the repack
def test_resuming_an_early_switch_equals_one_run(early_run, tmp_path, resume_at):
  c, workdir, _, final = early_run
  b = helpers.copy_up_to(workdir, tmp_path / "b", resume_at)
  if resume_at < 9:  # killed before the repack was recorded
    finetune.save_switches(str(b), finetune.load_switches(str(b))[:1])
  helpers.train(c, b)
  chex.assert_trees_all_close(final.params, helpers.restored(c, b)[0].params, atol=1e-6)
  assert finetune.load_switches(str(b)) == finetune.load_switches(str(workdir))


@contextlib.contextmanager
def train_step_builds():
  """Counts the train programs XLA builds in the block (a list, filled as they are)."""
  built = []

  def listen(event, duration, fun_name="", **_):
    del duration
    if event == "/jax/core/compile/backend_compile_duration" and fun_name == "jit(train_step)":
      built.append(fun_name)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield built
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


@pytest.fixture(scope="module")
def repacking_run(tmp_path_factory):
  """``early()`` repacking every step: the switch at 3, repacks at 4-8, the freeze's at 9;
  also the number of train programs it built."""
  c, workdir = early(**{"sparsity.repack_every_steps": 1}), tmp_path_factory.mktemp("rp")
  with train_step_builds() as built:
    summary = helpers.train(c, workdir)
  return c, workdir, summary, helpers.restored(c, workdir)[0], len(built)


def test_repacks_between_switch_and_freeze_shrink_the_model_not_the_result(
    early_run, repacking_run):
  c, workdir, summary, final, builds = repacking_run
  switches = finetune.load_switches(str(workdir))
  assert [s.step for s in switches] == list(range(3, 10))
  stored = lambda s: set(zip(s.layers["fc1"]["rows"][:s.layers["fc1"]["nnz"]],
                             s.layers["fc1"]["cols"][:s.layers["fc1"]["nnz"]]))
  for before, after in zip(switches, switches[1:]):
    assert stored(after) <= stored(before)
  nnz = [s.layers["fc1"]["nnz"] for s in switches]
  assert nnz == sorted(nnz, reverse=True) and nnz[0] > nnz[1] and nnz[-1] == 22
  # A repack before the freeze keeps the budget (padding after the kept blocks) while
  # every layer keeps more than half of it, and the compiled train program goes on; one
  # that shrinks it, and the freeze's, build a new one (as do the KPD model and the switch).
  budget = lambda s, name: len(s.layers[name]["rows"])
  shrunk = 0
  for before, after in zip(switches, switches[1:]):
    shrink = after is switches[-1] or any(
        2 * after.layers[k]["nnz"] <= budget(before, k) for k in after.layers)
    for k, layer in after.layers.items():
      assert budget(after, k) == (max(layer["nnz"], 1) if shrink else budget(before, k))
    shrunk += shrink
  assert 1 <= shrunk < len(switches) - 1  # at least one repack kept the budget
  assert builds == 2 + shrunk
  # Dropping pruned (zero) blocks early changes what a step costs, not what it computes.
  assert switches[-1] == finetune.load_switches(str(early_run[1]))[-1]
  chex.assert_trees_all_close(final.params, early_run[3].params, atol=1e-5)
  assert summary["test/accuracy"] == pytest.approx(early_run[2]["test/accuracy"])


def test_resuming_between_repacks_equals_one_run(repacking_run, tmp_path):
  c, workdir, _, final, _ = repacking_run
  b = helpers.copy_up_to(workdir, tmp_path / "b", 6)
  finetune.save_switches(str(b), [s for s in finetune.load_switches(str(b))
                                  if s.step <= 6])  # killed at step 6
  helpers.train(c, b)
  chex.assert_trees_all_close(final.params, helpers.restored(c, b)[0].params, atol=1e-6)
  assert finetune.load_switches(str(b)) == finetune.load_switches(str(workdir))


def test_checkpoints_after_the_repack_need_it_recorded(early_run, tmp_path):
  c, workdir, _, _ = early_run
  b = helpers.copy_up_to(workdir, tmp_path / "b", 9)
  finetune.save_switches(str(b), finetune.load_switches(str(b))[:1])
  with pytest.raises(checkpoints.CheckpointError, match="from step 9 on"):
    helpers.train(c, b)


def test_a_record_of_one_switch_as_first_written_still_loads(reference, tmp_path):
  _, workdir, _, _ = reference
  [record] = finetune.load_switches(str(workdir))
  legacy = {"step": record.step, "scalars": record.scalars,
            "layers": {k: {f: v[f] for f in v if f != "grid"} for k, v in record.layers.items()}}
  (tmp_path / finetune.RECORD_FILE).write_text(__import__("json").dumps(legacy))
  [loaded] = finetune.load_switches(str(tmp_path))
  assert loaded.step == record.step and loaded.index().keys() == record.index().keys()
