"""The training loop: state, the jitted data-parallel step, evaluation, checkpoints."""
from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from bsparse import data as data_lib
from bsparse import layers as layers_lib
from bsparse import metric_writers, models, plots, report, sparsity


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


# --------------------------------------------------------------------------- construction


def layer_factory(config: ml_collections.ConfigDict) -> layers_lib.LayerFactory:
  lc = config.layers
  to_shape = lambda v: tuple(tuple(s) for s in v) if v and not isinstance(v[0], int) else tuple(v)
  return layers_lib.LayerFactory(
      kind=lc.kind, block_shape=tuple(lc.block_shape), rank=lc.rank,
      block_shapes={k: to_shape(v) for k, v in lc.block_shapes.items()},
      ranks=dict(lc.ranks), dense_layers=tuple(lc.dense_layers),
      dtype=jnp.dtype(config.compute_dtype))


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  return models.create_model(config.model, layer_factory(config), num_classes,
                             **config.model_kwargs)


def init_variables(model: nn.Module, image_shape, seed: int):
  x = jnp.zeros((1, *image_shape), jnp.float32)
  return model.init(jax.random.key(seed), x, train=False)


def create_state(variables, tx: optax.GradientTransformation) -> TrainState:
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))


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
               label_smoothing: float = 0.0):
  """One optimizer step on a (globally sharded) batch; pure, so it jits and shards."""

  def loss_fn(params):
    variables = {"params": params}
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
  metrics = {"loss": loss,
             "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
             "grad_norm": optax.global_norm(grads)}
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                            opt_state=opt_state)
  return new_state, metrics


def eval_step(state: TrainState, batch, *, model: nn.Module, num_classes: int):
  """Sums of loss, correct predictions and real examples (``mask`` drops padding)."""
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  logits = model.apply(variables, batch["image"], train=False)
  mask = batch["mask"]
  loss = cross_entropy(logits, batch["label"], num_classes)
  correct = jnp.argmax(logits, -1) == batch["label"]
  return {"loss": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask),
          "count": jnp.sum(mask)}


