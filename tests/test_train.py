"""The training loop end to end on tiny data: every config, resume, sharding, eval.py."""
import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bsparse import metric_writers, sparsity, train_lib
from tests.helpers import restore, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["mlp_fmnist", "mlp_fmnist_dense", "cnn_fmnist", "cnn_fmnist_dense", "resnet_bs",
           "resnet_dense", "vit_bs", "vit_dense"]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_trains_on_mock_data(name, tmp_path):
  c = tiny(name)
  with tfds.testing.mock_data(num_examples=48):
    summary = train_lib.train_and_evaluate(c, str(tmp_path))
  assert summary["step"] == 3
  assert summary["test/examples"] == 48
  rows = metric_writers.read_metrics(str(tmp_path))
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
  assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
  peaks = [r["memory/peak_rss_mb"] for r in rows if "train/loss" in r]
  assert min(peaks) > 0 and summary["memory/peak_rss_mb"] > max(peaks) - 1
  sparse = c.layers.kind == "kpd"
  assert ("density/weights" in summary) == sparse
  assert os.path.exists(tmp_path / "checkpoints" / "3")


def test_prox_and_freeze_reach_target_density(tmp_path):
  c = tiny("mlp_fmnist", steps=12)
  c.sparsity.lam = 0.05
  c.sparsity.freeze_epoch = 6 / 4  # step 6 with 32 train examples / batch 8
  c.sparsity.target_density = 0.3
  with tfds.testing.mock_data(num_examples=48):
    summary = train_lib.train_and_evaluate(c, str(tmp_path))
  for key in ("density/fc1/kron_28x10", "density/fc2/kron_10x10"):
    assert 0 < summary[key] <= 0.3 + 1e-6
  rows = [r for r in metric_writers.read_metrics(str(tmp_path)) if "train/loss" in r]
  frozen = [r["density/fc1/kron_28x10"] for r in rows if r["step"] > 7]
  assert max(frozen) <= 0.3 + 1e-6 and frozen == sorted(frozen, reverse=True)


def test_resume_continues_the_same_run(tmp_path):
  c = tiny("mlp_fmnist", steps=6)
  c.sparsity.lam = 0.01
  with tfds.testing.mock_data(num_examples=48):
    straight = train_lib.train_and_evaluate(c, str(tmp_path / "a"))
    train_lib.train_and_evaluate(c, str(tmp_path / "b"))
    # Lose the last checkpoint: the next run restarts from step 4 and redoes 5 and 6.
    import shutil
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")
    resumed = train_lib.train_and_evaluate(c, str(tmp_path / "b"))
  assert resumed["step"] == 6
  assert resumed["test/accuracy"] == straight["test/accuracy"]
  model_a = restore(c, tmp_path / "a").params
  model_b = restore(c, tmp_path / "b").params
  chex.assert_trees_all_close(model_a, model_b, rtol=1e-6, atol=1e-7)


def test_sharded_step_equals_single_device():
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  c = tiny("cnn_fmnist")
  model = train_lib.build_model(c, 10)
  tx, _, _ = sparsity.make_optimizer(c, 10, 10)
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(16, 28, 28, 1)).astype(np.float32),
              "label": rng.integers(0, 10, 16).astype(np.int32)} for _ in range(3)]
  results = []
  for n in (1, 8):
    mesh = train_lib.data_mesh(jax.devices()[:n])
    steps = train_lib.Steps(model, tx, 10, mesh)
    state = train_lib.create_state(train_lib.init_variables(model, (28, 28, 1), 0), tx)
    state = steps.put_state(state)
    for b in batches:
      state, _ = steps.train(state, steps.put_batch(b))
    assert len(jax.tree.leaves(state.params)[0].sharding.device_set) == n
    results.append(jax.device_get(state.params))
  chex.assert_trees_all_close(results[0], results[1], rtol=1e-4, atol=1e-5)


def test_cpu_fusion_emitters_off_compiles_another_program_with_the_same_result():
  c = tiny("mlp_fmnist")
  mesh = train_lib.data_mesh(jax.devices()[:1])
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(8, 28, 28, 1)).astype(np.float32),
           "label": rng.integers(0, 10, 8).astype(np.int32)}
  texts, params = [], []
  for emitters in (True, False):
    c.xla_cpu_fusion_emitters = emitters
    program = train_lib.build_program(c, 10, 10, 10, mesh)
    state = program.steps.put_state(train_lib.create_state(
        train_lib.init_variables(program.model, (28, 28, 1), 0), program.tx))
    b = program.steps.put_batch(batch)
    texts.append(program.steps.lower_train(state, b).compile().as_text())
    for _ in range(2):
      state, _ = program.steps.train(state, b)
    params.append(jax.device_get(state.params))
  assert train_lib.compiler_options(c, mesh) == {"xla_cpu_use_fusion_emitters": False}
  assert texts[0] != texts[1]  # the option reached XLA
  chex.assert_trees_all_close(params[0], params[1], rtol=1e-5, atol=1e-6)


def _run(args, **kw):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, **kw)


def test_config_override_typo_names_the_key(tmp_path):
  out = _run(["train.py", "--config=configs/mlp_fmnist.py", "--config.sparsity.lamb=1e-3",
              f"--workdir={tmp_path}"])
  assert out.returncode != 0
  assert "--config.sparsity.lamb" in out.stderr and 'Did you mean "lam"' in out.stderr
  assert "Traceback" not in out.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_eval_prints_the_layer_table(tmp_path):
  c = tiny("mlp_fmnist", steps=2)
  with tfds.testing.mock_data(num_examples=48):
    train_lib.train_and_evaluate(c, str(tmp_path))
  script = ("import sys, tensorflow_datasets as tfds\n"
            "sys.argv = ['eval.py', '--workdir=" + str(tmp_path) + "']\n"
            "import runpy\n"
            "with tfds.testing.mock_data(num_examples=48):\n"
            "  runpy.run_path('eval.py', run_name='__main__')\n")
  out = _run(["-c", script])
  assert out.returncode == 0, out.stderr[-2000:]
  assert "test accuracy" in out.stdout
  for name in ("fc1", "fc2", "head", "28x10", "kpd_macs", "total", "block-sparse form",
               "forward latency"):
    assert name in out.stdout
  assert os.path.exists(tmp_path / "eval.json") and os.path.exists(tmp_path / "blocks.npz")
  serving = json.load(open(tmp_path / "eval.json"))["serving"]
  assert set(serving["latency_ms"]) == {"kpd", "bsr", "dense"}


@pytest.mark.parametrize("method", ["gradual", "rigl"])
def test_baselines_train_in_the_same_loop(method, tmp_path):
  c = tiny("mlp_fmnist_dense", steps=8)
  c.method = method
  c.baseline.target_density = 0.25
  c.baseline.start_epoch = 0.0
  c.baseline.end_epoch = 1.0
  c.baseline.update_every_steps = 2
  with tfds.testing.mock_data(num_examples=48):
    summary = train_lib.train_and_evaluate(c, str(tmp_path))
  assert summary["density/fc1"] == pytest.approx(28 / 112)  # floor(0.25 * 112) of 28x4 blocks
  assert summary["density/fc2"] == pytest.approx(2 / 8)
