"""Checkpoints and the run's workdir.

- ``save`` stores a content fingerprint with each checkpoint; ``restore_latest``
  restores the newest checkpoint that reads back intact. A checkpoint that fails to
  restore or whose contents do not match its fingerprint (truncated, garbled, or written
  by incompatible code) is skipped with a warning and, when training, renamed to
  ``<step>.corrupt`` (never deleted). If none is intact, CheckpointError says so.
- ``prepare_workdir`` refuses to resume a workdir whose saved ``config.json`` differs
  from the new config in a field that changes the run (WorkdirConflictError), and with
  ``overwrite`` moves an existing workdir aside to ``<workdir>.old-<time>``.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so
a run killed while saving leaves the previous checkpoints as they were.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from configs import base

FINGERPRINT_KEY = "fingerprint"
CORRUPT_SUFFIX = ".corrupt"
# Fields that may differ between the runs sharing a workdir: bookkeeping that does not
# change the trained model, the run length (to extend a run; the learning-rate schedule
# follows the new length) and nan_policy (to resume past a NaN with 'skip').
RESUMABLE_FIELDS = frozenset({
    "num_epochs", "num_train_steps", "eval_batch_size", "log_every_steps",
    "eval_every_epochs", "checkpoint_every_steps", "keep_checkpoints", "progress_bar",
    "plots", "nan_policy", "kernels.impl", "kernels.dense_from", "xla_cpu_fusion_emitters",
    "host_malloc.arena_max", "host_malloc.mmap_threshold_kb", "dataset.data_dir",
    "dataset.download"})
_IGNORING_ABANDONED_READS = False


class CheckpointError(RuntimeError):
  """No checkpoint of a workdir can be restored."""


class WorkdirConflictError(ValueError):
  """The workdir holds a run of a different config."""


def sync(name: str) -> None:
  """Waits for every process (a no-op in a one-process run)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def write_text_atomic(path: str, text: str) -> None:
  """Writes ``path`` so that readers see the old or the new content, never a part."""
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


# --------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str, config, read_only: bool = False
                       ) -> ocp.CheckpointManager:
  """The manager of ``workdir/checkpoints``. A training (not ``read_only``) manager
  deletes the temporary directories of saves that a kill interrupted; a reader must not,
  as they may belong to a run that is saving right now."""
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                         create=not read_only,
                                         cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def fingerprint(tree) -> list[int]:
  """One uint32 per leaf: the sum of its bit patterns times odd position weights (mod
  2**32), so any change to a single element changes it.

  Computed on the host, with numpy: a jitted version compiled one program over the whole
  state at the first save, which raised the KPD CNN's peak RSS by about 30 MB (6 MB this
  way). The arithmetic is exact in uint32, so checkpoints fingerprinted either way verify.
  """
  out = []
  for x in jax.device_get(jax.tree.leaves(tree)):  # one transfer for the whole state
    flat = np.asarray(x).reshape(-1)
    size = flat.dtype.itemsize
    bits = flat.view(np.uint32) if size % 4 == 0 else flat.view(f"u{size}").astype(np.uint32)
    weights = 2 * np.arange(bits.size, dtype=np.uint32) + np.uint32(1)
    out.append(int(np.sum(bits * weights, dtype=np.uint32)))
  return out


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
  """Saves ``state`` as checkpoint ``step`` (in the background) with its fingerprint."""
  manager.save(step, args=ocp.args.StandardSave(state), force=True,
               custom_metadata={FINGERPRINT_KEY: fingerprint(state)})


def _restore_verified(manager: ocp.CheckpointManager, step: int, abstract):
  restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  expected = (manager.metadata(step).custom_metadata or {}).get(FINGERPRINT_KEY)
  if expected is None:
    raise ValueError("its metadata holds no fingerprint")
  if fingerprint(restored) != expected:
    raise ValueError("its contents do not match the fingerprint saved with it")
  return restored


def _ignore_abandoned_reads() -> None:
  """When one array of a checkpoint fails to read, orbax leaves the reads of the others
  pending; once collected (at exit, at the latest) each would print an 'Exception
  ignored' traceback. The failure is reported once instead, so those are dropped."""
  global _IGNORING_ABANDONED_READS
  if _IGNORING_ABANDONED_READS:
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if getattr(unraisable.object, "__qualname__", "") != "_read_array_index_and_device_put":
      previous(unraisable)

  sys.unraisablehook = hook
  _IGNORING_ABANDONED_READS = True


