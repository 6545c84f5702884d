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
   blocks fine-tune without shrinkage). With ``prune_start >= 0`` the layers reach that
   density gradually instead: every ``prune_every`` steps from ``prune_start`` to
   ``freeze_step`` they keep their largest blocks on the cubic schedule of
   ``baselines.Gradual``, and a pruned block stays pruned.

With ``trim_density`` the penalty is the **trimmed L1** norm (Bertsimas, Copenhaver and
Mazumder, 2017): the ``floor(trim_density * blocks)`` largest blocks of a term (by block
norm, as the pruning ranks them) are not shrunk. The penalty then only pushes the blocks
beyond a layer's budget toward zero: it cannot take a layer below its target density,
however strong, and the blocks that stay carry no shrinkage bias.

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

from bsparse import baselines, kron

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


def density_scalars(params) -> dict[str, jax.Array]:
  """``{'density/<layer>/<term>': ..., 'density/weights': ...}`` of the KPD terms."""
  out = {f"density/{k}": v for k, v in block_density(params).items()}
  if out:
    out["density/weights"] = weight_density(params)
  return out


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
  masks: dict[str, jax.Array]  # 'layer/term' -> bool (m1, n1); 'layer/blocks' -> bool
  # (nnz_max,) of a block-sparse layer's stored blocks. True = block kept
  # 'layer/term' -> float32 (): 1 while a candidate competes (and after it wins); a loser's
  # falls to 0 over the fade before the selection step; 0 once it is dropped.
  alive: dict[str, jax.Array]


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


def layer_groups(params) -> dict[tuple[str, ...], list[tuple[str, ...]]]:
  """KPD terms grouped by layer: ``{layer_path: [term_path, ...]}`` (candidates)."""
  groups: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
  for path in term_paths(params):
    groups.setdefault(path[:-1], []).append(path)
  return groups


def term_mass(flat, path) -> jax.Array:
  """Frobenius norm of a term's weight ``||sum_k kron(S*A_k, B_k)||``, without building it."""
  norms = kron.block_norms(*(flat[path + (k,)] for k in "SAB"))
  return jnp.sqrt(jnp.sum(norms ** 2))


def candidate_shares(flat, terms) -> list[jax.Array]:
  """Each candidate's share of its layer's total weight norm (1 for a single term)."""
  if len(terms) == 1:
    return [jnp.ones(())]
  mass = jnp.stack([term_mass(flat, t) for t in terms])
  return list(mass / jnp.maximum(mass.sum(), 1e-12))


def candidate_share_scalars(params) -> dict[str, jax.Array]:
  """``{'layer/term': share}`` for the terms of layers with several candidates."""
  flat = tu.flatten_dict(params)
  return {"/".join(t): share for terms in layer_groups(params).values() if len(terms) > 1
          for t, share in zip(terms, candidate_shares(flat, terms))}