class Steps:
  """The jitted train and eval steps with their shardings over ``mesh``."""

  def __init__(self, model, tx, num_classes: int, mesh, label_smoothing: float = 0.0):
    self.mesh = mesh
    self.replicated = NamedSharding(mesh, P())
    self.batch_sharding = NamedSharding(mesh, P("data"))
    self.train = jax.jit(
        lambda s, b: train_step(s, b, model=model, tx=tx, num_classes=num_classes,
                                label_smoothing=label_smoothing),
        in_shardings=(self.replicated, self.batch_sharding),
        out_shardings=(self.replicated, self.replicated), donate_argnums=0)
    self.eval = jax.jit(
        lambda s, b: eval_step(s, b, model=model, num_classes=num_classes),
        in_shardings=(self.replicated, self.batch_sharding), out_shardings=self.replicated)

  def put_batch(self, local_batch: dict) -> dict:
    """Assembles each process's slice into one global batch sharded over ``data``."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}

  def put_state(self, state: TrainState) -> TrainState:
    return jax.device_put(state, self.replicated)


def evaluate(steps: Steps, state: TrainState, arrays, batch_size: int) -> dict[str, float]:
  """Exact accuracy and mean loss over a whole split."""
  totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
  for batch in data_lib.eval_batches(arrays, batch_size=batch_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count()):
    out = steps.eval(state, steps.put_batch(batch))
    for k in totals:
      totals[k] += float(out[k])
  n = max(totals["count"], 1.0)
  return {"accuracy": totals["correct"] / n, "loss": totals["loss"] / n,
          "examples": int(totals["count"])}


# --------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def restore_latest(manager: ocp.CheckpointManager, state: TrainState) -> TrainState:
  step = manager.latest_step()
  if step is None:
    return state
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def save_config(workdir: str, config) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is '{workdir}' the --workdir of a train.py run?")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


# --------------------------------------------------------------------------- main loop


def sparsity_scalars(params) -> dict[str, float]:
  out = {f"density/{k}": v for k, v in sparsity.block_density(params).items()}
  if out:
    out["density/weights"] = sparsity.weight_density(params)
  return out


def num_steps(config, num_train: int) -> tuple[int, int]:
  spe = data_lib.steps_per_epoch(num_train, config.batch_size)
  total = config.num_train_steps if config.num_train_steps > 0 else int(config.num_epochs * spe)
  return spe, total


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint; returns the
  final metrics (also written to ``workdir/summary.json``)."""
  is_main = jax.process_index() == 0
  datasets = data_lib.get_datasets(config)
  model = build_model(config, datasets.num_classes)
  spe, total = num_steps(config, len(datasets.train["label"]))
  tx, lr_fn, lam_fn = sparsity.make_optimizer(config, spe, total)
  state = create_state(init_variables(model, datasets.image_shape, config.seed), tx)

  save_config(workdir, config)
  manager = checkpoint_manager(workdir, config)
  state = restore_latest(manager, state)
  start = int(state.step)
  if start and is_main:
    print(f"Resuming from the checkpoint at step {start} in {workdir}.")

  mesh = make_mesh()
  steps = Steps(model, tx, datasets.num_classes, mesh, config.label_smoothing)
  state = steps.put_state(state)
  writer = metric_writers.MetricWriter(workdir, enabled=is_main)
  batches = data_lib.train_batches(
      datasets.train, batch_size=config.batch_size, seed=config.seed, start_step=start,
      augment=config.dataset.augment, process_index=jax.process_index(),
      process_count=jax.process_count())

  bar = tqdm(total=total, initial=start, disable=not (is_main and config.progress_bar),
             unit="step", dynamic_ncols=True, mininterval=1.0)
  acc, t0, seen = [], time.perf_counter(), 0
  eval_every = max(1, int(config.eval_every_epochs * spe))
  for step in range(start, total):
    state, metrics = steps.train(state, steps.put_batch(next(batches)))
    acc.append(metrics)
    seen += config.batch_size
    done = step + 1
    if done % config.log_every_steps == 0 or done == total:
      train_m = {f"train/{k}": float(np.mean([m[k] for m in acc])) for k in acc[0]}
      rate = seen / (time.perf_counter() - t0)
      scalars = {**train_m, "examples_per_sec": rate, "lr": float(lr_fn(step)),
                 "lam": float(lam_fn(step)), **sparsity_scalars(state.params)}
      writer.write(done, scalars)
      bar.set_postfix(loss=f"{train_m['train/loss']:.3f}", acc=f"{train_m['train/accuracy']:.3f}",
                      dens=f"{scalars.get('density/weights', 1.0):.2f}", ex_s=f"{rate:.0f}")
      acc, t0, seen = [], time.perf_counter(), 0
    if done % eval_every == 0 or done == total:
      if datasets.val is not None:
        val = evaluate(steps, state, datasets.val, config.eval_batch_size)
        writer.write(done, {"val/accuracy": val["accuracy"], "val/loss": val["loss"]})
        bar.write(f"step {done}: val accuracy {val['accuracy']:.4f}")
    if done % config.checkpoint_every_steps == 0 or done == total:
      manager.save(done, args=ocp.args.StandardSave(state))
    bar.update(1)
  bar.close()
  manager.wait_until_finished()

  test = evaluate(steps, state, datasets.test, config.eval_batch_size)
  summary = {"step": int(state.step), "test/accuracy": test["accuracy"],
             "test/loss": test["loss"], "test/examples": test["examples"],
             **sparsity_scalars(state.params)}
  summary = {k: float(v) if not isinstance(v, int) else v for k, v in summary.items()}
  writer.write(int(state.step), summary)
  writer.close()
  if is_main:
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
    if config.plots:
      plots.plot_run(workdir, state.params)
  manager.close()
  return summary
