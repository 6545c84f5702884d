"""The training loop: state, the jitted data-parallel step, evaluation, and a loop that
resumes from its checkpoints, stops cleanly on SIGTERM/SIGINT and on NaN/Inf."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import signal
import threading
import time
from typing import Any, Callable

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from bsparse import data as data_lib
from bsparse import layers as layers_lib
from bsparse import (baselines, checkpoints, finetune, kernels, memory, metric_writers,
                     models, plots, selection, sparsity, validate)
from bsparse.checkpoints import checkpoint_manager, save_config


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  skipped_steps: jax.Array  # steps not applied for a NaN/Inf (nan_policy='skip')


# --------------------------------------------------------------------------- construction


def layer_factory(config: ml_collections.ConfigDict) -> layers_lib.LayerFactory:
  lc = config.layers
  to_shape = lambda v: tuple(tuple(s) for s in v) if v and not isinstance(v[0], int) else tuple(v)
  return layers_lib.LayerFactory(
      kind=lc.kind, block_shape=tuple(lc.block_shape), rank=lc.rank,
      block_shapes={k: to_shape(v) for k, v in lc.block_shapes.items()},
      ranks=dict(lc.ranks), dense_layers=tuple(lc.dense_layers),
      dtype=jnp.dtype(config.compute_dtype),
      impl=None if config.kernels.impl == "auto" else config.kernels.impl,
      dense_from=config.kernels.dense_from)


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                switch: finetune.Switch | None = None) -> nn.Module:
  """The model of ``config``; after a ``switch``, its KPD layers are block-sparse."""
  factory = layer_factory(config)
  if switch is not None:
    factory = dataclasses.replace(factory, kind="bsr", bsr_specs=switch.specs())
  return models.create_model(config.model, factory, num_classes, **config.model_kwargs)


def init_variables(model: nn.Module, image_shape, seed: int):
  """The model's initial variables, built by one compiled computation (op by op, every
  initializer would compile on its own)."""
  x = jnp.zeros((1, *image_shape), jnp.float32)
  return jax.jit(lambda key: model.init(key, x, train=False))(jax.random.key(seed))


def create_state(variables, tx: optax.GradientTransformation) -> TrainState:
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    skipped_steps=jnp.zeros((), jnp.int32))


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over every device of every process."""
  return data_mesh(jax.devices())


def data_mesh(devices) -> jax.sharding.Mesh:
  """Data-parallel mesh; ``Auto`` axes let XLA propagate shardings through the model's
  reshapes (the factored convs fold channels into the batch)."""
  return jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


# --------------------------------------------------------------------------- steps


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def train_step(state: TrainState, batch, *, model: nn.Module, tx, num_classes: int,
               label_smoothing: float = 0.0, skip_nonfinite: bool = False,
               consts: dict | None = None):
  """One optimizer step on a (globally sharded) batch; pure, so it jits and shards.

  ``consts``: variable collections that are not trained (the block indices of a
  block-sparse model, ``finetune.Switch.index``).

  ``metrics['finite']`` says whether the loss and the gradient norm are finite; with
  ``skip_nonfinite`` a step where they are not leaves params, batch statistics and
  optimizer state unchanged and counts itself in ``skipped_steps``.
  """

  def loss_fn(params):
    variables = {"params": params, **(consts or {})}
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
      logits, new_vars = model.apply(variables, batch["image"], train=True,
                                     mutable=["batch_stats"])
      stats = new_vars["batch_stats"]
    else:
      logits, stats = model.apply(variables, batch["image"], train=True), state.batch_stats
    loss = cross_entropy(logits, batch["label"], num_classes, label_smoothing).mean()
    return loss, (logits, stats)

  (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  skipped = state.skipped_steps
  if skip_nonfinite:
    params, stats, opt_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old), (params, stats, opt_state),
        (state.params, state.batch_stats, state.opt_state))
    skipped = skipped + jnp.where(finite, 0, 1).astype(skipped.dtype)
  metrics = {"loss": loss,
             "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
             "grad_norm": grad_norm, "finite": finite}
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                            opt_state=opt_state, skipped_steps=skipped)
  return new_state, metrics


