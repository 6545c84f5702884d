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
(``continue_schedules``). The block indices are an operand of the compiled step, not
parameters: the trainer records them, with the block densities at the switch, in
``<workdir>/bsr_finetune.json`` (``record_switch``) before it saves the first checkpoint of
the block-sparse model, so that a resumed run and ``eval.py`` rebuild that model.

**An early switch** (``sparsity.switch_epoch`` between the start of cubic pruning and the
freeze) converts the model while it still holds more blocks than its target. From then
on the blocks themselves are pruned, by Frobenius norm, on the same cubic schedule
(``sparsity.block_sparsity`` with ``bsr_grids``), so the blocks the pruning ranks have
trained freely, as in gradual pruning of a dense model, at a fraction of its cost. After
the freeze step ``repack`` keeps only the surviving blocks (the optimizer's moments of
those blocks go on); the record then lists both switches. Until then a step computes
every stored block, pruned or not; with ``sparsity.repack_every_steps`` the model is also
repacked every that many steps in between, and the record lists every repack. Those
repacks keep the block budget while every layer keeps more than half of it (``shrinks``):
the kept blocks become the first ``nnz`` entries and the rest is padding, which the
kernels skip, so the compiled steps go on with the new indices (an operand of the steps,
``train_lib.Steps``) instead of being built again. Otherwise the budget shrinks to the
kept blocks, so the stored blocks, their moments and the step's buffers follow the
pruning at most a factor of two behind. A layer whose budget is at least
``kernels.dense_from`` of its grid (the budget of a switch before the pruning has
removed much) multiplies its blocks as a dense weight (``kernels.layers``).
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


def switches_early(config: ml_collections.ConfigDict) -> bool:
  """Whether the model switches before the freeze and its blocks are pruned after that."""
  sp = config.sparsity
  return 0 <= sp.get("switch_epoch", -1.0) < sp.freeze_epoch


def boundary_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> list[int]:
  """The steps after which the model changes form: ``[freeze_step + 1]`` (the step whose
  update fixes the mask), or with an early switch ``[switch_step + 1, freeze_step + 1]``
  (the switch, then the repack), with a repack every ``sparsity.repack_every_steps``
  between them; empty when it never switches."""
  sp = config.sparsity
  if form(config) != "bsr" or config.get("method", "kpd") != "kpd" or sp.freeze_epoch < 0:
    return []
  freeze = int(sp.freeze_epoch * steps_per_epoch) + 1
  if not switches_early(config):
    return [freeze]
  switch, every = int(sp.switch_epoch * steps_per_epoch) + 1, sp.get("repack_every_steps", 0)
  return [switch, *(range(switch + every, freeze, every) if every > 0 else ()), freeze]


@dataclasses.dataclass(frozen=True)
class Switch:
  """The block-sparse model a run trains from checkpoint ``step`` on.

  ``layers``: ``{layer path 'a/b': {'block_shape', 'kernel_size', 'rows', 'cols', 'nnz',
  'grid'}}`` (row-sorted block indices, as ``kernels.bsr``: the first ``nnz`` are stored
  blocks, the rest of the budget ``len(rows)`` padding; ``grid`` ``(m1, n1)``, absent
  from records written before it was); ``scalars``: the block densities at the switch,
  which a fixed mask keeps for the rest of the run.
  """
  step: int
  layers: dict[str, dict[str, Any]]
  scalars: dict[str, float]

  def specs(self) -> dict[str, convert.LayerSpec]:
    """``{layer: LayerSpec}`` for ``LayerFactory(kind='bsr')``; the budget is
    ``len(rows)``: the blocks kept at the switch (at least one), or a repack's padded
    budget."""
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

  def grids(self) -> dict[str, int]:
    """``{layer: blocks in its grid}`` (``sparsity.block_sparsity``'s ``bsr_grids``)."""
    return {k: int(np.prod(v["grid"])) for k, v in self.layers.items()}


def switch_from_params(params, step: int) -> tuple[Switch, dict[str, Any]]:
  """The switch for a KPD params tree (host arrays) at ``step``, and the params of the
  block-sparse model (the KPD layers' nonzero blocks; other entries unchanged)."""
  converted = convert.kpd_to_bsr_params(params)
  index = tu.flatten_dict(converted[INDEX_COLLECTION])
  flat = tu.flatten_dict(params)
  grids = {"/".join(p[:-1]): flat[p + ("S",)].shape for p in sparsity.term_paths(params)}
  layers = {}
  for name, spec in convert.bsr_layer_specs(params).items():
    path = tuple(name.split("/"))
    layers[name] = {"block_shape": list(spec.block_shape),
                    "kernel_size": list(spec.kernel_size) if spec.kernel_size else None,
                    "rows": np.asarray(index[path + ("rows",)]).tolist(),
                    "cols": np.asarray(index[path + ("cols",)]).tolist(),
                    "nnz": int(index[path + ("nnz",)]),
                    "grid": list(grids[name])}
  scalars = {k: float(v) for k, v in sparsity.density_scalars(params).items()}
  return Switch(step, layers, scalars), converted["params"]


