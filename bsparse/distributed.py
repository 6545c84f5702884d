"""Multi-process start-up shared by train.py and eval.py (see docs/multihost.md).

Every process runs the same command; ``initialize`` joins them into one JAX runtime
before anything touches a device, after which ``jax.devices()`` lists the devices of all
processes and ``jax.process_index()`` / ``jax.process_count()`` say which one this is.
"""
from __future__ import annotations

import os

from absl import flags, logging
import jax

MODES = ("auto", "on", "off")
# Process counts that launchers set in each process they start (srun's job step, Open
# MPI's mpirun); with --distributed=auto, one above 1 starts the runtime. SLURM_NTASKS is
# not one of them: a batch script sees it before srun starts any task.
_PROCESS_COUNT_VARS = ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE")
_WORKER_LIST_VARS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")

_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", MODES,
    "Multi-process runtime: 'on' always calls jax.distributed.initialize (with the flags "
    "below, or detecting the cluster: TPU pod, SLURM, Open MPI); 'off' runs one process; "
    "'auto' initializes when --coordinator_address or a multi-process launcher's "
    "environment (srun, mpirun, JAX_COORDINATOR_ADDRESS) is present.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator service, "
    "reachable from every process (with --num_processes and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.",
                                      lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, from 0.",
                                   lower_bound=0)
_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300, "Seconds to wait for every process to join.", lower_bound=1)


@flags.multi_flags_validator(
    ["coordinator_address", "num_processes", "process_id"],
    message="--coordinator_address, --num_processes and --process_id go together (give "
    "all three, or none to detect the cluster), with 0 <= --process_id < --num_processes.")
def _check_process_flags(values) -> bool:
  given = [v is not None for v in values.values()]
  if not all(given):
    return not any(given)
  return values["process_id"] < values["num_processes"]


def cluster_detected(environ=None) -> bool:
  """Whether the environment is that of one process of a multi-process launch."""
  environ = os.environ if environ is None else environ
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  for var in _PROCESS_COUNT_VARS:
    if environ.get(var, "").isdigit() and int(environ[var]) > 1:
      return True
  return any("," in environ.get(var, "") for var in _WORKER_LIST_VARS)


def should_initialize(mode: str, coordinator_address: str | None,
                      environ=None) -> bool:
  if mode not in MODES:
    raise ValueError(f"distributed mode {mode!r}: expected one of {', '.join(MODES)}.")
  if mode == "auto":
    return bool(coordinator_address) or cluster_detected(environ)
  return mode == "on"


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               timeout_s: int = 300) -> bool:
  """Starts JAX's multi-process runtime as ``mode`` says; returns whether it did.

  With ``coordinator_address`` all three of it, ``num_processes`` and ``process_id``
  are needed; without, JAX reads them from the cluster (TPU pod metadata, SLURM, Open
  MPI, Kubernetes, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
  CPU devices exchange data through gloo, so that a CPU run of several processes works
  too. Must run before the first use of a device.
  """
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given) and not all(given):
    raise ValueError("--coordinator_address, --num_processes and --process_id go "
                     "together: give all three, or none to detect the cluster.")
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} is not in [0, {num_processes}).")
  if not should_initialize(mode, coordinator_address):
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=timeout_s)
  logging.info("Process %d of %d; %d local of %d devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def initialize_from_flags() -> bool:
  """``initialize`` with the --distributed, --coordinator_address, --num_processes,
  --process_id and --distributed_timeout flags."""
  return initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                    _PROCESS_ID.value, _TIMEOUT.value)