def eval_step(state: TrainState, batch, *, model: nn.Module, num_classes: int,
              consts: dict | None = None):
  """Sums of loss, correct predictions and real examples (``mask`` drops padding)."""
  variables = {"params": state.params, **(consts or {})}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  logits = model.apply(variables, batch["image"], train=False)
  mask = batch["mask"]
  loss = cross_entropy(logits, batch["label"], num_classes)
  correct = jnp.argmax(logits, -1) == batch["label"]
  return {"loss": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask),
          "count": jnp.sum(mask)}


class Steps:
  """The jitted train and eval steps with their shardings over ``mesh``; block-sparse
  kernels in them work on each device's part of the batch (``kernels.split_batch``).

  ``consts`` (the block indices of a block-sparse model) are an operand of both programs,
  not constants compiled into them: ``with_consts`` gives the steps of the same model
  with other indices of the same shapes (a repack within the block budget) without
  building new programs.
  """

  def __init__(self, model, tx, num_classes: int, mesh, label_smoothing: float = 0.0,
               nan_policy: str = "stop", consts: dict | None = None,
               compiler_options: dict | None = None):
    self.mesh = mesh
    self.replicated = NamedSharding(mesh, P())
    self.batch_sharding = NamedSharding(mesh, P("data"))

    def on_rows(step):  # traced with the block-sparse products split by batch rows
      def traced(s, b, c):
        with kernels.split_batch(mesh, "data"):
          return step(s, b, consts=c)
      traced.__name__ = traced.__qualname__ = step.func.__name__  # names the program
      return traced

    self.train_program = jax.jit(
        on_rows(functools.partial(train_step, model=model, tx=tx, num_classes=num_classes,
                                  label_smoothing=label_smoothing,
                                  skip_nonfinite=nan_policy == "skip")),
        in_shardings=(self.replicated, self.batch_sharding, self.replicated),
        out_shardings=(self.replicated, self.replicated), donate_argnums=0,
        compiler_options=compiler_options)
    self.eval_program = jax.jit(
        on_rows(functools.partial(eval_step, model=model, num_classes=num_classes)),
        in_shardings=(self.replicated, self.batch_sharding, self.replicated),
        out_shardings=self.replicated, compiler_options=compiler_options)
    self.consts = jax.device_put(consts or {}, self.replicated)

  def train(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    return self.train_program(state, batch, self.consts)

  def eval(self, state: TrainState, batch) -> dict:
    return self.eval_program(state, batch, self.consts)

  def lower_train(self, state: TrainState, batch):
    """The train program lowered for ``state`` and ``batch`` (``.compile()`` it)."""
    return self.train_program.lower(state, batch, self.consts)

  def with_consts(self, consts: dict) -> "Steps":
    """These steps (the same compiled programs) with ``consts`` of the same shapes."""
    new = copy.copy(self)
    new.consts = jax.device_put(consts, self.replicated)
    return new

  def put_batch(self, local_batch: dict) -> dict:
    """Assembles each process's slice into one global batch sharded over ``data``."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}

  def put_state(self, state: TrainState) -> TrainState:
    return jax.device_put(state, self.replicated)


@dataclasses.dataclass(frozen=True)
class Program:
  """Everything that depends on the model's shape: the model, its optimizer chain with
  the learning-rate and penalty schedules, the compiled steps, and, once the model is
  block-sparse, the switch that made it so."""
  model: nn.Module
  tx: optax.GradientTransformation
  schedules: tuple[Any, Any]  # (lr, lam): step -> value
  steps: Steps
  switch: finetune.Switch | None = None

  @property
  def consts(self) -> dict:
    """The block indices after the switch (``finetune.Switch.index``); empty before it."""
    return self.steps.consts

  def variables(self, state: TrainState) -> dict:
    """The ``variables`` argument of ``self.model.apply`` for ``state``."""
    out = {"params": state.params, **self.consts}
    if state.batch_stats:
      out["batch_stats"] = state.batch_stats
    return out

  def sparsity_scalars(self, state: TrainState) -> dict[str, float]:
    """``sparsity_scalars`` of the state; after the switch, the densities of the blocks
    it keeps."""
    if self.switch is not None:
      return finetune.live_scalars(self.switch, state.opt_state)
    return {k: float(v) for k, v in
            jax.device_get(sparsity_scalars(state.params, state.opt_state)).items()}


def compiler_options(config, mesh) -> dict | None:
  """XLA options for the train and eval steps: ``config.xla_cpu_fusion_emitters=False`` on
  a CPU mesh turns XLA:CPU's fusion emitters off; None (XLA's defaults) otherwise."""
  if config.xla_cpu_fusion_emitters or mesh.devices.flat[0].platform != "cpu":
    return None
  return {"xla_cpu_use_fusion_emitters": False}


def build_program(config, num_classes: int, steps_per_epoch: int, total: int,
                  mesh, switch: finetune.Switch | None = None) -> Program:
  model = build_model(config, num_classes, switch)
  grids = switch.grids() if switch is not None and finetune.switches_early(config) else None
  restart = finetune.boundary_steps(config, steps_per_epoch)[0] if switch is not None else None
  tx, lr_fn, lam_fn = sparsity.make_optimizer(config, steps_per_epoch, total, grids, restart)
  consts = switch.index() if switch is not None else {}
  steps = Steps(model, tx, num_classes, mesh, config.label_smoothing, config.nan_policy,
                consts, compiler_options(config, mesh))
  return Program(model, tx, (lr_fn, lam_fn), steps, switch)


def without_terms(state: TrainState, dead: list[tuple[str, ...]]) -> TrainState:
  """``state`` with the KPD terms ``dead`` removed from params and optimizer state."""
  return state.replace(params=selection.prune_tree(state.params, dead),
                       opt_state=selection.prune_tree(state.opt_state, dead))


def check_opt_state(state: TrainState, tx: optax.GradientTransformation) -> None:
  """Raises RuntimeError unless ``state.opt_state`` has the structure ``tx`` gives
  ``state.params`` (after dropping candidates from both)."""
  expected = jax.tree.structure(jax.eval_shape(tx.init, state.params))
  if jax.tree.structure(state.opt_state) != expected:
    raise RuntimeError("The optimizer state without the dropped candidates does not match "
                       "the optimizer of the selected model; this is a bug in bsparse.")


def evaluate(steps: Steps, state: TrainState, arrays, batch_size: int) -> dict[str, float]:
  """Exact accuracy and mean loss over a whole split."""
  # Wait for the train step that made ``state``: otherwise the eval program's first call is
  # dispatched while it runs, and the two programs' temporaries are allocated together.
  jax.block_until_ready(state)
  totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
  for batch in data_lib.eval_batches(arrays, batch_size=batch_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count()):
    out = steps.eval(state, steps.put_batch(batch))
    for k in totals:
      totals[k] += float(out[k])
  memory.release_freed()  # what the eval program's build (first call) and batches freed
  n = max(totals["count"], 1.0)
  return {"accuracy": totals["correct"] / n, "loss": totals["loss"] / n,
          "examples": int(totals["count"])}


# --------------------------------------------------------------------------- stopping


class NonFiniteError(FloatingPointError):
  """The loss or the gradients became NaN/Inf under ``nan_policy='stop'``."""


class Interrupted(Exception):
  """Training stopped on SIGTERM/SIGINT after saving a checkpoint."""

  def __init__(self, signum: int, step: int, directory: str):
    super().__init__(f"Stopped by {signal.Signals(signum).name}: saved the checkpoint of "
                     f"step {step} in {directory}. Run the same command to resume.")
    self.exit_code = 128 + signum  # the shell's status for a process ended by the signal


class StopRequest:
  """Catches SIGTERM and SIGINT so that the loop can checkpoint and stop after the step
  it is in; a second signal acts as it would without this.

  Multi-process runs leave SIGTERM to JAX's preemption service and stop at its sync
  point, the same step on every process.
  """
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self) -> "StopRequest":
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def __exit__(self, *exc_info):
    self._restore()

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    self._restore()

  def _restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def requested(self, manager, step: int) -> bool:
    """Whether to stop after ``step``; every process must ask at every step."""
    if jax.process_count() > 1 and manager.reached_preemption(step):
      self.signum = signal.SIGTERM
    return self.signum is not None


def _check_finite(window: list[dict], last_step: int, manager) -> None:
  """Raises NonFiniteError for the first step of ``window`` (the metrics of the steps up
  to ``last_step``) whose loss or gradient norm is not finite."""
  for i, m in enumerate(window):
    if bool(m["finite"]):
      continue
    step = last_step - len(window) + 1 + i
    manager.wait_until_finished()
    good = manager.latest_step()
    kept = (f"the last checkpoint, step {good} in {manager.directory}, is from before it"
            if good is not None else "no checkpoint was saved before it")
    raise NonFiniteError(
        f"The loss ({float(m['loss'])}) or the gradient norm ({float(m['grad_norm'])}) is "
        f"not finite at step {step}. Training stopped; {kept}. Running the same command "
        "again resumes there and reaches the same step: add --config.nan_policy=skip to "
        "skip such steps, or start over (--overwrite or a new --workdir) with a lower "
        "learning rate or --config.optimizer.grad_clip.")


# --------------------------------------------------------------------------- main loop


# Jitted: op by op it dispatched dozens of small ops, about 70 ms per logged step for a
# layer with three block-size candidates; compiled, one program per model shape.
@jax.jit
def sparsity_scalars(params, opt_state) -> dict[str, jax.Array]:
  """Block density per KPD term or per masked layer of a baseline, and over all weights;
  for layers with several block-size candidates, each candidate's share of the layer's
  weight norm (``share/<layer>/<term>``)."""
  out = sparsity.density_scalars(params)
  out.update({f"share/{k}": v for k, v in sparsity.candidate_share_scalars(params).items()})
  out.update({f"density/{k}": v for k, v in baselines.block_density(params, opt_state).items()})
  return out


def num_steps(config, num_train: int) -> tuple[int, int]:
  spe = data_lib.steps_per_epoch(num_train, config.batch_size)
  total = config.num_train_steps if config.num_train_steps > 0 else int(config.num_epochs * spe)
  return spe, total


def trim_metrics(workdir: str, step: int) -> None:
  """Drops the rows of ``workdir/metrics.jsonl`` that a run resuming at ``step`` writes
  again: rows after ``step``, the final summary (``test/*``) and a line cut short by a
  kill. TensorBoard event files keep such rows; TensorBoard shows the latest."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return
  kept = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if row["step"] <= step and not any(k.startswith("test/") for k in row):
        kept.append(json.dumps(row) + "\n")
  checkpoints.write_text_atomic(path, "".join(kept))


def _window_scalars(window: list[dict]) -> dict[str, float]:
  """Mean train metrics over the applied steps of the window (all steps if none was)."""
  applied = [m for m in window if bool(m["finite"])] or window
  return {f"train/{k}": float(np.mean([m[k] for m in applied]))
          for k in window[0] if k != "finite"}


def _log_scalars(config, state: TrainState, window: list[dict], seconds: float, done: int,
                 program: Program) -> dict[str, float]:
  lr_fn, lam_fn = program.schedules
  scalars = {**_window_scalars(window),
             "examples_per_sec": len(window) * config.batch_size / seconds,
             "lr": float(lr_fn(done - 1)), "lam": float(lam_fn(done - 1)),
             **program.sparsity_scalars(state), **memory.scalars()}
  if config.nan_policy == "skip":
    scalars["train/skipped_steps"] = int(state.skipped_steps)
  return scalars


# A change of the model at a step boundary: (state, its program) -> (converted state, its
# program).
Transition = Callable[[TrainState, Program], tuple[TrainState, Program]]


def _warn_empty_layers(scalars: dict[str, float], warned: set[str]) -> None:
  """Warns once per KPD layer none of whose blocks is left (``density/<layer>/kron_*``
  all 0): the layer passes only its bias, usually because ``sparsity.lam`` is too large."""
  layers: dict[str, list[float]] = {}
  for key, value in scalars.items():
    if key.startswith("density/") and "/kron_" in key:
      layers.setdefault(key[len("density/"):key.rindex("/kron_")], []).append(value)
  for layer, densities in layers.items():
    if layer not in warned and not any(densities):
      warned.add(layer)
      logging.warning("Layer %s has no block left: it passes only its bias and the model "
                      "cannot learn through it. Lower sparsity.lam or start the penalty "
                      "later (--config.sparsity.start_epoch).", layer)


def _train(config, program: Program, state: TrainState, datasets: data_lib.Datasets,
           manager, writer: metric_writers.MetricWriter, spe: int, total: int,
           transitions: dict[int, Transition] | None = None) -> tuple[TrainState, Program]:
  """Runs the steps after ``state.step`` up to ``total``, logging, evaluating on the
  validation split and checkpointing as configured; returns the final state and the
  program that runs it.

  After a step ``t`` in ``transitions`` it calls ``transitions[t]`` (drop the losing
  block-size candidates, switch to block-sparse form, or repack it; a re-jit unless a
  repack stays within the block budget) and saves a checkpoint of the new model.
  Raises NonFiniteError (``nan_policy='stop'``) before logging, evaluating, selecting or
  saving past a step with a NaN/Inf, and Interrupted after saving on SIGTERM/SIGINT.
  """
  transitions = transitions or {}
  start = int(state.step)
  batches = data_lib.train_batches(
      datasets.train, batch_size=config.batch_size, seed=config.seed, start_step=start,
      augment=config.dataset.augment, process_index=jax.process_index(),
      process_count=jax.process_count())
  eval_every = max(1, int(config.eval_every_epochs * spe))
  window, t0 = [], time.perf_counter()
  show = jax.process_index() == 0 and config.progress_bar
  show_warnings, emptied = jax.process_index() == 0, set()
  with tqdm(total=total, initial=start, disable=not show, unit="step", dynamic_ncols=True,
            mininterval=1.0) as bar, StopRequest() as stop:
    compiled = None  # the train program that has been built
    for done in range(start + 1, total + 1):
      steps = program.steps
      first = steps.train_program is not compiled
      if first:  # a new program: what earlier ones compiled is dead
        memory.forget_programs()
      state, metrics = steps.train(state, steps.put_batch(next(batches)))
      if first:  # that call built it: return the compiler's memory
        compiled = steps.train_program
        memory.release_freed()
      window.append(metrics)
      last, stopping = done == total, stop.requested(manager, done)
      changing = done in transitions
      log = done % config.log_every_steps == 0 or last
      validate_now = datasets.val is not None and (done % eval_every == 0 or last)
      save = done % config.checkpoint_every_steps == 0 or last or stopping or changing
      if config.nan_policy == "stop" and (log or validate_now or save):
        _check_finite(window, done, manager)
      if changing:
        state, program = transitions[done](state, program)
        steps = program.steps
      if log:
        scalars = _log_scalars(config, state, window, time.perf_counter() - t0, done,
                               program)
        writer.write(done, scalars)
        bar.set_postfix(loss=f"{scalars['train/loss']:.3f}",
                        acc=f"{scalars['train/accuracy']:.3f}",
                        dens=f"{scalars.get('density/weights', 1.0):.2f}",
                        ex_s=f"{scalars['examples_per_sec']:.0f}")
        window, t0 = [], time.perf_counter()
        if show_warnings:
          _warn_empty_layers(scalars, emptied)
      if validate_now:
        val = evaluate(steps, state, datasets.val, config.eval_batch_size)
        writer.write(done, {"val/accuracy": val["accuracy"], "val/loss": val["loss"]})
        if show:
          bar.write(f"step {done}: val accuracy {val['accuracy']:.4f}")
      if save:
        checkpoints.save(manager, done, state)
      bar.update(1)
      if stopping:
        manager.wait_until_finished()
        raise Interrupted(stop.signum, done, str(manager.directory))
  return state, program


def _selector(config, workdir: str, build: Callable[..., Program]) -> Transition:
  """Drops the losing candidates after the selection step and records the choice in
  ``workdir`` (before the checkpoint without them is saved)."""

  def select(state: TrainState, _: Program) -> tuple[TrainState, Program]:
    memory.forget_programs()  # the old program is done: the new one starts from a trimmed heap
    state = without_terms(state, selection.dead_terms(state.opt_state))
    choice = selection.choice_from_params(config, state.params, int(state.step))
    program = build(selection.with_choice(config, choice))
    check_opt_state(state, program.tx)
    if jax.process_index() == 0:
      selection.save_choice(workdir, choice)
      tqdm.write(f"step {choice.step}: block sizes chosen: " + ", ".join(
          f"{k} {m}x{n}" for k, (m, n) in sorted(choice.block_shapes.items())))
      dead = [k for k, v in sparsity.block_density(state.params).items()
              if k.split("/")[-2] in choice.block_shapes and float(v) == 0]
      if dead:
        logging.warning("Every block-size candidate of %s collapsed before the selection: "
                        "the layer now passes only its bias. Lower sparsity.lam or start "
                        "the penalty later.", ", ".join(dead))
    checkpoints.sync("bsparse_selection")
    return state, program

  return select


def _switcher(config, workdir: str, build: Callable[..., Program]) -> Transition:
  """Converts the model to block-sparse form after the freeze step, or the early switch
  (``bsparse.finetune``), and records the switch in ``workdir`` (before the checkpoint of
  the new model is saved)."""

  def switch(state: TrainState, _: Program) -> tuple[TrainState, Program]:
    memory.forget_programs()
    params = jax.device_get(state.params)
    record, new_params = finetune.switch_from_params(params, int(state.step))
    program = build(config, record)
    opt_state = finetune.continue_schedules(program.tx.init(new_params), record.step)
    state = program.steps.put_state(state.replace(params=new_params, opt_state=opt_state))
    if jax.process_index() == 0:
      finetune.record_switch(workdir, record)
      if config.plots:  # drawn when the run ends: a figure now would stay in its memory
        plots.save_block_norms(params, os.path.join(workdir, plots.SWITCH_NORMS))
      tqdm.write(f"step {record.step}: fine-tuning the kept blocks in block-sparse form ("
                 f"{sum(v['nnz'] for v in record.layers.values())} blocks in "
                 f"{len(record.layers)} layers)")
    checkpoints.sync("bsparse_finetune")
    return state, program

  return switch


def _repacker(config, workdir: str, build: Callable[..., Program], last: bool) -> Transition:
  """In a run that switched early, keeps only the blocks its pruning left so far
  (``finetune.repack``) and adds that switch to the record in ``workdir``. Before the
  freeze the kept blocks move to the front of the block budget and the compiled steps go
  on with the new indices, unless the budget is worth shrinking (``finetune.shrinks``);
  at the freeze (``last``: the pruning is done) the model shrinks to exactly the kept
  blocks. Each shrink builds new steps."""

  def repack(state: TrainState, program: Program) -> tuple[TrainState, Program]:
    opt_state = jax.device_get(state.opt_state)
    shrink = last or finetune.shrinks(program.switch, opt_state)
    if shrink:
      memory.forget_programs()
    record, params, opt_state = finetune.repack(
        program.switch, jax.device_get(state.params), opt_state, int(state.step),
        keep_budget=not shrink)
    if shrink:
      repacked = build(config, record)
    else:
      repacked = dataclasses.replace(program, switch=record,
                                     steps=program.steps.with_consts(record.index()))
    state = repacked.steps.put_state(state.replace(params=params, opt_state=opt_state))
    memory.release_freed()  # the host copies of the state
    if jax.process_index() == 0:
      finetune.record_switch(workdir, record)
      kept = sum(v["nnz"] for v in record.layers.values())
      tqdm.write(f"step {record.step}: the pruning is done; the model keeps {kept} blocks"
                 if last else f"step {record.step}: repacked to the {kept} blocks kept so far")
    checkpoints.sync("bsparse_repack")
    return state, repacked

  return repack


def _required_record(record, boundary: int | None, manager, path: str, holds: str):
  """``record`` (a file of ``workdir`` read by the caller, or None / empty); raises
  CheckpointError when it is missing but checkpoints from step ``boundary`` on, which
  ``holds`` a model only the record describes, exist."""
  if not record and boundary is not None and any(
      s >= boundary for s in manager.all_steps()):
    raise checkpoints.CheckpointError(
        f"The checkpoints in {manager.directory} from step {boundary} on hold {holds}, but "
        f"{path}, which records it, is missing. Put it back, or start over with "
        "--overwrite or a new --workdir.")
  return record


def _checked_switches(config, workdir: str, manager, spe: int) -> list[finetune.Switch]:
  """The recorded switches to (and within) block-sparse form of ``workdir``, oldest
  first."""
  switches = finetune.load_switches(workdir)
  path = os.path.join(workdir, finetune.RECORD_FILE)
  for i, boundary in enumerate(finetune.boundary_steps(config, spe)):
    _required_record(switches[i:i + 1], boundary, manager, path, "the block-sparse model")
  return switches


def _checked_choice(config, workdir: str, manager, spe: int) -> selection.Choice | None:
  """The recorded block-size choice of ``workdir``, or None."""
  return _required_record(selection.load_choice(workdir),
                          selection.boundary_step(config, spe), manager,
                          os.path.join(workdir, selection.CHOICE_FILE),
                          "the model after the block-size selection")


def restore_program(config, workdir: str, manager, num_classes: int, image_shape,
                    spe: int, total: int, set_aside: bool = True
                    ) -> tuple[TrainState, Program, Callable[[Any], Program]]:
  """The newest intact checkpoint of ``workdir`` (or the initial state) and the program
  of the model it holds: the model with every block-size candidate; after the selection,
  with the winners recorded in ``selection.json``; after a switch to block-sparse form,
  the block-sparse model recorded in ``bsr_finetune.json`` (the latest switch before the
  checkpoint). Also returns the builder of programs (``(config, switch=None) ->
  Program``)."""
  mesh = make_mesh()
  build = lambda c, switch=None: build_program(c, num_classes, spe, total, mesh, switch)
  program = build(config)
  init = program.steps.put_state(
      create_state(init_variables(program.model, image_shape, config.seed), program.tx))
  choice = _checked_choice(config, workdir, manager, spe)
  switches = _checked_switches(config, workdir, manager, spe)
  sparse = {}  # the block-sparse programs by switch step, built when a checkpoint needs one

  def sparse_program(step: int) -> Program | None:
    """The program of the latest switch at or before ``step``; None before the first."""
    switch = next((s for s in reversed(switches) if step >= s.step), None)
    if switch is not None and switch.step not in sparse:
      sparse[switch.step] = build(config, switch)
    return sparse.get(switch.step) if switch is not None else None

  def state_at(step: int) -> TrainState:
    if (p := sparse_program(step)) is not None:
      return p.steps.put_state(
          create_state(init_variables(p.model, image_shape, config.seed), p.tx))
    if choice is None or step < choice.step:
      return init
    return without_terms(init, selection.losers(config, choice, init.params))

  state = checkpoints.restore_latest(manager, init, set_aside, state_at)
  if (sparse := sparse_program(int(state.step))) is not None:
    program = sparse
  elif choice is not None and int(state.step) >= choice.step:
    program = build(selection.with_choice(config, choice))
  return state, program, build


def read_program(config, workdir: str, datasets: data_lib.Datasets
                 ) -> tuple[TrainState, Program, Callable[[Any], Program]]:
  """``restore_program`` for reading a run (measuring, timing): the checkpoints are
  opened read-only, nothing is set aside, and the manager is closed again."""
  spe, total = num_steps(config, len(datasets.train["label"]))
  manager = checkpoint_manager(workdir, config, read_only=True)
  try:
    return restore_program(config, workdir, manager, datasets.num_classes,
                           datasets.image_shape, spe, total, set_aside=False)
  finally:
    manager.close()


def _transitions(config, workdir: str, spe: int, build) -> dict[int, Transition]:
  """The model changes of the run by step: the block-size selection, then the switch to
  block-sparse form (both after one step when they coincide), and after an early switch
  the repacks until the freeze."""
  out: dict[int, Transition] = {}
  select_at = selection.boundary_step(config, spe)
  if select_at is not None:
    out[select_at] = _selector(config, workdir, build)
  boundaries = finetune.boundary_steps(config, spe)
  if boundaries:
    switch_at = boundaries[0]
    switch, before = _switcher(config, workdir, build), out.get(switch_at)
    out[switch_at] = switch if before is None else (lambda s, p: switch(*before(s, p)))
  for boundary in boundaries[1:]:
    out[boundary] = _repacker(config, workdir, build, last=boundary == boundaries[-1])
  return out


def configure_host(config: ml_collections.ConfigDict) -> None:
  """Applies the config's process-wide settings: glibc's malloc (``config.host_malloc``,
  bsparse/memory.py), after checking them. They take full effect before JAX starts its
  threads, so train.py and eval.py call this first; ``train_and_evaluate`` applies them
  again for runs started from Python, where threads that already allocated keep their
  arenas."""
  validate.validate_host_config(config)
  memory.configure_malloc(**config.host_malloc)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       overwrite: bool = False) -> dict[str, Any]:
  """Trains ``config`` in ``workdir``, resuming from its latest intact checkpoint;
  returns the final metrics (also written to ``workdir/summary.json``).

  Before loading anything, raises validate.ConfigError for a config that cannot run and
  checkpoints.WorkdirConflictError for a workdir whose checkpoints belong to another
  config; ``overwrite`` moves an existing workdir aside instead. During training, raises
  NonFiniteError or Interrupted (see ``_train``).
  """
  validate.validate_config(config, build_model)  # host_malloc included
  memory.configure_malloc(**config.host_malloc)
  checkpoints.prepare_workdir(workdir, config, overwrite)
  is_main = jax.process_index() == 0
  datasets = data_lib.get_datasets(config)
  spe, total = num_steps(config, len(datasets.train["label"]))
  save_config(workdir, config)
  with contextlib.ExitStack() as stack:
    manager = checkpoint_manager(workdir, config)
    stack.callback(manager.close)
    # Restored onto every process's devices.
    state, program, build = restore_program(config, workdir, manager, datasets.num_classes,
                                            datasets.image_shape, spe, total)
    start = int(state.step)
    if is_main:
      trim_metrics(workdir, start)
      if start:
        print(f"Resuming from the checkpoint at step {start} in {workdir}.")
    writer = metric_writers.MetricWriter(workdir, enabled=is_main)
    stack.callback(writer.close)
    state, program = _train(config, program, state, datasets, manager, writer, spe, total,
                            _transitions(config, workdir, spe, build))
    manager.wait_until_finished()

    test = evaluate(program.steps, state, datasets.test, config.eval_batch_size)
    summary = {"step": int(state.step), "test/accuracy": test["accuracy"],
               "test/loss": test["loss"], "test/examples": test["examples"],
               **program.sparsity_scalars(state), **memory.scalars()}
    if config.nan_policy == "skip":
      summary["train/skipped_steps"] = int(state.skipped_steps)
    summary = {k: float(v) if not isinstance(v, int) else v for k, v in summary.items()}
    writer.write(int(state.step), summary)
  if is_main:
    checkpoints.write_text_atomic(os.path.join(workdir, "summary.json"),
                                  json.dumps(summary, indent=2))
    if config.plots:
      plots.plot_run(workdir, state.params)
  return summary
