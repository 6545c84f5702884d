"""Block sparsity as optax gradient transformations.

``block_sparsity`` runs after the base optimizer. For every KPD selector ``S`` (a leaf
named ``S`` beside ``A`` and ``B``; see ``bsparse.layers``) it:

1. applies the **proximal L1 step** ``S <- sign(S') max(|S'| - tau_t, 0)`` to the updated
   selector ``S' = S + u``, so blocks reach exact zeros. ``tau_t = lam(t) * lr(t) / lr_peak``:
   ``lam`` is how much ``|S|`` shrinks per step at the peak learning rate, the natural unit
   under Adam whose steps are about ``lr`` whatever the gradient scale;
2. at ``freeze_step`` fixes the block mask: optionally prunes each layer to
   ``target_density`` by block Frobenius norm (``|S_ij| * ||sum_k A_kij B_k||``), and from
   then on zero blocks stay zero (and, by default, the penalty stops so the surviving
   blocks fine-tune without shrinkage).

The scale ambiguity of ``S * A`` (shrink ``S``, grow ``A``, dodge the penalty) is held in
check by decoupled weight decay on ``A`` and ``B`` in the base optimizer
(``make_optimizer``), which makes the balanced split the cheapest one.

Masks and the step counter live in the optimizer state, so they are checkpointed.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import optax

from bsparse import kron

Schedule = Callable[[jax.Array], jax.Array]


# --------------------------------------------------------------------------- param labels


def param_labels(params) -> Any:
  """Labels every leaf: ``selector`` (S), ``factor`` (A, B), ``kernel`` (dense weights of
  rank >= 2) or ``other`` (biases, norm scales, embeddings of rank < 2)."""
  flat = tu.flatten_dict(params)

  def label(path, leaf):
    if path[-1] == "S":
      return "selector"
    if path[-1] in ("A", "B"):
      return "factor"
    return "kernel" if leaf.ndim >= 2 else "other"

  return tu.unflatten_dict({p: label(p, v) for p, v in flat.items()})


def term_paths(params) -> list[tuple[str, ...]]:
  """Paths of the KPD terms (the dicts holding ``S``, ``A``, ``B``)."""
  flat = tu.flatten_dict(params)
  return sorted({p[:-1] for p in flat if p[-1] == "S" and p[:-1] + ("A",) in flat})


def block_density(params) -> dict[str, jax.Array]:
  """Fraction of nonzero blocks per KPD term, keyed ``'layer/term'``."""
  flat = tu.flatten_dict(params)
  return {"/".join(p): kron.density(flat[p + ("S",)]) for p in term_paths(params)}


def weight_density(params) -> jax.Array:
  """Fraction of weight entries inside nonzero blocks, over all KPD terms."""
  flat = tu.flatten_dict(params)
  nz, total = 0.0, 0
  for p in term_paths(params):
    s, b = flat[p + ("S",)], flat[p + ("B",)]
    area = b.shape[1] * b.shape[2]
    nz = nz + jnp.sum(s != 0) * area
    total += s.size * area
  return nz / max(total, 1)


# --------------------------------------------------------------------------- transform


class BlockSparsityState(NamedTuple):
  count: jax.Array
  masks: dict[str, jax.Array]  # 'layer/term' -> bool (m1, n1); True = block kept


def soft_threshold(x: jax.Array, tau: jax.Array) -> jax.Array:
  return jnp.sign(x) * jnp.maximum(jnp.abs(x) - tau, 0.0)


def prune_to_density(scores: jax.Array, density: float) -> jax.Array:
  """Keeps the ``floor(density * size)`` (at least 1) highest positive scores, so the
  block density never exceeds ``density``; returns a bool mask."""
  k = max(1, math.floor(density * scores.size + 1e-9))
  if k >= scores.size:
    return scores > 0
  kth = jax.lax.top_k(scores.reshape(-1), k)[0][-1]
  return (scores >= kth) & (scores > 0)


def block_sparsity(lam: Schedule, lr: Schedule, lr_peak: float, freeze_step: int = -1,
                   target_density: float | None = None,
                   penalty_after_freeze: bool = False) -> optax.GradientTransformation:
  """Proximal L1 on selectors + mask freeze; see the module docstring.

  Args:
    lam: step -> per-step shrinkage of ``|S|`` at peak learning rate.
    lr: the learning-rate schedule of the base optimizer.
    lr_peak: its peak value (``tau = lam * lr / lr_peak``).
    freeze_step: step at which the mask is fixed; negative: never.
    target_density: prune each layer to at most this block density at the freeze.
    penalty_after_freeze: keep soft-thresholding after the freeze.
  """

  def init(params):
    masks = {"/".join(p): jnp.ones(tu.flatten_dict(params)[p + ("S",)].shape, bool)
             for p in term_paths(params)}
    return BlockSparsityState(jnp.zeros((), jnp.int32), masks)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("block_sparsity needs params: call tx.update(grads, state, params).")
    count = state.count
    frozen = (freeze_step >= 0) & (count > freeze_step)
    at_freeze = count == freeze_step
    tau = lam(count) * lr(count) / lr_peak
    if not penalty_after_freeze:
      tau = jnp.where(frozen, 0.0, tau)
    flat_p, flat_u = tu.flatten_dict(params), tu.flatten_dict(updates)
    masks = {}
    for path in term_paths(params):
      key = "/".join(path)
      s_new = soft_threshold(flat_p[path + ("S",)] + flat_u[path + ("S",)], tau)
      s_new = jnp.where(frozen, s_new * state.masks[key], s_new)
      if target_density is not None and freeze_step >= 0:
        a_new = flat_p[path + ("A",)] + flat_u[path + ("A",)]
        b_new = flat_p[path + ("B",)] + flat_u[path + ("B",)]
        keep = prune_to_density(kron.block_norms(s_new, a_new, b_new), target_density)
        s_new = jnp.where(at_freeze, s_new * keep, s_new)
      flat_u[path + ("S",)] = s_new - flat_p[path + ("S",)]
      masks[key] = s_new != 0
    return tu.unflatten_dict(flat_u), BlockSparsityState(count + 1, masks)

  return optax.GradientTransformation(init, update)


# --------------------------------------------------------------------------- schedules


def lam_schedule(lam: float, start_step: int, ramp_steps: int) -> Schedule:
  """0 until ``start_step``, a linear ramp to ``lam`` over ``ramp_steps``, then ``lam``."""
  return optax.join_schedules(
      [optax.constant_schedule(0.0),
       optax.linear_schedule(0.0, lam, max(ramp_steps, 1))], [start_step])


def lr_schedule(name: str, peak: float, total_steps: int, warmup_steps: int) -> Schedule:
  if name == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup_steps, 1),
                                              max(total_steps, warmup_steps + 1))
  if name == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup_steps, 1)), optax.constant_schedule(peak)],
        [warmup_steps])
  raise ValueError(f"unknown learning-rate schedule '{name}'; valid: ['cosine', 'constant'].")


OPTIMIZERS = ("adamw", "sgd")


def base_optimizer(name: str, lr: Schedule, weight_decay: float, momentum: float,
                   decay_mask) -> optax.GradientTransformation:
  if name == "adamw":
    return optax.adamw(lr, weight_decay=weight_decay, mask=decay_mask)
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(weight_decay, decay_mask),
                       optax.sgd(lr, momentum=momentum, nesterov=True))
  raise ValueError(f"unknown optimizer '{name}'; valid: {list(OPTIMIZERS)}.")


def make_optimizer(config, steps_per_epoch: int, total_steps: int
                   ) -> tuple[optax.GradientTransformation, Schedule, Schedule]:
  """The training chain from ``config.optimizer`` and ``config.sparsity``.

  Weight decay applies to dense kernels and to the KPD factors ``A``/``B`` (which keeps the
  ``S``/``A`` scale in check), never to selectors, biases or norm parameters.
  Returns ``(tx, lr_schedule, lam_schedule)``.
  """
  opt, sp = config.optimizer, config.sparsity
  lr = lr_schedule(opt.schedule, opt.learning_rate, total_steps,
                   int(opt.warmup_epochs * steps_per_epoch))
  decay_mask = lambda p: jax.tree.map(lambda l: l in ("kernel", "factor"), param_labels(p))
  base = base_optimizer(opt.name, lr, opt.weight_decay, opt.momentum, decay_mask)
  if opt.grad_clip > 0:
    base = optax.chain(optax.clip_by_global_norm(opt.grad_clip), base)
  lam = lam_schedule(sp.lam, int(sp.start_epoch * steps_per_epoch),
                     int(sp.ramp_epochs * steps_per_epoch))
  freeze = int(sp.freeze_epoch * steps_per_epoch) if sp.freeze_epoch >= 0 else -1
  target = sp.target_density if 0 < sp.target_density < 1 else None
  tx = optax.chain(base, block_sparsity(lam, lr, opt.learning_rate, freeze, target,
                                        sp.penalty_after_freeze))
  return tx, lr, lam


def sparsity_state(opt_state) -> BlockSparsityState | None:
  """Finds the ``BlockSparsityState`` inside a chain's state."""
  for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, BlockSparsityState)):
    if isinstance(s, BlockSparsityState):
      return s
  return None