def repack(switch: Switch, params, opt_state, step: int, keep_budget: bool = False
           ) -> tuple[Switch, Any, Any]:
  """After the pruning of an early switch: the switch to the model that computes only the
  blocks the pruning kept (``sparsity.block_sparsity``'s ``'<layer>/blocks'`` masks), its
  params, and ``opt_state`` with the same blocks kept in every per-block entry (the
  optimizer's moments go on). Host arrays in, host arrays out.

  The kept blocks keep their order (row-sorted) and become the first ``nnz`` entries.
  With ``keep_budget`` every layer keeps its block budget ``len(rows)``: the entries after
  them are padding (zero blocks, moments and masks; indices of the grid's last block, as
  ``kernels.bsr``), so no array changes shape and the compiled steps can go on; otherwise
  the budget shrinks to the kept blocks (at least one).
  """
  keep, layers = {}, {}
  for name, kept in _kept(switch, sparsity.sparsity_state(opt_state).masks).items():
    layer = switch.layers[name]
    budget = len(layer["rows"]) if keep_budget else max(kept.size, 1)
    keep[name] = (kept, budget)
    (m1, n1), pad = layer["grid"], budget - kept.size
    layers[name] = {**layer, "nnz": int(kept.size),
                    "rows": [layer["rows"][i] for i in kept] + [m1 - 1] * pad,
                    "cols": [layer["cols"][i] for i in kept] + [n1 - 1] * pad}
  by_path = {(*name.split("/"), "blocks"): idx for name, idx in keep.items()}

  def cut(path, leaf):
    names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    for tail, (kept, budget) in by_path.items():
      if names[-len(tail):] == tail or (names and names[-1] == "/".join(tail)):
        leaf = np.asarray(leaf)
        out = np.zeros((budget, *leaf.shape[1:]), leaf.dtype)
        out[:kept.size] = leaf[kept]
        return out
    return leaf

  new = Switch(step, layers, _scalars(switch.scalars, layers))
  return new, jax.tree_util.tree_map_with_path(cut, params), \
      jax.tree_util.tree_map_with_path(cut, opt_state)


def shrinks(switch: Switch, opt_state) -> bool:
  """Whether a repack before the freeze should shrink the block budget (and build new
  steps) rather than keep it: some layer keeps at most half of its budget. Between
  shrinks a step holds at most twice the blocks it computes."""
  kept = _kept(switch, sparsity.sparsity_state(opt_state).masks)
  return any(2 * kept[name].size <= len(layer["rows"])
             for name, layer in switch.layers.items())


def _kept(switch: Switch, masks) -> dict[str, np.ndarray]:
  """``{layer: positions among its stored blocks (the first nnz) that its
  '<layer>/blocks' mask keeps}``."""
  return {name: np.flatnonzero(np.asarray(masks[f"{name}/blocks"])[:layer["nnz"]])
          for name, layer in switch.layers.items()}


def _scalars(scalars: dict[str, float], layers: dict[str, dict]) -> dict[str, float]:
  """``scalars`` (a switch's densities) for ``layers`` holding ``nnz`` of their ``grid``'s
  blocks; ``density/weights`` is their share of the weight entries, as
  ``sparsity.weight_density``."""
  out = dict(scalars)
  for name, layer in layers.items():
    for key in out:
      if key.startswith(f"density/{name}/"):
        out[key] = layer["nnz"] / int(np.prod(layer["grid"]))
  area = lambda v, n: n * int(np.prod(v["block_shape"]))
  out["density/weights"] = (sum(area(v, v["nnz"]) for v in layers.values())
                            / sum(area(v, np.prod(v["grid"])) for v in layers.values()))
  return out


def live_scalars(switch: Switch, opt_state) -> dict[str, float]:
  """The block densities of a block-sparse model: those of ``switch``, or while its
  blocks are being pruned (an early switch), those its masks in ``opt_state`` keep."""
  masks = sparsity.sparsity_state(opt_state)
  masks = masks.masks if masks is not None else {}
  if not all(f"{name}/blocks" in masks for name in switch.layers):
    return dict(switch.scalars)
  layers = {name: {**switch.layers[name], "nnz": int(kept.size)}
            for name, kept in _kept(switch, masks).items()}
  return _scalars(switch.scalars, layers)


def continue_schedules(opt_state, step: int):
  """``opt_state`` (fresh, from ``tx.init``) with every schedule's count, and the block
  sparsity transform's, set to ``step``: the learning rate and the pruning schedule go on
  from the switch while the moments start over."""
  counted = (optax.ScaleByScheduleState, sparsity.BlockSparsityState)
  is_counted = lambda s: isinstance(s, counted)

  def visit(s):
    if is_counted(s):
      return s._replace(count=jnp.full_like(s.count, step))
    return s

  return jax.tree.map(visit, opt_state, is_leaf=is_counted)


def save_switches(workdir: str, switches: list[Switch]) -> None:
  checkpoints.write_text_atomic(os.path.join(workdir, RECORD_FILE), json.dumps(
      {"switches": [dataclasses.asdict(s) for s in switches]}))


def record_switch(workdir: str, switch: Switch) -> None:
  """Adds ``switch`` to the record of ``workdir`` after the switches before its step (a
  resumed run replaces those it recorded from that step on)."""
  earlier = [s for s in load_switches(workdir) if s.step < switch.step]
  save_switches(workdir, earlier + [switch])


def load_switches(workdir: str) -> list[Switch]:
  """The recorded switches of ``workdir``, oldest first (empty when none)."""
  path = os.path.join(workdir, RECORD_FILE)
  if not os.path.exists(path):
    return []
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
    raws = raw["switches"] if "switches" in raw else [raw]  # one switch, as first written
    return [Switch(int(r["step"]), dict(r["layers"]), dict(r["scalars"])) for r in raws]
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise checkpoints.CheckpointError(
        f"{path} is unreadable ({e}); it records the block-sparse model the later "
        "checkpoints hold. Put back a good copy, or start over with --overwrite or a new "
        "--workdir.") from None
