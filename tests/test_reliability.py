"""When things go wrong: preemption, killed runs, corrupt checkpoints, bad configs, NaNs,
missing data. Every run is a tiny MLP on ``tfds.testing.mock_data``."""
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bsparse import data as data_lib
from bsparse import checkpoints, metric_writers, train_lib, validate
from tests import helpers
from tests.helpers import restore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOCK_EXAMPLES = 48  # 32 train + 16 validation examples: 4 steps per epoch


def tiny(steps: int = 6, **changes):
  """The tiny MLP checkpointing every step, with a strong penalty and the mask frozen
  after the first epoch."""
  return helpers.tiny("mlp_fmnist", steps, **{
      "checkpoint_every_steps": 1, "keep_checkpoints": 10, "sparsity.lam": 0.01,
      "sparsity.freeze_epoch": 1.0, **changes})


def train(c, workdir, **kwargs):
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    return train_lib.train_and_evaluate(c, str(workdir), **kwargs)


def deterministic(row):
  """``row`` without what depends on the machine: throughput and the process's memory."""
  return {k: v for k, v in row.items()
          if k != "examples_per_sec" and not k.startswith("memory/")}


def rows(workdir):
  """The metrics rows, without what depends on the machine."""
  return [deterministic(r) for r in metric_writers.read_metrics(str(workdir))]


