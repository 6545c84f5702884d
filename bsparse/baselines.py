"""Baselines of the side-by-side study: block masks on dense kernels as optax transforms.

The model is built with ``layers.kind='dense'``. Every ``kernel`` of a layer not listed in
``layers.dense_layers`` is sparsified by blocks over its (in, out) plane, the last two axes:
a ``(m, n)`` kernel with block shape ``(m2, n2)`` (``layers.block_shapes[name]`` or
``layers.block_shape``) has a block grid ``(m1, n1) = (m / m2, n / n2)``; a conv kernel
``(kh, kw, cin, cout)`` shares one grid mask over its taps, like ``KronConv``.

Each method is a small algorithm object (``init`` draws the first mask, ``step`` updates
the kernel and its mask after the base optimizer); ``block_masked`` wraps the base
optimizer and an algorithm into one ``GradientTransformation`` whose state holds the step
counter, the masks and the base optimizer's state. After every step pruned blocks are
exactly zero in the params. Methods (``config.method``):

- ``group_lasso``: block soft-thresholding, the prox of ``lam * sum_b ||W_b||_F``:
  ``W_b <- W_b * max(0, 1 - tau / ||W_b||)`` with ``tau = lam * lr(t) / lr_peak``; at
  ``prune_step`` the largest blocks are kept, then the mask is fixed and the penalty stops.
- ``gradual``: block magnitude pruning on the cubic schedule of Zhu & Gupta (2017).
- ``set`` / ``rigl``: dynamic sparse training at constant density, drop the smallest active
  blocks and grow as many at random (SET) or by dense-gradient norm (RigL); regrown blocks
  start at zero with zeroed optimizer moments.
- ``static``: a random mask from step 0.
- ``dense``: the base optimizer alone.

Every masked layer ends at exactly ``num_kept(target_density, m1 * n1)`` blocks. The
masks take effect from the first update: the forward pass of step 0 sees the initial
kernels.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Protocol

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bsparse import kron
from bsparse import layers as layers_lib

Schedule = Callable[[jax.Array], jax.Array]
Shape2 = tuple[int, int]
Path = tuple[str, ...]

METHODS = ("dense", "group_lasso", "gradual", "set", "rigl", "static")


# --------------------------------------------------------------------------- blocks


def num_kept(density: float, num_blocks: int) -> int:
  """Blocks kept at ``density``: ``floor(density * num_blocks)``, at least 1."""
  return max(1, math.floor(density * num_blocks + 1e-9))


def block_norms(w: jax.Array, block_shape: Shape2) -> jax.Array:
  """Frobenius norm of every block of ``w`` (``(..., m, n)``, over all taps): ``(m1, n1)``."""
  m2, n2 = block_shape
  m, n = w.shape[-2:]
  blocks = w.reshape(-1, m // m2, m2, n // n2, n2)
  return jnp.sqrt(jnp.sum(jnp.square(blocks), axis=(0, 2, 4)))


def expand(mask: jax.Array, block_shape: Shape2) -> jax.Array:
  """Block grid ``(m1, n1)`` -> entries ``(m1 * m2, n1 * n2)``; broadcasts over taps."""
  return jnp.repeat(jnp.repeat(mask, block_shape[0], axis=0), block_shape[1], axis=1)


def top_k_mask(scores: jax.Array, k, eligible: jax.Array | None = None) -> jax.Array:
  """Bool mask of the ``k`` highest ``scores`` among ``eligible`` blocks (ties go to the
  lower index); exactly ``min(k, eligible.sum())`` entries. ``k`` may be traced."""
  flat = scores.reshape(-1)
  if eligible is not None:
    flat = jnp.where(eligible.reshape(-1), flat, -jnp.inf)
  order = jnp.argsort(flat, descending=True, stable=True)
  rank = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
  keep = rank < k
  if eligible is not None:
    keep &= eligible.reshape(-1)
  return keep.reshape(scores.shape)


def random_mask(key: jax.Array, grid: Shape2, k: int) -> jax.Array:
  """Exactly ``k`` blocks of a ``grid`` kept, uniformly at random."""
  return top_k_mask(jax.random.uniform(key, grid), k)


def masked_kernels(params, layout: layers_lib.LayerFactory) -> dict[str, tuple[Path, Shape2]]:
  """``{layer: (path to its kernel, block shape)}`` for every kernel to sparsify.

  The layer key is the path of the module holding the kernel (``'fc1'``); layers in
  ``layout.dense_layers`` are left out. Raises a ValueError naming the layer when its
  block shape does not divide the kernel's (in, out) plane.
  """
  out = {}
  for path, leaf in tu.flatten_dict(params).items():
    if path[-1] != "kernel" or leaf.ndim < 2 or path[-2] in layout.dense_layers:
      continue
    name = "/".join(path[:-1])
    shapes = layout.shapes_for(path[-2])
    if len(shapes) != 1:
      raise ValueError(f"layer '{name}': a baseline takes one block shape, got {shapes}.")
    kron.grid_shape(*leaf.shape[-2:], shapes[0], where=f"layer '{name}'")
    out[name] = (path, shapes[0])
  return out


# --------------------------------------------------------------------------- algorithms


class Algorithm(Protocol):
  """One sparsity method on one layer; ``t`` is the step counter (0 at the first update)."""

  def init(self, key: jax.Array, grid: Shape2, name: str) -> jax.Array:
    """The mask of layer ``name`` before the first update: bool ``grid``."""

  def step(self, t: jax.Array, w: jax.Array, g: jax.Array, mask: jax.Array,
           block_shape: Shape2, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``w``: the kernel after the base optimizer's update; ``g``: its dense gradient;
    ``mask``: bool ``(m1, n1)`` before the step. Returns the new kernel (its blocks outside
    the new mask are zeroed by the wrapper), the new mask and the blocks grown by this
    step (set to zero, optimizer moments reset)."""