def block_sparsity(lam: Schedule, lr: Schedule, lr_peak: float, freeze_step: int = -1,
                   target_density: float | None = None, penalty_after_freeze: bool = False,
                   anneal: Schedule | None = None, anneal_strength: float = 0.0,
                   select_step: int = -1, fade_steps: int = 0, prune_start: int = -1,
                   prune_every: int = 100,
                   trim_density: float | None = None,
                   bsr_grids: dict[str, int] | None = None) -> optax.GradientTransformation:
  """Proximal L1 on selectors, block-size annealing and the mask freeze.

  Args:
    lam: step -> per-step shrinkage of ``|S|`` at peak learning rate.
    lr: the learning-rate schedule of the base optimizer.
    lr_peak: its peak value (``tau = lam * lr / lr_peak``).
    freeze_step: step at which the mask is fixed; negative: never.
    target_density: prune each layer to at most this block density at the freeze.
    penalty_after_freeze: keep soft-thresholding after the freeze.
    anneal: step -> ``a(t)`` in [0, 1]. In a layer with several candidate block shapes,
      candidate ``c`` with share ``p_c`` of the layer's weight norm is thresholded with
      ``tau * (1 + anneal_strength * a(t) * (1 - p_c))``: the weaker candidates shrink
      faster (while ``lam`` is still small this barely moves the shares; the fade below
      is what removes the losers).
    select_step: by this step every multi-candidate layer keeps only its largest
      candidate; the others are zeroed and stay dropped. Negative: never.
    fade_steps: the choice is made ``fade_steps`` steps before ``select_step``; from there
      each loser's factors stop training and its selector is scaled down linearly, so
      that the loser has no weight left at ``select_step`` and the layer hands its
      function over to the winner while training goes on. 0: the losers are zeroed at
      once, at ``select_step``.
    prune_start: first step of gradual pruning to ``target_density`` (reached at
      ``freeze_step``); negative: prune once, at ``freeze_step``.
    prune_every: steps between gradual pruning steps.
    trim_density: trimmed L1: each term's ``floor(trim_density * blocks)`` largest blocks
      are spared the (un-annealed) threshold ``tau``. None: plain L1 on every block.
    bsr_grids: ``{'layer': blocks in its grid}`` of the block-sparse layers of a model
      switched before ``freeze_step``: their stored blocks are pruned on the same cubic
      schedule (``kept_at`` counts blocks of the whole grid) until ``freeze_step``.
  """
  gradual = None
  if prune_start >= 0 and target_density is not None and freeze_step > prune_start:
    gradual = baselines.Gradual(target_density, prune_start, freeze_step, prune_every)

  def init(params):
    flat = tu.flatten_dict(params)
    keys = ["/".join(p) for p in term_paths(params)]
    masks = {k: jnp.ones(flat[tuple(k.split("/")) + ("S",)].shape, bool) for k in keys}
    masks.update({f"{name}/blocks": _block_norms(flat[_blocks_path(name)]) > 0
                  for name in bsr_grids or {}})
    return BlockSparsityState(jnp.zeros((), jnp.int32), masks,
                              {k: jnp.ones((), jnp.float32) for k in keys})

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("block_sparsity needs params: call tx.update(grads, state, params).")
    count = state.count
    frozen = (freeze_step >= 0) & (count > freeze_step)
    tau = lam(count) * lr(count) / lr_peak
    if not penalty_after_freeze:
      tau = jnp.where(frozen, 0.0, tau)
    a_t = anneal(count) if anneal is not None else 0.0
    flat_p, flat_u = tu.flatten_dict(params), tu.flatten_dict(updates)
    flat_new = {p: flat_p[p] + flat_u[p] for p in flat_p if p[-1] in "SAB"}
    masks, alive = {}, {}
    for terms in layer_groups(params).values():
      shares = candidate_shares(flat_p, terms)
      for path, share in zip(terms, shares):
        key = "/".join(path)
        s_new = flat_new[path + ("S",)]
        threshold = tau * (1 + anneal_strength * a_t * (1 - share))
        if trim_density is not None:  # the budget's largest blocks skip the base tau
          spared = baselines.top_k_mask(
              kron.block_norms(s_new, flat_new[path + ("A",)], flat_new[path + ("B",)]),
              baselines.num_kept(trim_density, s_new.size))
          threshold = threshold - jnp.where(spared, tau, 0.0)
        s_new = soft_threshold(s_new, threshold)
        s_new = jnp.where(frozen, s_new * state.masks[key], s_new)
        if gradual is not None:
          s_new = _prune_gradually(gradual, count, s_new, state.masks[key],
                                   flat_new[path + ("A",)], flat_new[path + ("B",)])
        elif target_density is not None and freeze_step >= 0:
          scores = kron.block_norms(s_new, flat_new[path + ("A",)], flat_new[path + ("B",)])
          s_new = jnp.where(count == freeze_step,
                            s_new * prune_to_density(scores, target_density), s_new)
        flat_new[path + ("S",)] = s_new
      alive.update(_select(flat_new, terms, state.alive, count, select_step, fade_steps))
      for path in terms:
        key = "/".join(path)
        s_new = flat_new[path + ("S",)]
        if len(terms) > 1:  # a loser's selector follows its gate and its factors rest
          fading, old = alive[key] < 1, state.alive[key]
          scaled = flat_p[path + ("S",)] * jnp.where(old > 0, alive[key] / old, 0.0)
          s_new = jnp.where(fading, scaled, s_new)
          for k in "AB":
            flat_u[path + (k,)] = jnp.where(fading, 0.0, flat_u[path + (k,)])
        flat_u[path + ("S",)] = s_new - flat_p[path + ("S",)]
        masks[key] = s_new != 0
    for name, num_blocks in (bsr_grids or {}).items():
      path, key = _blocks_path(name), f"{name}/blocks"
      new = flat_p[path] + flat_u[path]
      masks[key] = _gradual_mask(gradual, count, _block_norms(new), state.masks[key],
                                 num_blocks)
      keep = masks[key].reshape((-1,) + (1,) * (new.ndim - 1))
      flat_u[path] = jnp.where(keep, new, 0.0) - flat_p[path]
    return tu.unflatten_dict(flat_u), BlockSparsityState(count + 1, masks, alive)

  return optax.GradientTransformation(init, update)