def steps_on_disk(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


# --------------------------------------------------------------------------- train.py


CONFIG_FILE = """\
import json
import ml_collections

def get_config():
  return ml_collections.ConfigDict(json.loads({text!r}))
"""

# Runs train.py on mock data; every batch takes `delay` seconds more, so that a test
# can signal the run between two checkpoints.
TRAIN_SCRIPT = """\
import runpy, sys, time
import tensorflow_datasets as tfds
from bsparse import data

def slow(*args, _batches=data.train_batches, **kwargs):
  for batch in _batches(*args, **kwargs):
    time.sleep({delay})
    yield batch

data.train_batches = slow
sys.argv = ["train.py"] + {args!r}
with tfds.testing.mock_data(num_examples={examples}):
  runpy.run_path("train.py", run_name="__main__")
"""


def train_py(tmp_path, workdir, steps=6, delay=0.0, extra=()):
  """A train.py process (started, not waited for) on the tiny config."""
  config = tmp_path / f"tiny_{steps}.py"
  config.write_text(CONFIG_FILE.format(text=tiny(steps).to_json()))
  args = [f"--config={config}", f"--workdir={workdir}", *extra]
  script = TRAIN_SCRIPT.format(delay=delay, args=args, examples=MOCK_EXAMPLES)
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # a rerun compiles nothing
  return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, text=True, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_checkpoint(proc, workdir, step, timeout=120):
  path = os.path.join(workdir, "checkpoints", str(step))
  deadline = time.monotonic() + timeout
  while not os.path.isdir(path):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.monotonic() < deadline, f"no checkpoint {step} after {timeout}s"
    time.sleep(0.02)


def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path):
  c = tiny(steps=8)
  straight = train(c, tmp_path / "straight")

  killed = tmp_path / "killed"
  proc = train_py(tmp_path, killed, steps=8, delay=0.3)
  wait_for_checkpoint(proc, killed, 3)
  proc.kill()
  proc.wait()
  assert not os.path.exists(killed / "summary.json")  # killed mid-run
  assert max(steps_on_disk(killed)) < 8

  proc = train_py(tmp_path, killed, steps=8)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "Resuming from the checkpoint at step" in out

  assert rows(killed) == rows(tmp_path / "straight")  # one row per step, no duplicates
  chex.assert_trees_all_equal(restore(c, killed), restore(c, tmp_path / "straight"))
  assert straight["test/accuracy"] == rows(killed)[-1]["test/accuracy"]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  proc = train_py(tmp_path, tmp_path, steps=20, delay=0.3)
  wait_for_checkpoint(proc, tmp_path, 2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  assert "Traceback" not in err
  assert "Stopped by SIGTERM: saved the checkpoint of step" in err
  stopped = int(err.split("checkpoint of step ")[1].split()[0])
  assert 2 <= stopped < 20 and max(steps_on_disk(tmp_path)) == stopped
  assert [r["step"] for r in rows(tmp_path) if "train/loss" in r] == list(range(1, stopped + 1))


def test_bad_config_fails_before_any_work(tmp_path):
  proc = train_py(tmp_path, tmp_path / "run", extra=["--config.layers.rank=0"])
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2
  assert "config.layers.rank = 0: must be >= 1" in err and "Traceback" not in err
  assert not os.path.exists(tmp_path / "run")


def test_missing_dataset_is_a_clean_error(tmp_path):
  out = subprocess.run(
      [sys.executable, "train.py", "--config=configs/mlp_fmnist.py", f"--workdir={tmp_path}",
       "--config.dataset.source=tfds", "--config.dataset.download=False",
       f"--config.dataset.data_dir={tmp_path / 'data'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1, out.stderr[-3000:]
  assert "Error: Dataset 'fashion_mnist' is not prepared" in out.stderr
  assert "apt-get install dataset-fashion-mnist" in out.stderr and "data_dir" in out.stderr
  assert "Traceback" not in out.stderr


# --------------------------------------------------------------------------- checkpoints


def truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def replace_arrays(checkpoint, source):
  """Gives ``checkpoint`` the (intact) arrays of ``source``: it reads back, but wrong.
  (Flipping a byte of the compressed data is caught by zstd or not, by chance.)"""
  shutil.rmtree(checkpoint / "default")
  shutil.copytree(source / "default", checkpoint / "default")


def largest_file(directory):
  files = [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names]
  return max(files, key=os.path.getsize)


def test_corrupt_checkpoints_are_set_aside_and_the_run_resumes(tmp_path, caplog):
  c = tiny(steps=6, checkpoint_every_steps=2)
  finished = deterministic(train(c, tmp_path))
  final = restore(c, tmp_path)
  truncate(largest_file(tmp_path / "checkpoints" / "6"))  # the arrays' data file
  replace_arrays(tmp_path / "checkpoints" / "4", tmp_path / "checkpoints" / "2")

  assert int(restore(c, tmp_path).step) == 2  # what eval.py does: skips, renames nothing
  assert steps_on_disk(tmp_path) == [2, 4, 6]
  assert "do not match the fingerprint" in caplog.text

  caplog.clear()
  assert deterministic(train(c, tmp_path)) == finished
  assert caplog.text.count("could not be restored") == 2
  assert "resuming from step 2" in caplog.text
  for step in (4, 6):  # set aside, not deleted
    assert os.path.isdir(tmp_path / "checkpoints" / f"{step}.corrupt")
  chex.assert_trees_all_equal(restore(c, tmp_path), final)


def test_no_intact_checkpoint_stops_without_touching_them(tmp_path):
  c = tiny(steps=4, checkpoint_every_steps=2)
  train(c, tmp_path)
  for step in (2, 4):
    truncate(largest_file(tmp_path / "checkpoints" / str(step)))
  with pytest.raises(checkpoints.CheckpointError, match="No checkpoint in .* can be restored"):
    train(c, tmp_path)
  assert steps_on_disk(tmp_path) == [2, 4]


def test_a_workdir_saved_before_the_compile_option_resumes_with_it():
  # An MLP run saved before xla_cpu_fusion_emitters existed: the field counts as its
  # default (True), the MLP config now sets False, and only compilation changes.
  config = importlib.import_module("configs.mlp_fmnist").get_config()
  saved = json.loads(config.to_json_best_effort())
  del saved["xla_cpu_fusion_emitters"]
  assert not config.xla_cpu_fusion_emitters
  assert checkpoints.config_differences(saved, config) == []
  config.sparsity.lam = 0.02
  assert checkpoints.config_differences(saved, config) == ["sparsity.lam: 0.0003 -> 0.02"]


def test_workdir_of_another_config_is_refused_unless_overwritten(tmp_path):
  train(tiny(steps=2), tmp_path / "run")
  with pytest.raises(checkpoints.WorkdirConflictError) as e:
    train(tiny(steps=2, **{"sparsity.lam": 0.02, "seed": 1}), tmp_path / "run")
  assert "sparsity.lam: 0.01 -> 0.02" in str(e.value) and "seed: 0 -> 1" in str(e.value)
  assert "--overwrite" in str(e.value)

  longer = train(tiny(steps=3, log_every_steps=3), tmp_path / "run")  # may extend
  assert longer["step"] == 3

  fresh = train(tiny(steps=2, **{"sparsity.lam": 0.02}), tmp_path / "run", overwrite=True)
  assert fresh["step"] == 2
  moved = [d for d in os.listdir(tmp_path) if d.startswith("run.old-")]
  assert len(moved) == 1 and steps_on_disk(tmp_path / moved[0]) == [1, 2, 3]


# --------------------------------------------------------------------------- numerics


def nan_at(step):
  """A train_batches whose batch of ``step`` (1-based, as in the logs) is all NaN."""
  original = data_lib.train_batches

  def batches(*args, start_step=0, **kwargs):
    for t, batch in enumerate(original(*args, start_step=start_step, **kwargs), start_step):
      if t + 1 == step:
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      yield batch

  return batches


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  monkeypatch.setattr(data_lib, "train_batches", nan_at(4))
  with pytest.raises(train_lib.NonFiniteError, match="not finite at step 4") as e:
    train(tiny(steps=6), tmp_path)
  assert "the last checkpoint, step 3" in str(e.value) and "nan_policy=skip" in str(e.value)
  assert steps_on_disk(tmp_path) == [1, 2, 3]
  assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3]


def test_nan_policy_skip_skips_and_counts(tmp_path, monkeypatch):
  monkeypatch.setattr(data_lib, "train_batches", nan_at(4))
  summary = train(tiny(steps=6, nan_policy="skip"), tmp_path)
  assert summary["step"] == 6 and summary["train/skipped_steps"] == 1
  assert np.isfinite(summary["test/loss"])
  logged = {r["step"]: r["train/skipped_steps"] for r in rows(tmp_path) if "train/loss" in r}
  assert logged == {1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1}


# --------------------------------------------------------------------------- validation


BAD_CONFIGS = [  # (change, words the message must contain)
    ({"layers.block_shapes.fc1": (28, 7)},
     ["config.layers.block_shapes.fc1 = (28, 7)", "layer 'fc1'",
      "valid block columns: [1, 2, 4, 5, 8, 10, 20, 40]"]),
    ({"layers.block_shape": (3, 4), "layers.dense_layers": ()},
     ["config.layers.block_shape = (3, 4)", "layer 'head'",
      "valid block rows: [1, 2, 4, 5, 10, 20]"]),
    ({"layers.rank": 0}, ["config.layers.rank = 0", ">= 1"]),
    ({"layers.ranks.fc2": 0}, ["config.layers.ranks.fc2 = 0", ">= 1"]),
    ({"sparsity.target_density": 0.0}, ["config.sparsity.target_density = 0.0", "(0, 1]"]),
    ({"sparsity.target_density": 1.5}, ["config.sparsity.target_density = 1.5", "(0, 1]"]),
    ({"sparsity.lam": -1.0}, ["config.sparsity.lam = -1.0", ">= 0"]),
    ({"model": "mlpp"}, ["config.model = 'mlpp'", "cnn, mlp, resnet18, resnet20, vit_tiny"]),
    ({"dataset.name": "fmnist"}, ["config.dataset.name = 'fmnist'", "fashion_mnist"]),
    ({"method": "rigl2"}, ["config.method = 'rigl2'", "kpd", "rigl"]),
    ({"method": "set"}, ["config.layers.kind = 'kpd'", "method 'set'", "valid: dense"]),
    ({"optimizer.name": "adam"}, ["config.optimizer.name = 'adam'", "adamw, sgd"]),
    ({"optimizer.schedule": "linear"}, ["config.optimizer.schedule = 'linear'", "cosine"]),
    ({"layers.kind": "sparse"}, ["config.layers.kind = 'sparse'", "dense, kpd"]),
    ({"kernels.impl": "cuda"}, ["config.kernels.impl = 'cuda'", "auto, xla, cpu, pallas_tpu"]),
    ({"nan_policy": "ignore"}, ["config.nan_policy = 'ignore'", "stop, skip"]),
    ({"batch_size": 12}, ["config.batch_size = 12", "divisible by the 8 devices"]),
    ({"layers.block_shapes.fc3": (4, 4)},
     ["config.layers.block_shapes.fc3", "no layer named 'fc3'", "fc1, fc2, head"]),
    ({"layers.dense_layers": ("heads",)},
     ["config.layers.dense_layers = ('heads',)", "no layer named 'heads'", "fc1, fc2, head"]),
    ({"model_kwargs.hiden": (8,)}, ["config.model_kwargs", "hiden"]),
    ({"sparsity.lamb": 1e-3}, ["config.sparsity.lamb: unknown key", "did you mean 'lam'"]),
    ({"sparsity.penalty": "l2"}, ["config.sparsity.penalty = 'l2'", "l1, trimmed"]),
    ({"sparsity.penalty": "trimmed", "sparsity.target_density": 1.0},
     ["config.sparsity.penalty = 'trimmed'", "target_density is 1.0", "set it in (0, 1)"]),
]


@pytest.mark.parametrize("change, words", BAD_CONFIGS, ids=[str(c) for c, _ in BAD_CONFIGS])
def test_bad_config_message_names_field_value_and_choices(change, words):
  c = tiny()
  with c.unlocked():
    for field, value in change.items():
      *parents, key = field.split(".")
      node = c
      for p in parents:
        node = node[p]
      node[key] = value
  with pytest.raises(validate.ConfigError) as e:
    validate.validate_config(c, train_lib.build_model)
  for word in words:
    assert word in str(e.value)


@pytest.mark.parametrize("name", sorted(
    f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
    if f.endswith(".py") and f not in ("__init__.py", "base.py")))
def test_shipped_configs_are_valid(name):
  validate.validate_config(importlib.import_module(f"configs.{name}").get_config(),
                           train_lib.build_model)


def _device_fingerprint(tree):
  """The fingerprint as checkpoints before the host version computed it, on device."""
  def leaf(x):
    if x.dtype.itemsize == 1:
      bits = x.astype(jnp.uint8).astype(jnp.uint32)
    elif x.dtype.itemsize == 2:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    else:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    bits = bits.reshape(-1)
    return jnp.sum(bits * (2 * jnp.arange(bits.size, dtype=jnp.uint32) + 1), dtype=jnp.uint32)
  return [int(leaf(x)) for x in jax.tree.leaves(tree)]


def test_host_fingerprints_match_the_device_ones_so_older_checkpoints_verify():
  rng = np.random.default_rng(0)
  tree = {"w": jnp.asarray(rng.normal(size=(37, 5)), jnp.float32),
          "h": jnp.asarray(rng.normal(size=(3, 7, 2)), jnp.bfloat16),
          "step": jnp.asarray(123456789, jnp.int32),
          "mask": jnp.asarray(rng.random(11) > 0.5),
          "q": jnp.asarray(rng.integers(-128, 128, 9), jnp.int8),
          "empty": jnp.zeros((0, 4))}
  got = checkpoints.fingerprint(tree)
  assert got == _device_fingerprint(tree)
  tree["w"] = tree["w"].at[36, 4].add(1e-6)
  assert checkpoints.fingerprint(tree)[-1] != got[-1]  # leaves in key order: "w" is last
