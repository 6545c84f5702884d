"""Serving forms of a trained model: factored (KPD), block-sparse (BSR) and dense, with
latency.

A trained KPD model can run three ways (``DESIGN.md`` §1): factored (the KPD layers),
block-sparse (only the nonzero blocks, ``bsparse.kernels``) and dense (``W`` built, for
comparison). A model fine-tuned in block-sparse form (``bsparse.finetune``) has no factored
form left and runs block-sparse or dense. ``serving_forms`` builds the model and variables
of each form; they compute the same function up to float rounding.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import flax.linen as nn
import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np

from bsparse import kron, sparsity
from bsparse.kernels import bsr as bsr_lib
from bsparse.kernels import convert
from bsparse.kernels.layers import INDEX_COLLECTION


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


def bsr_kernel(blocks, index, kernel_shape) -> jax.Array:
  """The dense ``kernel`` ``(*taps, m, n)`` of a block-sparse layer: its stored ``blocks``
  ``(nnz_max, *taps, bm, bn)`` placed at ``index['rows'], index['cols']`` of the block
  grid, one ``BSR.to_dense`` per tap."""
  *_, m, n = kernel_shape
  per_tap = jnp.moveaxis(blocks.reshape(blocks.shape[0], -1, *blocks.shape[-2:]), 1, 0)
  to_dense = lambda b: bsr_lib.from_indices(b, index["rows"], index["cols"], index["nnz"],
                                            (m, n)).to_dense()
  return jax.vmap(to_dense)(per_tap).reshape(kernel_shape)


def bsr_dense_params(dense_model: nn.Module, variables, input_shape):
  """The params of ``dense_model`` (the block-sparse model rebuilt with dense layers)
  holding the same weights as ``variables`` of the block-sparse model."""
  shapes = jax.eval_shape(lambda x: dense_model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))["params"]
  flat = tu.flatten_dict(variables["params"])
  index = tu.flatten_dict(variables.get(INDEX_COLLECTION, {}))
  out = {}
  for path, leaf in flat.items():
    if path[-1] != "blocks":
      out[path] = leaf
      continue
    layer = path[:-1]
    idx = {k: index[layer + (k,)] for k in ("rows", "cols", "nnz")}
    kernel_shape = tu.flatten_dict(shapes)[layer + ("kernel",)].shape
    out[layer + ("kernel",)] = bsr_kernel(leaf, idx, kernel_shape)
  return tu.unflatten_dict(out)


def serving_forms(model: nn.Module, variables, input_shape=None
                  ) -> dict[str, tuple[nn.Module, dict]]:
  """``{'kpd' | 'bsr' | 'dense': (model, variables)}`` for a KPD ``model``;
  ``{'bsr' | 'dense': ...}`` for a block-sparse one, which needs ``input_shape``
  (``(1, *image)``) to build its dense twin."""
  params = variables["params"]
  extra = {k: v for k, v in variables.items() if k not in ("params", INDEX_COLLECTION)}
  factory = model.layers
  dense_model = model.clone(layers=dataclasses.replace(factory, kind="dense"))
  if factory.kind == "bsr":
    if input_shape is None:
      raise ValueError("serving_forms of a block-sparse model needs input_shape, e.g. "
                       "(1, 28, 28, 1), to build its dense form.")
    return {"bsr": (model, variables),
            "dense": (dense_model, {"params": bsr_dense_params(dense_model, variables,
                                                               input_shape), **extra})}
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


def save_blocks(params, path: str, index=None) -> None:
  """Writes each sparse layer's nonzero blocks to an npz as ``<layer>/<term>/{rows,cols,
  blocks}`` for KPD layers and ``<layer>/bsr/{rows,cols,blocks}`` for block-sparse ones
  (blocks ``(nnz, [kh, kw,] bm, bn)`` at block ``(rows[k], cols[k])``); ``index``: the
  ``bsr_index`` collection of a block-sparse model."""
  arrays = {}
  index = tu.flatten_dict(index or {})
  for where, blocks in tu.flatten_dict(params).items():
    if where[-1] == "blocks":
      layer = where[:-1]
      nnz = int(index[layer + ("nnz",)])
      name = "/".join(layer) + "/bsr"
      arrays.update({f"{name}/rows": np.asarray(index[layer + ("rows",)])[:nnz],
                     f"{name}/cols": np.asarray(index[layer + ("cols",)])[:nnz],
                     f"{name}/blocks": np.asarray(blocks)[:nnz]})
  for layer, terms in sparsity.layer_groups(params).items():
    node = params
    for k in layer:
      node = node[k]
    for t in terms:
      rows, cols, blocks = kron.nonzero_blocks(*(node[t[-1]][k] for k in "SAB"))
      name = "/".join(t)
      arrays.update({f"{name}/rows": rows, f"{name}/cols": cols, f"{name}/blocks": blocks})
  np.savez_compressed(path, **arrays)