def _blocks_path(layer: str) -> tuple[str, ...]:
  return (*layer.split("/"), "blocks")


def _block_norms(blocks: jax.Array) -> jax.Array:
  """Frobenius norm of each stored block: ``(nnz_max, ...)`` -> ``(nnz_max,)``."""
  return jnp.sqrt(jnp.sum(jnp.square(blocks), axis=tuple(range(1, blocks.ndim))))


def _gradual_mask(gradual, count, norms, mask, num_blocks: int) -> jax.Array:
  """The stored blocks kept after a step of ``gradual`` pruning of a block-sparse layer
  with ``num_blocks`` blocks in its grid; without a schedule, ``mask`` stays."""
  if gradual is None:
    return mask
  keep = baselines.top_k_mask(norms, gradual.kept_at(count, num_blocks), mask)
  return jnp.where(gradual.due(count), keep, mask)


def _prune_gradually(gradual, count, s, mask, a, b) -> jax.Array:
  """The selector ``s`` after a step of ``gradual`` (``baselines.Gradual``) pruning: from
  its start, blocks outside ``mask`` stay zero; on its pruning steps only the
  ``kept_at(count)`` largest blocks are kept."""
  s = jnp.where(count >= gradual.start_step, s * mask, s)
  keep = baselines.top_k_mask(kron.block_norms(s, a, b), gradual.kept_at(count, s.size),
                              s != 0)
  return jnp.where(gradual.due(count), s * keep, s)


def _select(flat, terms, alive, count, select_step, fade_steps) -> dict[str, jax.Array]:
  """The gates of a layer's candidates after step ``count``. At ``select_step -
  fade_steps`` the candidate of largest weight norm wins; each loser's gate then falls
  linearly, ``(select_step - count) / (fade_steps + 1)``, to 0 at ``select_step``."""
  keys = ["/".join(t) for t in terms]
  if len(terms) == 1:
    return {keys[0]: alive[keys[0]]}
  mass = jnp.stack([jnp.where(alive[k] > 0, term_mass(flat, t), -1.0)
                    for k, t in zip(keys, terms)])
  winner = jnp.argmax(mass)
  at_choice = count == select_step - fade_steps
  fade = jnp.clip((select_step - count) / (fade_steps + 1), 0.0, 1.0).astype(jnp.float32)
  return {k: jnp.where((alive[k] < 1) | (at_choice & (i != winner)), fade, alive[k])
          for i, k in enumerate(keys)}


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


def rewarmed(lr: Schedule, restart_step: int, warmup_steps: int) -> Schedule:
  """``lr`` with a second linear warm-up over ``warmup_steps`` from ``restart_step``, the
  step whose update is the first with fresh optimizer moments (a switch to block-sparse
  form): Adam's first updates from zero moments move every entry by about the learning
  rate whatever its gradient's scale, which at the schedule's peak undoes part of what
  the model learnt. Unchanged before ``restart_step`` and when ``warmup_steps`` is 0."""
  if warmup_steps <= 0:
    return lr
  ramp = optax.join_schedules(  # 1, then 1/W, 2/W, ... 1 from the restart on
      [optax.constant_schedule(1.0),
       optax.linear_schedule(1.0 / warmup_steps, 1.0, warmup_steps - 1)], [restart_step])
  return lambda count: lr(count) * ramp(count)


OPTIMIZERS = ("adamw", "sgd")
PENALTIES = ("l1", "trimmed")
METHODS = ("kpd",) + baselines.METHODS


def base_optimizer(name: str, lr: Schedule, weight_decay: float, momentum: float,
                   decay_mask) -> optax.GradientTransformation:
  if name == "adamw":
    return optax.adamw(lr, weight_decay=weight_decay, mask=decay_mask)
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(weight_decay, decay_mask),
                       optax.sgd(lr, momentum=momentum, nesterov=True))
  raise ValueError(f"unknown optimizer '{name}'; valid: {list(OPTIMIZERS)}.")


