"""Fine-tuning in block-sparse form: after the mask freeze the kept blocks train freely.

Up to the freeze a KPD layer's block ``(i, j)`` is ``S[i,j] * sum_k A_k[i,j] B_k``: every
block lies in the span of the ``r`` shared blocks ``B_k``. With
``config.sparsity.finetune = 'bsr'`` the trainer converts the model right after the freeze
step (``boundary_step``): each KPD layer becomes a ``BlockSparseDense`` /
``BlockSparseConv`` holding exactly its nonzero blocks (``kernels.convert``), which from
then on are free parameters trained through ``bsr_matmul`` at ``nnz * bm * bn`` MACs per
position. The model computes the same function at the switch; what changes is that each
block can now leave the span of the ``B_k``.

The optimizer restarts its moments for the new parameters (their count starts at 0, so
Adam's bias correction is right) while the learning-rate schedule continues where it was
(``continue_schedules``). The block indices are constants of the compiled step, not
parameters: the trainer records them, with the block densities at the switch, in
``<workdir>/bsr_finetune.json`` (``save_switch``) before it saves the first checkpoint of
the block-sparse model, so that a resumed run and ``eval.py`` rebuild that model.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bsparse import checkpoints, sparsity
from bsparse.kernels import convert
from bsparse.kernels.layers import INDEX_COLLECTION

RECORD_FILE = "bsr_finetune.json"
FORMS = ("kpd", "bsr")


def form(config: ml_collections.ConfigDict) -> str:
  """``config.sparsity.finetune``; configs saved before the option existed are ``kpd``."""
  return config.sparsity.get("finetune", "kpd")


def boundary_step(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int | None:
  """The step after which the model switches to block-sparse form (the step whose update
  fixes the mask, ``freeze_step + 1``); None when it never does."""
  if (form(config) != "bsr" or config.get("method", "kpd") != "kpd"
      or config.sparsity.freeze_epoch < 0):
    return None
  return int(config.sparsity.freeze_epoch * steps_per_epoch) + 1


@dataclasses.dataclass(frozen=True)
class Switch:
  """The block-sparse model a run trains from checkpoint ``step`` on.

  ``layers``: ``{layer path 'a/b': {'block_shape', 'kernel_size', 'rows', 'cols', 'nnz'}}``
  (row-sorted block indices, as ``kernels.bsr``); ``scalars``: the block densities at the
  switch, which the fixed mask keeps for the rest of the run.
  """
  step: int
  layers: dict[str, dict[str, Any]]
  scalars: dict[str, float]

  def specs(self) -> dict[str, convert.LayerSpec]:
    """``{layer: LayerSpec}`` for ``LayerFactory(kind='bsr')``; the budget is exactly the
    blocks kept, at least one."""
    return {k: convert.LayerSpec(tuple(v["block_shape"]), len(v["rows"]),
                                 tuple(v["kernel_size"]) if v["kernel_size"] else None)
            for k, v in self.layers.items()}

  def index(self) -> dict[str, Any]:
    """The ``bsr_index`` collection of the model (``{'bsr_index': {layer: {...}}}``)."""
    flat = {}
    for name, v in self.layers.items():
      for key in ("rows", "cols"):
        flat[(*name.split("/"), key)] = jnp.asarray(v[key], jnp.int32)
      flat[(*name.split("/"), "nnz")] = jnp.asarray(v["nnz"], jnp.int32)
    return {INDEX_COLLECTION: tu.unflatten_dict(flat)}


def switch_from_params(params, step: int) -> tuple[Switch, dict[str, Any]]:
  """The switch for a KPD params tree (host arrays) at ``step``, and the params of the
  block-sparse model (the KPD layers' nonzero blocks; other entries unchanged)."""
  converted = convert.kpd_to_bsr_params(params)
  index = tu.flatten_dict(converted[INDEX_COLLECTION])
  layers = {}
  for name, spec in convert.bsr_layer_specs(params).items():
    path = tuple(name.split("/"))
    layers[name] = {"block_shape": list(spec.block_shape),
                    "kernel_size": list(spec.kernel_size) if spec.kernel_size else None,
                    "rows": np.asarray(index[path + ("rows",)]).tolist(),
                    "cols": np.asarray(index[path + ("cols",)]).tolist(),
                    "nnz": int(index[path + ("nnz",)])}
  scalars = {k: float(v) for k, v in sparsity.density_scalars(params).items()}
  return Switch(step, layers, scalars), converted["params"]


def continue_schedules(opt_state, step: int):
  """``opt_state`` (fresh, from ``tx.init``) with every schedule's count set to ``step``:
  the learning rate goes on from the switch while the moments start over."""
  is_schedule = lambda s: isinstance(s, optax.ScaleByScheduleState)

  def visit(s):
    if is_schedule(s):
      return s._replace(count=jnp.full_like(s.count, step))
    return s

  return jax.tree.map(visit, opt_state, is_leaf=is_schedule)


def save_switch(workdir: str, switch: Switch) -> None:
  checkpoints.write_text_atomic(os.path.join(workdir, RECORD_FILE), json.dumps(
      dataclasses.asdict(switch)))


def load_switch(workdir: str) -> Switch | None:
  path = os.path.join(workdir, RECORD_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
    return Switch(int(raw["step"]), dict(raw["layers"]), dict(raw["scalars"]))
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise checkpoints.CheckpointError(
        f"{path} is unreadable ({e}); it records the block-sparse model the later "
        "checkpoints hold. Put back a good copy, or start over with --overwrite or a new "
        "--workdir.") from None