def _first_line(e: BaseException) -> str:
  """A short reason: the error's first line, or its cause's when orbax wraps a
  TensorStore error."""
  if e.__cause__ is not None and "See full TensorStore details" in str(e):
    e = e.__cause__
  return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def restore_latest(manager: ocp.CheckpointManager, state, set_aside: bool = True,
                   state_at: Callable[[int], Any] | None = None):
  """Restores the newest intact checkpoint into the structure of ``state`` (``state``
  itself when there is no checkpoint); ``state_at(step)``, when given, is the structure of
  the checkpoint of ``step`` (a run whose model changes shape at some step).

  Checkpoints that cannot be restored are skipped with a warning and, with
  ``set_aside``, renamed to ``<step>.corrupt`` so that the run can save that step again.
  Raises CheckpointError, renaming nothing, when no checkpoint can be restored.
  """
  failed = []
  for step in sorted(manager.all_steps(), reverse=True):
    target = state if state_at is None else state_at(step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      restored = _restore_verified(manager, step, abstract)
    except Exception as e:  # whatever the failure, the checkpoint is unusable
      failed.append((step, _first_line(e)))
      _ignore_abandoned_reads()
      continue
    _skip_bad(manager, failed, step, set_aside)
    return restored
  if failed:
    reasons = "\n".join(f"  step {s}: {r}" for s, r in failed)
    raise CheckpointError(
        f"No checkpoint in {manager.directory} can be restored:\n{reasons}\nThey are "
        "truncated, corrupted or were written by an incompatible version of the code. "
        "Nothing was renamed or deleted. Put back intact copies, or start over with "
        "--overwrite (which moves this workdir aside) or a new --workdir.")
  return state


def _skip_bad(manager: ocp.CheckpointManager, failed, good: int, set_aside: bool) -> None:
  """Warns about each checkpoint that failed to restore and, with ``set_aside``, renames
  it so that the manager no longer lists it."""
  for step, reason in failed:
    path = os.path.join(str(manager.directory), str(step))
    if set_aside:
      target = _free_name(path + CORRUPT_SUFFIX)
      if jax.process_index() == 0:
        os.rename(path, target)
      action = (f"Renamed it to {target} (kept for inspection: delete it when done); "
                f"resuming from step {good}.")
    else:
      action = f"Using step {good}."
    logging.warning("Checkpoint %s could not be restored (%s): it is truncated, corrupted "
                    "or from incompatible code. %s", path, reason, action)
  if failed and set_aside:
    sync("bsparse_set_aside")
    manager.reload()


def _free_name(path: str) -> str:
  """``path``, or ``path-1``, ``path-2``, ... : the first that does not exist."""
  candidate, i = path, 0
  while os.path.exists(candidate):
    i += 1
    candidate = f"{path}-{i}"
  return candidate


# --------------------------------------------------------------------------- workdir


def save_config(workdir: str, config) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    write_text_atomic(os.path.join(workdir, "config.json"),
                      config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config saved in ``workdir``; fields it lacks (added to configs/base.py since)
  take their defaults."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is '{workdir}' the --workdir of a train.py run?")
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  config = base.get_config()
  config.update(saved)
  return config


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _flat_json(config) -> dict[str, Any]:
  return _flatten(json.loads(config.to_json_best_effort()))


def config_differences(saved: dict[str, Any], config) -> list[str]:
  """The fields outside RESUMABLE_FIELDS where ``config`` differs from the ``saved``
  JSON, as ``'field: saved -> new'`` lines. A field that the saved config lacks (it
  predates the field) counts as its default."""
  old = {**_flat_json(base.get_config()), **_flatten(saved)}
  new = _flat_json(config)
  missing = "(unset)"
  return [f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}"
          for k in sorted(old.keys() | new.keys())
          if k not in RESUMABLE_FIELDS and old.get(k, missing) != new.get(k, missing)]


def _holds_checkpoints(workdir: str) -> bool:
  path = os.path.join(workdir, "checkpoints")
  return os.path.isdir(path) and bool(os.listdir(path))


def prepare_workdir(workdir: str, config, overwrite: bool = False) -> None:
  """Makes ``workdir`` ready for ``config``: refuses a workdir whose checkpoints belong
  to a different config (WorkdirConflictError), or with ``overwrite`` moves an existing
  workdir aside to ``<workdir>.old-<time>`` so the run starts afresh."""
  if overwrite:
    if jax.process_index() == 0 and os.path.isdir(workdir) and os.listdir(workdir):
      target = _free_name(f"{os.path.normpath(workdir)}.old-{time.strftime('%Y%m%d-%H%M%S')}")
      os.rename(workdir, target)
      logging.warning("--overwrite: moved the previous run in %s to %s.", workdir, target)
    sync("bsparse_overwrite")
    return
  path = os.path.join(workdir, "config.json")
  if not (os.path.exists(path) and _holds_checkpoints(workdir)):
    return
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise WorkdirConflictError(f"{path} cannot be read ({_first_line(e)}), so this run cannot "
                               "be checked against it. Pass --overwrite to move the old run "
                               "aside and start afresh, or use a new --workdir.") from None
  diffs = config_differences(saved, config)
  if diffs:
    raise WorkdirConflictError(
        f"{workdir} holds checkpoints of a run with a different config (saved -> now):\n  "
        + "\n  ".join(diffs) + "\nUse a new --workdir, or pass --overwrite to move the old "
        f"run aside to {os.path.normpath(workdir)}.old-<time> and start afresh.")