def _no_growth(mask: jax.Array) -> jax.Array:
  return jnp.zeros_like(mask)


@dataclasses.dataclass(frozen=True)
class Static:
  """A mask fixed from step 0: ``num_kept(density, blocks)`` random blocks, or
  ``given[layer]`` (bool ``(m1, n1)``, 1 to ``num_kept`` blocks), e.g. the blocks another
  run chose (``kept_blocks``), to train them from a fresh initialisation."""
  density: float
  given: dict[str, Any] | None = None

  def init(self, key, grid, name):
    k = num_kept(self.density, grid[0] * grid[1])
    if self.given is None:
      return random_mask(key, grid, k)
    mask = self.given.get(name)
    if mask is None or mask.shape != tuple(grid) or not 0 < mask.sum() <= k:
      has = "none" if mask is None else f"{mask.shape[0]}x{mask.shape[1]} with {mask.sum()}"
      raise ValueError(
          f"baseline.mask_from: layer '{name}' needs a {grid[0]}x{grid[1]} block mask with "
          f"1 to {k} blocks (target density {self.density}); the given run has {has}. Give "
          "a run of the same model, block shapes and target density.")
    return jnp.asarray(mask, bool)

  def step(self, t, w, g, mask, block_shape, key):
    return w, mask, _no_growth(mask)


