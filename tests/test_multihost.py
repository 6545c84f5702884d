"""train.py and eval.py as two processes on one machine (CPU, gloo collectives over
loopback): the same parameters as one process, a checkpoint both wrote that restores,
and an evaluation that counts every example once."""
import json
import os
import socket
import subprocess
import sys
import time

import chex
import pytest
import tensorflow_datasets as tfds

from bsparse import distributed, train_lib
from tests import helpers
from tests.helpers import restore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOCK_EXAMPLES = 41  # 25 train + 16 validation; the test split has 41, odd
STEPS = 4
TIMEOUT_S = 240  # per launch: a hung collective fails the test rather than stalling it

# Runs a script (train.py or eval.py) on mock data with the given arguments.
SCRIPT = """\
import runpy, sys
import tensorflow_datasets as tfds
sys.argv = {argv!r}
with tfds.testing.mock_data(num_examples={examples}):
  runpy.run_path(sys.argv[0], run_name="__main__")
"""

CONFIG_FILE = """\
import json
import ml_collections

def get_config():
  return ml_collections.ConfigDict(json.loads({text!r}))
"""


def tiny():
  """The tiny MLP for a few steps of global batch 8, logging once."""
  return helpers.tiny("mlp_fmnist", STEPS, **{"log_every_steps": STEPS, "sparsity.lam": 0.01})


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(script, args, tmp_path, num_processes=2):
  """Runs ``script`` as ``num_processes`` processes of one CPU device each, killing them
  after TIMEOUT_S; returns the stdout of each."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  port = free_port()
  procs, logs = [], []
  for i in range(num_processes):
    argv = [script, *args, f"--coordinator_address=127.0.0.1:{port}",
            f"--num_processes={num_processes}", f"--process_id={i}",
            f"--distributed_timeout={TIMEOUT_S}"]
    code = SCRIPT.format(argv=argv, examples=MOCK_EXAMPLES)
    out, err = (tmp_path / f"{script}.{i}.out", tmp_path / f"{script}.{i}.err")
    logs.append((out, err))
    with open(out, "w") as stdout, open(err, "w") as stderr:  # files: no pipe fills up
      procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                                    stdout=stdout, stderr=stderr))
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pytest.fail(f"{script} as {num_processes} processes did not finish in {TIMEOUT_S}s")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, (p, (_, err)) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{err.read_text()[-3000:]}"
  return [out.read_text() for out, _ in logs]


def test_two_processes_train_as_one(tmp_path):
  c = tiny()
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    one = train_lib.train_and_evaluate(c, str(tmp_path / "p1"))
  config = tmp_path / "tiny.py"
  config.write_text(CONFIG_FILE.format(text=c.to_json()))
  stdout = launch("train.py", [f"--config={config}", f"--workdir={tmp_path / 'p2'}"],
                  tmp_path)
  assert "test accuracy" in stdout[0] and "test accuracy" not in stdout[1]
  with open(tmp_path / "p2" / "summary.json", encoding="utf-8") as f:
    two = json.load(f)
  assert two["step"] == STEPS
  assert two["test/examples"] == MOCK_EXAMPLES  # odd: each example exactly once
  assert two["test/accuracy"] == pytest.approx(one["test/accuracy"])
  assert two["test/loss"] == pytest.approx(one["test/loss"], rel=1e-5)

  restored_one, restored_two = restore(c, tmp_path / "p1"), restore(c, tmp_path / "p2")
  assert int(restored_two.step) == STEPS
  chex.assert_trees_all_close(restored_two.params, restored_one.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(restored_two.opt_state, restored_one.opt_state, rtol=1e-5,
                              atol=1e-6)

  stdout = launch("eval.py", [f"--workdir={tmp_path / 'p2'}"], tmp_path)
  assert f"test accuracy {one['test/accuracy']:.4f} over {MOCK_EXAMPLES} examples" \
      in stdout[0]
  with open(tmp_path / "p2" / "eval.json", encoding="utf-8") as f:
    assert json.load(f)["examples"] == MOCK_EXAMPLES


@pytest.mark.parametrize("mode, flag, environ, expected", [
    ("auto", None, {}, False),
    ("auto", "10.0.0.1:1234", {}, True),
    ("auto", None, {"SLURM_STEP_NUM_TASKS": "1"}, False),
    ("auto", None, {"SLURM_STEP_NUM_TASKS": "4"}, True),
    ("auto", None, {"SLURM_NTASKS": "4"}, False),
    ("auto", None, {"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ("auto", None, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ("auto", None, {"TPU_WORKER_HOSTNAMES": "t-w-0,t-w-1"}, True),
    ("on", None, {}, True),
    ("off", "10.0.0.1:1234", {"SLURM_STEP_NUM_TASKS": "4"}, False),
])
def test_when_to_initialize(mode, flag, environ, expected):
  assert distributed.should_initialize(mode, flag, environ) == expected


def test_partial_process_flags_are_refused():
  with pytest.raises(ValueError, match="go together"):
    distributed.initialize("auto", "127.0.0.1:1234", num_processes=2)
  with pytest.raises(ValueError, match="not in"):
    distributed.initialize("auto", "127.0.0.1:1234", num_processes=2, process_id=2)
