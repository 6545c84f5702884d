"""Dropping the block-size candidates that lost the selection (``sparsity.block_sparsity``).

After the selection step a layer's losing candidates are all-zero and flagged dead in the
optimizer state; removing them from the params, the optimizer state and the model config
makes them cost nothing (one re-jit at that boundary). The trainer records the choice in
``<workdir>/selection.json`` (``save_choice``) before it saves the first checkpoint without
the losers, so that a resumed run and ``eval.py`` rebuild the model that checkpoint holds.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections

from bsparse import checkpoints, layers, sparsity

CHOICE_FILE = "selection.json"


def dead_terms(opt_state) -> list[tuple[str, ...]]:
  """Term paths whose candidate was dropped at the selection step."""
  state = sparsity.sparsity_state(opt_state)
  if state is None:
    return []
  return [tuple(k.split("/")) for k, v in state.alive.items() if float(v) == 0.0]


def _without(node: dict, path: tuple[str, ...]) -> dict:
  head, rest = path[0], path[1:]
  if not rest:
    return {k: v for k, v in node.items() if k != head}
  return {**node, head: _without(node[head], rest)}


def _has(node, path) -> bool:
  for key in path:
    if not isinstance(node, dict) or key not in node:
      return False
    node = node[key]
  return True


def prune_tree(tree: Any, dead: list[tuple[str, ...]]) -> Any:
  """Removes the dead terms from every params-shaped subtree of ``tree`` (params, optimizer
  moments) and from dicts keyed ``'layer/term'`` (masks, liveness)."""
  names = {"/".join(p) for p in dead}
  if isinstance(tree, dict):
    for path in dead:
      if _has(tree, path):
        tree = _without(tree, path)
    return {k: prune_tree(v, dead) for k, v in tree.items() if k not in names}
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    return type(tree)(*(prune_tree(v, dead) for v in tree))
  if isinstance(tree, (tuple, list)):
    return type(tree)(prune_tree(v, dead) for v in tree)
  return tree


def block_shapes(params) -> dict[str, tuple[tuple[int, int], ...]]:
  """``{layer: ((m2, n2), ...)}`` of the KPD terms present in ``params``."""
  out: dict[str, list[tuple[int, int]]] = {}
  for layer, terms in sparsity.layer_groups(params).items():
    shapes = []
    for t in terms:
      node = params
      for k in t:
        node = node[k]
      shapes.append(tuple(int(v) for v in node["B"].shape[1:]))
    out["/".join(layer)] = tuple(shapes)
  return out



# --------------------------------------------------------------------------- the choice


@dataclasses.dataclass(frozen=True)
class Choice:
  """The block shape each multi-candidate layer kept, from checkpoint ``step`` on."""
  step: int
  block_shapes: dict[str, tuple[int, int]]


def candidate_layers(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, int], ...]]:
  """``{layer: candidates}`` of the KPD layers given several block shapes."""
  if config.get("method", "kpd") != "kpd" or config.layers.kind != "kpd":
    return {}
  out = {}
  for name, shapes in config.layers.block_shapes.items():
    shapes = tuple(shapes)
    if shapes and not isinstance(shapes[0], int) and len(shapes) > 1:
      out[name] = tuple(tuple(int(v) for v in s) for s in shapes)
  return out


def boundary_step(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int | None:
  """The training step after which the losers are dropped (the step whose update runs the
  selection, ``select_step + 1``); None when the run selects nothing."""
  if not candidate_layers(config) or config.selection.select_epoch < 0:
    return None
  return int(config.selection.select_epoch * steps_per_epoch) + 1


def with_choice(config: ml_collections.ConfigDict, choice: Choice) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose chosen layers have their single surviving block shape."""
  out = ml_collections.ConfigDict(config.to_dict())
  for name, shape in choice.block_shapes.items():
    out.layers.block_shapes[name] = tuple(shape)
  return out


def choice_from_params(config: ml_collections.ConfigDict, params, step: int) -> Choice:
  """The block shape left in each candidate layer of ``params`` after the drop."""
  kept = {layer.split("/")[-1]: shapes for layer, shapes in block_shapes(params).items()}
  names = candidate_layers(config)
  if any(len(kept[name]) != 1 for name in names):
    raise RuntimeError(f"Expected one block shape per selected layer, found {kept}.")
  return Choice(step, {name: kept[name][0] for name in names})


def losers(config: ml_collections.ConfigDict, choice: Choice, params) -> list[tuple[str, ...]]:
  """Term paths of ``params`` (built from ``config``) that ``choice`` drops."""
  dead = []
  for layer, terms in sparsity.layer_groups(params).items():
    name = layer[-1]
    if name in choice.block_shapes:
      keep = layers.term_name(tuple(choice.block_shapes[name]))
      dead += [t for t in terms if t[-1] != keep]
  return dead


def save_choice(workdir: str, choice: Choice) -> None:
  checkpoints.write_text_atomic(os.path.join(workdir, CHOICE_FILE), json.dumps(
      {"step": choice.step,
       "block_shapes": {k: list(v) for k, v in choice.block_shapes.items()}}, indent=2))


def load_choice(workdir: str) -> Choice | None:
  path = os.path.join(workdir, CHOICE_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    raw = json.load(f)
  return Choice(int(raw["step"]), {k: tuple(v) for k, v in raw["block_shapes"].items()})