@dataclasses.dataclass(frozen=True)
class GroupLasso:
  """Block soft-thresholding until ``prune_step``, where each layer is pruned to
  ``density`` by block norm; then the mask is fixed and the penalty is off.

  Attributes:
    lam: shrinkage of every block norm per step at the peak learning rate.
    lr, lr_peak: the base optimizer's schedule and its peak (``tau = lam * lr / lr_peak``).
  """
  density: float
  lam: float
  lr: Schedule
  lr_peak: float
  prune_step: int

  def init(self, key, grid, name):
    return jnp.ones(grid, bool)

  def step(self, t, w, g, mask, block_shape, key):
    penalty = t < self.prune_step
    tau = jnp.where(penalty, self.lam * self.lr(t) / self.lr_peak, 0.0)
    norms = block_norms(w, block_shape)
    scale = jnp.maximum(0.0, 1.0 - tau / jnp.where(norms > 0, norms, 1.0))
    w = w * expand(scale, block_shape)
    shrunk = norms * scale
    pruned = top_k_mask(shrunk, num_kept(self.density, mask.size))
    mask = jnp.where(penalty, shrunk > 0, jnp.where(t == self.prune_step, pruned, mask))
    return w, mask, _no_growth(mask)


@dataclasses.dataclass(frozen=True)
class Gradual:
  """Gradual block magnitude pruning (Zhu & Gupta): every ``every`` steps from
  ``start_step`` to ``end_step`` (and at ``end_step``) keep the ``floor(d(t) * blocks)``
  largest active blocks, ``d(t) = d_f + (1 - d_f) (1 - (t - start) / (end - start))^3``."""
  density: float
  start_step: int
  end_step: int
  every: int

  def init(self, key, grid, name):
    return jnp.ones(grid, bool)

  def kept_at(self, t: jax.Array, num_blocks: int) -> jax.Array:
    """Blocks kept after the pruning step at ``t``."""
    final = num_kept(self.density, num_blocks)
    frac = jnp.clip((t - self.start_step) / max(self.end_step - self.start_step, 1), 0, 1)
    d = 1.0 - (1.0 - self.density) * (1.0 - (1.0 - frac) ** 3)
    k = jnp.maximum(jnp.floor(d * num_blocks + 1e-6).astype(jnp.int32), final)
    return jnp.where(t >= self.end_step, final, k)

  def due(self, t: jax.Array) -> jax.Array:
    """Whether ``t`` is a pruning step."""
    return ((t >= self.start_step) & (t <= self.end_step)
            & (((t - self.start_step) % self.every == 0) | (t == self.end_step)))

  def step(self, t, w, g, mask, block_shape, key):
    due = self.due(t)
    keep = top_k_mask(block_norms(w, block_shape), self.kept_at(t, mask.size), mask)
    return w, jnp.where(due, keep, mask), _no_growth(mask)


@dataclasses.dataclass(frozen=True)
class SET:
  """Sparse Evolutionary Training on blocks at constant density.

  Starts from a random mask; every ``every`` steps before ``end_step`` drops the
  ``floor(f(t) * kept)`` active blocks of smallest norm, ``f(t) = drop_fraction *
  (1 + cos(pi t / end_step)) / 2``, and grows as many of the blocks outside the remaining
  mask by ``grow_scores`` (random here).
  """
  density: float
  end_step: int
  every: int
  drop_fraction: float

  def init(self, key, grid, name):
    return random_mask(key, grid, num_kept(self.density, grid[0] * grid[1]))

  def grow_scores(self, g: jax.Array, block_shape: Shape2, key: jax.Array) -> jax.Array:
    """Score of every block ``(m1, n1)`` for growing; the highest are grown."""
    return jax.random.uniform(key, block_norms(g, block_shape).shape)

  def step(self, t, w, g, mask, block_shape, key):
    due = (t > 0) & (t < self.end_step) & (t % self.every == 0)
    frac = self.drop_fraction * 0.5 * (1.0 + jnp.cos(jnp.pi * t / max(self.end_step, 1)))
    n = jnp.floor(frac * num_kept(self.density, mask.size)).astype(jnp.int32)
    drop = top_k_mask(-block_norms(w, block_shape), n, mask)
    kept = mask & ~drop
    grown = top_k_mask(self.grow_scores(g, block_shape, key), n, ~kept)
    new = jnp.where(due, kept | grown, mask)
    return w, new, new & ~mask


