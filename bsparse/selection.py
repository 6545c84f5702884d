"""Dropping the block-size candidates that lost the selection (``sparsity.block_sparsity``).

After the selection step a layer's losing candidates are all-zero and flagged dead in the
optimizer state; removing them from the params, the optimizer state and the model config
makes them cost nothing (one re-jit at that boundary).
"""
from __future__ import annotations

from typing import Any

from bsparse import sparsity


def dead_terms(opt_state) -> list[tuple[str, ...]]:
  """Term paths whose candidate was dropped at the selection step."""
  state = sparsity.sparsity_state(opt_state)
  if state is None:
    return []
  return [tuple(k.split("/")) for k, v in state.alive.items() if not bool(v)]


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