def make_optimizer(config, steps_per_epoch: int, total_steps: int,
                   bsr_grids: dict[str, int] | None = None, restart_step: int | None = None
                   ) -> tuple[optax.GradientTransformation, Schedule, Schedule]:
  """The training chain from ``config.optimizer`` and ``config.method``: ``kpd`` (the
  block-sparsity transform of ``config.sparsity``) or a baseline of ``bsparse.baselines``
  (``config.baseline``) on dense layers.

  Weight decay applies to dense kernels and to the KPD factors ``A``/``B`` (which keeps the
  ``S``/``A`` scale in check), never to selectors, biases or norm parameters.
  ``optimizer.factor_lr_scale`` multiplies the factors' updates: Adam moves every entry by
  about the learning rate, and a factor entry (std ``(2 / fan_in / rank) ** 0.25``) is
  several times larger than a dense weight (``(2 / fan_in) ** 0.5``), so at one learning
  rate a factored weight changes by a smaller fraction per step than a dense one.
  ``bsr_grids`` (``{'layer': blocks in its grid}``): the block-sparse layers of a model
  switched to that form before the freeze, pruned on to the target (``block_sparsity``).
  ``restart_step``: the step from which the moments start over (the switch to block-sparse
  form); the updates warm up again from there over ``sparsity.switch_warmup_epochs``
  (``rewarmed``).
  Returns ``(tx, lr_schedule, lam_schedule)``; ``lr_schedule`` is the step size applied.
  """
  method = config.get("method", "kpd")  # configs saved before methods existed are KPD
  if method not in METHODS:
    raise ValueError(f"unknown method '{method}'; valid: {list(METHODS)}.")
  opt, sp = config.optimizer, config.sparsity
  lr = lr_schedule(opt.schedule, opt.learning_rate, total_steps,
                   int(opt.warmup_epochs * steps_per_epoch))
  if restart_step is not None:
    lr = rewarmed(lr, restart_step, int(sp.switch_warmup_epochs * steps_per_epoch))
  decay_mask = lambda p: jax.tree.map(lambda l: l in ("kernel", "factor"), param_labels(p))
  base = base_optimizer(opt.name, lr, opt.weight_decay, opt.momentum, decay_mask)
  if opt.grad_clip > 0:
    base = optax.chain(optax.clip_by_global_norm(opt.grad_clip), base)
  if method != "kpd":
    tx, lam = baselines.make(config, base, lr, steps_per_epoch)
    return tx, lr, lam
  factor_scale = opt.get("factor_lr_scale", 1.0)  # configs saved before it existed: 1
  if factor_scale != 1.0:
    factors = lambda p: jax.tree.map(lambda l: l == "factor", param_labels(p))
    base = optax.chain(base, optax.masked(optax.scale(factor_scale), factors))
  lam = lam_schedule(sp.lam, int(sp.start_epoch * steps_per_epoch),
                     int(sp.ramp_epochs * steps_per_epoch))
  freeze = int(sp.freeze_epoch * steps_per_epoch) if sp.freeze_epoch >= 0 else -1
  target = sp.target_density if 0 < sp.target_density < 1 else None
  sel = config.selection
  anneal = optax.linear_schedule(0.0, 1.0, max(1, int(sel.anneal_epochs * steps_per_epoch)),
                                 int(sel.start_epoch * steps_per_epoch))
  select = int(sel.select_epoch * steps_per_epoch) if sel.select_epoch >= 0 else -1
  fade = int(sel.get("fade_epochs", 0.0) * steps_per_epoch)  # configs saved before it: 0
  prune_start = (int(sp.start_epoch * steps_per_epoch)
                 if sp.get("prune_schedule", "once") == "cubic" else -1)
  trim = target if sp.get("penalty", "l1") == "trimmed" else None
  tx = optax.chain(base, block_sparsity(
      lam, lr, opt.learning_rate, freeze, target, sp.penalty_after_freeze, anneal,
      sel.strength, select_step=select, fade_steps=fade,
      prune_start=prune_start, prune_every=sp.get("prune_every_steps", 100),
      trim_density=trim, bsr_grids=bsr_grids))
  return tx, lr, lam


def sparsity_state(opt_state) -> BlockSparsityState | None:
  """Finds the ``BlockSparsityState`` inside a chain's state."""
  for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, BlockSparsityState)):
    if isinstance(s, BlockSparsityState):
      return s
  return None