class RigL(SET):
  """SET that grows the blocks of largest dense-gradient norm (Evci et al., 2020)."""

  def grow_scores(self, g, block_shape, key):
    return block_norms(g, block_shape)


# --------------------------------------------------------------------------- transform


class BaselineState(NamedTuple):
  count: jax.Array
  masks: dict[str, jax.Array]  # layer -> bool (m1, n1); True = block kept
  inner: Any  # the base optimizer's state


def reset_moments(inner, grown: dict[Path, jax.Array], shapes: dict[Path, Shape2]):
  """Zeros Adam's ``mu``/``nu`` and momentum ``trace`` at the grown blocks of every kernel
  path in ``grown`` (bool ``(m1, n1)``), wherever they sit in the base optimizer's state."""

  def zero(tree):
    flat = tu.flatten_dict(tree)
    for path, g in grown.items():
      flat[path] = jnp.where(expand(g, shapes[path]), 0, flat[path])
    return tu.unflatten_dict(flat)

  def visit(s):
    if isinstance(s, optax.ScaleByAdamState):
      return s._replace(mu=zero(s.mu), nu=zero(s.nu))
    if isinstance(s, optax.TraceState):
      return s._replace(trace=zero(s.trace))
    return s

  moments = (optax.ScaleByAdamState, optax.TraceState)
  return jax.tree.map(visit, inner, is_leaf=lambda s: isinstance(s, moments))


def block_masked(base: optax.GradientTransformation, algorithm: Algorithm,
                 layout: layers_lib.LayerFactory, seed: int = 0
                 ) -> optax.GradientTransformation:
  """``base`` followed by ``algorithm`` on every kernel that ``masked_kernels`` selects.

  The state is a ``BaselineState``; the base optimizer's state sits inside it so grown
  blocks can have their moments reset.
  """

  def init(params):
    kernels = masked_kernels(params, layout)
    flat = tu.flatten_dict(params)
    key = jax.random.key(seed)
    masks = {name: algorithm.init(jax.random.fold_in(key, i),
                                  block_norms(flat[path], shape).shape, name)
             for i, (name, (path, shape)) in enumerate(kernels.items())}
    return BaselineState(jnp.zeros((), jnp.int32), masks, base.init(params))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("block_masked needs params: call tx.update(grads, state, params).")
    updates, inner = base.update(grads, state.inner, params)
    flat_p, flat_u, flat_g = (tu.flatten_dict(t) for t in (params, updates, grads))
    key = jax.random.fold_in(jax.random.key(seed), state.count + 1)
    masks, grown, shapes = {}, {}, {}
    for i, (name, (path, shape)) in enumerate(masked_kernels(params, layout).items()):
      w, mask, new = algorithm.step(state.count, flat_p[path] + flat_u[path], flat_g[path],
                                    state.masks[name], shape, jax.random.fold_in(key, i))
      w = jnp.where(expand(mask & ~new, shape), w, 0.0)
      flat_u[path] = w - flat_p[path]
      masks[name], grown[path], shapes[path] = mask, new, shape
    inner = reset_moments(inner, grown, shapes)
    return tu.unflatten_dict(flat_u), BaselineState(state.count + 1, masks, inner)

  return optax.GradientTransformation(init, update)


# --------------------------------------------------------------------------- config


def layout_from_config(layers_config) -> layers_lib.LayerFactory:
  """Block shapes and dense layers from ``config.layers``."""
  return layers_lib.LayerFactory(
      kind="dense", block_shape=tuple(layers_config.block_shape),
      block_shapes=dict(layers_config.block_shapes.items()),
      dense_layers=tuple(layers_config.dense_layers))


