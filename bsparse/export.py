"""Serving forms of a trained KPD model: block-sparse (BSR) and dense, with latency.

A trained KPD model can run three ways (``DESIGN.md`` §1): factored (the KPD layers),
block-sparse (only the nonzero blocks, ``bsparse.kernels``) and dense (``W`` built, for
comparison). ``serving_forms`` builds the model and variables of each; they compute the same
function up to float rounding.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bsparse import kron, sparsity
from bsparse.kernels import convert


def dense_params(params):
  """Replaces every KPD layer's terms by the ``kernel`` they sum to (``bias`` kept)."""
  groups = sparsity.layer_groups(params)
  out = jax.tree.map(lambda x: x, params)
  for layer, terms in groups.items():
    node = out
    for k in layer[:-1]:
      node = node[k]
    old = node[layer[-1]]
    kernel = sum(kron.dense_weight(*(old[t[-1]][k] for k in "SAB")) for t in terms)
    node[layer[-1]] = {"kernel": kernel, **{k: v for k, v in old.items()
                                            if not k.startswith("kron_")}}
  return out


def serving_forms(model: nn.Module, variables) -> dict[str, tuple[nn.Module, dict]]:
  """``{'kpd' | 'bsr' | 'dense': (model, variables)}`` for a KPD ``model``."""
  params = variables["params"]
  extra = {k: v for k, v in variables.items() if k != "params"}
  factory = model.layers
  dense_model = model.clone(layers=dataclasses.replace(factory, kind="dense"))
  specs = convert.bsr_layer_specs(params)
  bsr_model = model.clone(layers=dataclasses.replace(factory, kind="bsr", bsr_specs=specs))
  return {"kpd": (model, variables),
          "bsr": (bsr_model, {**convert.kpd_to_bsr_params(params), **extra}),
          "dense": (dense_model, {"params": dense_params(params), **extra})}


def latency_ms(model: nn.Module, variables, x: jax.Array, repeats: int = 20) -> float:
  """Median wall time of one jitted forward pass on ``x`` (compile excluded)."""
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
  jax.block_until_ready(fwd(variables, x))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(variables, x))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def accuracy(model: nn.Module, variables, batches) -> float:
  """Accuracy over ``batches`` (dicts with ``image``, ``label``, ``mask``)."""
  fwd = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x, train=False), -1))
  correct = count = 0.0
  for b in batches:
    pred = np.asarray(fwd(variables, b["image"]))
    correct += float(((pred == b["label"]) * b["mask"]).sum())
    count += float(b["mask"].sum())
  return correct / max(count, 1.0)


def save_blocks(params, path: str) -> None:
  """Writes each KPD layer's nonzero blocks as ``<layer>/{rows,cols,blocks}`` to an npz."""
  arrays = {}
  for layer, terms in sparsity.layer_groups(params).items():
    node = params
    for k in layer:
      node = node[k]
    for t in terms:
      rows, cols, blocks = kron.nonzero_blocks(*(node[t[-1]][k] for k in "SAB"))
      name = "/".join(t)
      arrays.update({f"{name}/rows": rows, f"{name}/cols": cols, f"{name}/blocks": blocks})
  np.savez_compressed(path, **arrays)