def kept_blocks(workdir: str) -> dict[str, np.ndarray]:
  """The block masks a KPD run ended with: ``{layer: bool (m1, n1)}`` from the last switch
  to block-sparse form recorded in ``workdir`` (``finetune.RECORD_FILE``)."""
  from bsparse import finetune  # pylint: disable=g-import-not-at-top (finetune imports us)
  switches = finetune.load_switches(workdir)
  if not switches:
    raise ValueError(
        f"baseline.mask_from={workdir!r} records no block-sparse model "
        f"({finetune.RECORD_FILE}): give the workdir of a KPD run trained with "
        "sparsity.finetune='bsr' past its mask freeze.")
  masks = {}
  for name, layer in switches[-1].layers.items():
    if "grid" not in layer:
      raise ValueError(f"baseline.mask_from={workdir!r}: its {finetune.RECORD_FILE} predates "
                       "block grids in the record; rerun that KPD run with this version.")
    mask = np.zeros(layer["grid"], bool)
    mask[layer["rows"], layer["cols"]] = True
    masks[name] = mask
  return masks


def algorithm_from_config(config, lr: Schedule, steps_per_epoch: int) -> Algorithm:
  """The algorithm of ``config.method`` (a masking method of ``METHODS``) from
  ``config.baseline``; epochs become steps with ``steps_per_epoch``."""
  b, method = config.baseline, config.method
  steps = lambda epochs: int(epochs * steps_per_epoch)
  if not 0 < b.target_density <= 1:
    raise ValueError(f"baseline.target_density must be in (0, 1], got {b.target_density}.")
  if method == "static":
    return Static(b.target_density, kept_blocks(b.mask_from) if b.get("mask_from") else None)
  if method == "group_lasso":
    return GroupLasso(b.target_density, b.lam, lr, config.optimizer.learning_rate,
                      steps(b.prune_epoch))
  if method == "gradual":
    return Gradual(b.target_density, steps(b.start_epoch), steps(b.end_epoch),
                   max(1, b.update_every_steps))
  if method in ("set", "rigl"):
    cls = SET if method == "set" else RigL
    return cls(b.target_density, steps(b.end_epoch), max(1, b.update_every_steps),
               b.drop_fraction)
  raise ValueError(f"unknown baseline method '{method}'; valid: {list(METHODS)}.")


def make(config, base: optax.GradientTransformation, lr: Schedule, steps_per_epoch: int
         ) -> tuple[optax.GradientTransformation, Schedule]:
  """The training chain of a baseline ``config.method``; returns ``(tx, lam_schedule)``
  (the group-lasso penalty, 0 for the other methods)."""
  if config.layers.kind != "dense":
    raise ValueError(f"method '{config.method}' trains dense layers: set "
                     f"layers.kind='dense' (got '{config.layers.kind}').")
  if config.method == "dense":
    return base, lambda t: jnp.zeros(())
  algorithm = algorithm_from_config(config, lr, steps_per_epoch)
  tx = block_masked(base, algorithm, layout_from_config(config.layers), config.seed)
  if isinstance(algorithm, GroupLasso):
    return tx, lambda t: jnp.where(t < algorithm.prune_step, algorithm.lam, 0.0)
  return tx, lambda t: jnp.zeros(())


# --------------------------------------------------------------------------- logging


def baseline_state(opt_state) -> BaselineState | None:
  """Finds the ``BaselineState`` inside an optimizer state."""
  for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, BaselineState)):
    if isinstance(s, BaselineState):
      return s
  return None


def block_density(params, opt_state) -> dict[str, jax.Array]:
  """Fraction of kept blocks per masked layer, keyed ``'<layer>'``, plus ``'weights'``: the
  fraction of all masked-kernel entries inside kept blocks. Empty without a baseline."""
  state = baseline_state(opt_state)
  if state is None or not state.masks:
    return {}
  flat = tu.flatten_dict(params)
  out = {name: jnp.mean(m.astype(jnp.float32)) for name, m in state.masks.items()}
  sizes = {name: flat[(*name.split("/"), "kernel")].size for name in state.masks}
  out["weights"] = sum(out[name] * size for name, size in sizes.items()) / sum(sizes.values())
  return out
