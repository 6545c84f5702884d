"""Checks a config before any data is loaded or anything is compiled.

``validate_config`` raises one ``ConfigError`` listing every problem it finds, each as
``config.<field> = <value>: <why>, valid: <choices>``: unknown keys (typos in a config
file), unknown names (model, dataset, optimizer, ...), numbers out of range, per-layer
settings keyed by a name that is no layer of the model, and block shapes that do not
divide a layer's weight. The model is only traced abstractly (``jax.eval_shape``).
"""
from __future__ import annotations

import dataclasses
import difflib
import numbers
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from bsparse import data as data_lib
from bsparse import finetune, kron, memory, models, sparsity
from bsparse import layers as layers_lib
from configs import base

SCHEDULES = ("cosine", "constant")
KERNEL_IMPLS = ("auto", "xla", "cpu", "pallas_tpu", "pallas_gpu")
NAN_POLICIES = ("stop", "skip")
PRUNE_SCHEDULES = ("once", "cubic")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# Sections whose keys are chosen by the user (layer names, model attributes).
FREE_FORM = ("model_kwargs", "layers.block_shapes", "layers.ranks")

_MISSING = object()
BuildModel = Callable[[ml_collections.ConfigDict, int], nn.Module]


class ConfigError(ValueError):
  """A config that cannot run; the message names each bad field, its value and the
  valid choices."""


def validate_config(config: ml_collections.ConfigDict, build_model: BuildModel,
                    training: bool = True) -> None:
  """Raises ConfigError if ``config`` cannot run.

  ``build_model(config, num_classes)`` builds the run's model (``train_lib.build_model``);
  ``training=False`` skips the checks that only matter for training (the training batch
  size against the devices).
  """
  problems = [*_unknown_keys(config), *_choice_problems(config),
              *_range_problems(config, training)]
  if not problems:
    problems = _model_problems(config, build_model)
  if problems:
    raise ConfigError("Invalid config:\n  " + "\n  ".join(problems))


def _get(config, field: str):
  node = config
  for part in field.split("."):
    if not hasattr(node, "keys") or part not in node:
      return _MISSING
    node = node[part]
  return node


def _problem(field: str, value, why: str) -> str:
  if isinstance(value, (list, tuple)):
    value = tuple(value)
  return f"config.{field} = {value!r}: {why}"


# --------------------------------------------------------------------------- keys


def _flat_keys(node, prefix: str = "") -> list[str]:
  keys = []
  for key, value in node.items():
    field = f"{prefix}{key}"
    keys.append(field)
    if hasattr(value, "keys") and field not in FREE_FORM:
      keys += _flat_keys(value, field + ".")
  return keys


def _unknown_keys(config) -> list[str]:
  """Keys that no config has (a typo in a config file or a hand-edited config.json)."""
  schema = base.get_config()
  known = set(_flat_keys(schema))
  problems = []
  for field in _flat_keys(config):
    if field in known:
      continue
    parent, _, key = field.rpartition(".")
    siblings = list((_get(schema, parent) if parent else schema).keys())
    close = difflib.get_close_matches(key, siblings, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    where = f"config.{parent}" if parent else "config"
    problems.append(f"config.{field}: unknown key; {hint}valid keys of {where}: "
                    f"{', '.join(siblings)}.")
  return problems


# --------------------------------------------------------------------------- values


def _choices() -> dict[str, tuple[str, ...]]:
  return {
      "model": tuple(sorted(models.MODELS)),
      "method": sparsity.METHODS,
      "dataset.name": data_lib.DATASETS,
      "dataset.source": data_lib.SOURCES,
      "optimizer.name": sparsity.OPTIMIZERS,
      "optimizer.schedule": SCHEDULES,
      "layers.kind": layers_lib.LayerFactory.KINDS,
      "kernels.impl": KERNEL_IMPLS,
      "compute_dtype": COMPUTE_DTYPES,
      "nan_policy": NAN_POLICIES,
      "sparsity.finetune": finetune.FORMS,
      "sparsity.prune_schedule": PRUNE_SCHEDULES,
      "sparsity.penalty": sparsity.PENALTIES,
  }


def _choice_problems(config) -> list[str]:
  problems = []
  for field, choices in _choices().items():
    value = _get(config, field)
    if value is not _MISSING and value not in choices:
      problems.append(_problem(field, value, f"unknown name; valid: {', '.join(choices)}."))
  method = _method(config)
  if method in sparsity.METHODS and method != "kpd" and config.layers.kind != "dense":
    problems.append(_problem("layers.kind", config.layers.kind,
                             f"method {method!r} trains dense layers; valid: dense."))
  return (problems + _finetune_problems(config) + _prune_problems(config)
          + _penalty_problems(config) + _fade_problems(config))


def _fade_problems(config) -> list[str]:
  """The block-size choice is made ``selection.fade_epochs`` before ``select_epoch``."""
  sel = config.selection
  fade = sel.get("fade_epochs", 0.0)
  if (_is_number(fade, False) and _is_number(sel.select_epoch, False)
      and 0 <= sel.select_epoch < fade):
    return [_problem("selection.fade_epochs", fade, "the losing block sizes fade out over "
                     f"the epochs before selection.select_epoch ({sel.select_epoch}); "
                     "valid: 0 <= fade_epochs <= select_epoch.")]
  return []


def _penalty_problems(config) -> list[str]:
  """The trimmed penalty spares each layer's target budget, so it needs a target."""
  sp = config.sparsity
  if sp.get("penalty", "l1") != "trimmed" or _method(config) != "kpd":
    return []
  target = sp.target_density
  if not _is_number(target, False) or 0 < target < 1:
    return []
  return [_problem("sparsity.penalty", "trimmed", "spares each layer's target_density * "
                   f"blocks largest blocks, but sparsity.target_density is {target}: set "
                   "it in (0, 1), or penalty='l1'.")]


def _prune_problems(config) -> list[str]:
  """Gradual pruning runs from the penalty's start to the freeze."""
  sp = config.sparsity
  if sp.get("prune_schedule", "once") != "cubic" or not all(
      _is_number(v, False) for v in (sp.start_epoch, sp.freeze_epoch)):
    return []
  if sp.freeze_epoch <= sp.start_epoch:
    return [_problem("sparsity.prune_schedule", "cubic", "prunes from sparsity.start_epoch "
                     f"({sp.start_epoch}) to sparsity.freeze_epoch ({sp.freeze_epoch}): set "
                     "freeze_epoch > start_epoch, or prune_schedule='once'.")]
  return []


def _finetune_problems(config) -> list[str]:
  """``sparsity.finetune='bsr'`` converts a KPD model with one block shape per layer at
  the mask freeze, or at ``sparsity.switch_epoch`` while cubic pruning goes on."""
  sp = config.sparsity
  early = sp.get("switch_epoch", -1.0)
  switches_early = _is_number(early, False) and early >= 0
  if sp.get("finetune", "kpd") != "bsr":
    if switches_early:
      return [_problem("sparsity.switch_epoch", early, "is the epoch of the switch to "
                       "block-sparse form: it needs sparsity.finetune='bsr' (or set it to -1).")]
    return []
  field, value = "sparsity.finetune", "bsr"
  if _method(config) != "kpd" or config.layers.kind != "kpd":
    return [_problem(field, value, "fine-tunes the blocks of KPD layers; it needs "
                     "method='kpd' and layers.kind='kpd' (or use sparsity.finetune='kpd').")]
  if not _is_number(sp.freeze_epoch, False) or sp.freeze_epoch < 0:
    return [_problem(field, value, "switches at the mask freeze: set "
                     "sparsity.freeze_epoch >= 0.")]
  if switches_early and not (
      sp.get("prune_schedule", "once") == "cubic" and sp.start_epoch <= early < sp.freeze_epoch):
    return [_problem("sparsity.switch_epoch", early, "switches before the freeze and prunes "
                     "the free blocks on the cubic schedule: it needs prune_schedule='cubic' "
                     f"and start_epoch ({sp.start_epoch}) <= switch_epoch < freeze_epoch "
                     f"({sp.freeze_epoch}); or set it to -1 to switch at the freeze.")]
  switch_at = early if switches_early else sp.freeze_epoch
  several = any(v and not _is_number(v[0], True) and len(v) > 1
                for v in config.layers.block_shapes.values())
  select = config.selection.select_epoch
  if several and not 0 <= select <= switch_at:
    return [_problem("selection.select_epoch", select, "a layer with several block-size "
                     "candidates must select one before the switch to block-sparse form: "
                     f"valid: 0 <= select_epoch <= {switch_at}.")]
  return []


def _method(config) -> str:
  """``config.method``; configs saved before methods existed are KPD."""
  return config.get("method", "kpd")


_AT_LEAST_0 = (lambda v: v >= 0, ">= 0")
_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_POSITIVE = (lambda v: v > 0, "> 0")
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": _AT_LEAST_0,
    "batch_size": _AT_LEAST_1,
    "eval_batch_size": _AT_LEAST_1,
    "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optimizer.learning_rate": _POSITIVE,
    "optimizer.warmup_epochs": _AT_LEAST_0,
    "optimizer.weight_decay": _AT_LEAST_0,
    "optimizer.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optimizer.grad_clip": _AT_LEAST_0,
    "optimizer.factor_lr_scale": _POSITIVE,
    "layers.rank": _AT_LEAST_1,
    "sparsity.lam": _AT_LEAST_0,
    "sparsity.start_epoch": _AT_LEAST_0,
    "sparsity.ramp_epochs": _AT_LEAST_0,
    "sparsity.target_density": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "baseline.target_density": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "baseline.lam": _AT_LEAST_0,
    "baseline.update_every_steps": _AT_LEAST_1,
    "sparsity.prune_every_steps": _AT_LEAST_1,
    "sparsity.switch_warmup_epochs": _AT_LEAST_0,
    "sparsity.repack_every_steps": _AT_LEAST_0,
    "selection.fade_epochs": _AT_LEAST_0,
    "baseline.drop_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "dataset.val_size": _AT_LEAST_0,
    "kernels.dense_from": (lambda v: v >= 0, ">= 0 (above 1: always block-sparse)"),
    "log_every_steps": _AT_LEAST_1,
    "eval_every_epochs": _POSITIVE,
    "checkpoint_every_steps": _AT_LEAST_1,
    "keep_checkpoints": _AT_LEAST_1,
    "host_malloc.arena_max": _AT_LEAST_0,
    "host_malloc.mmap_threshold_kb": (
        lambda v: -1 <= v <= memory.MAX_MMAP_THRESHOLD_KB,
        f"in [-1, {memory.MAX_MMAP_THRESHOLD_KB}] (-1: glibc's adaptive threshold)"),
}
_INTEGERS = ("seed", "batch_size", "eval_batch_size", "layers.rank", "dataset.val_size",
             "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
             "num_train_steps", "baseline.update_every_steps", "sparsity.prune_every_steps",
             "sparsity.repack_every_steps", "host_malloc.arena_max",
             "host_malloc.mmap_threshold_kb")


def _is_number(value, integer: bool) -> bool:
  kind = numbers.Integral if integer else numbers.Real
  return isinstance(value, kind) and not isinstance(value, bool)


def _number_problems(config, ranges) -> list[str]:
  problems = []
  for field, (ok, want) in ranges.items():
    value = _get(config, field)
    integer = field in _INTEGERS
    if value is _MISSING:
      continue
    if not _is_number(value, integer):
      problems.append(_problem(field, value, f"must be {'an integer' if integer else 'a number'}."))
    elif not ok(value):
      problems.append(_problem(field, value, f"must be {want}."))
  return problems


def validate_host_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError if the config's process-wide settings (``host_malloc``) are bad.
  Checks nothing else and touches no device, so it can run before JAX starts."""
  problems = _number_problems(
      config, {f: r for f, r in _RANGES.items() if f.startswith("host_malloc.")})
  if problems:
    raise ConfigError("Invalid config:\n  " + "\n  ".join(problems))


def _range_problems(config, training: bool) -> list[str]:
  ranges = dict(_RANGES)
  if _get(config, "num_train_steps") is not _MISSING and config.num_train_steps <= 0:
    ranges["num_epochs"] = _POSITIVE  # the run length comes from num_epochs
  problems = _number_problems(config, ranges)
  if not problems:
    problems += _device_problems(config, training)
  problems += _block_shape_problems(config)
  return problems


def _device_problems(config, training: bool) -> list[str]:
  """Global batches are split evenly over every device."""
  devices = jax.device_count()
  fields = ("batch_size", "eval_batch_size") if training else ("eval_batch_size",)
  return [_problem(f, config[f], f"must be divisible by the {devices} devices "
                   f"(e.g. {devices * max(1, round(config[f] / devices))}).")
          for f in fields if config[f] % devices]


def _is_shape(value) -> bool:
  return (isinstance(value, (list, tuple)) and len(value) == 2
          and all(_is_number(v, True) and v >= 1 for v in value))


def _block_shape_problems(config) -> list[str]:
  """Block shapes are (rows, cols) pairs of positive integers (or lists of such pairs,
  per layer); per-layer ranks are integers >= 1."""
  lc = config.layers
  problems = []
  if not _is_shape(lc.block_shape):
    problems.append(_problem("layers.block_shape", lc.block_shape,
                             "must be (rows, cols) with integers >= 1."))
  for name, value in lc.block_shapes.items():
    shapes = value if value and not _is_number(value[0], True) else [value]
    if not all(_is_shape(s) for s in shapes):
      problems.append(_problem(f"layers.block_shapes.{name}", value,
                               "must be (rows, cols) with integers >= 1, or a list of them."))
  for name, rank in lc.ranks.items():
    if not (_is_number(rank, True) and rank >= 1):
      problems.append(_problem(f"layers.ranks.{name}", rank, "must be an integer >= 1."))
  return problems


# --------------------------------------------------------------------------- model


def _model_problems(config, build_model: BuildModel) -> list[str]:
  """Traces the model abstractly: its attributes, its layer names, its layer shapes."""
  spec = data_lib._spec(config.dataset.name)
  input_shape = (1, *spec.image_shape)
  try:
    model = build_model(config, spec.num_classes)
    dense = model.clone(layers=dataclasses.replace(model.layers, kind="dense"))
    names = models.weight_layer_names(dense, input_shape)
  except (TypeError, ValueError) as e:
    return [_problem("model_kwargs", config.model_kwargs.to_dict(), str(e))]
  problems = _layer_name_problems(config, names)
  if not problems:
    problems = _divisibility_problems(config, model.layers, _weight_shapes(dense, input_shape))
  if not problems:
    problems = _build_problems(model, input_shape)
  return problems


def _layer_name_problems(config, names: tuple[str, ...]) -> list[str]:
  lc = config.layers
  valid = f"the weight layers of {config.model!r} are: {', '.join(names)}."
  problems = [_problem(f"layers.{field}.{key}", lc[field][key], f"no layer named {key!r}; {valid}")
              for field in ("block_shapes", "ranks") for key in lc[field] if key not in names]
  unknown = [key for key in lc.dense_layers if key not in names]
  if unknown:
    problems.append(_problem("layers.dense_layers", lc.dense_layers,
                             f"no layer named {', '.join(map(repr, unknown))}; {valid}"))
  return problems


def _init_shapes(model, input_shape):
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                        jax.ShapeDtypeStruct(input_shape, jnp.float32))


def _weight_shapes(dense_model, input_shape) -> dict[str, tuple[int, int]]:
  """``(inputs, outputs)`` of every weight layer (a ``kernel``) of a dense model."""
  params = _init_shapes(dense_model, input_shape)["params"]
  return {name: tuple(node["kernel"].shape[-2:]) for name, node in params.items()
          if hasattr(node, "keys") and "kernel" in node}


def _divisibility_problems(config, factory: layers_lib.LayerFactory,
                           shapes: dict[str, tuple[int, int]]) -> list[str]:
  """Every candidate block shape divides the weight of every layer that has blocks: the
  KPD layers, or the masked dense layers of a baseline method."""
  blocked = config.layers.kind == "kpd" or _method(config) not in ("kpd", "dense")
  problems = []
  for name, (m, n) in shapes.items():
    if not blocked or name in config.layers.dense_layers:
      continue
    field = (f"layers.block_shapes.{name}" if name in config.layers.block_shapes
             else "layers.block_shape")
    for rows, cols in factory.shapes_for(name):
      for size, dim, axis in ((rows, m, "rows"), (cols, n, "columns")):
        if dim % size:
          problems.append(_problem(
              field, _get(config, field),
              f"the block's {size} {axis} do not divide the {dim} {axis} of layer {name!r} "
              f"({m}x{n} weight); valid block {axis}: {kron.divisors(dim)}."))
  return problems


def _build_problems(model, input_shape) -> list[str]:
  """Whatever else the layers reject, in the layers' words."""
  try:
    _init_shapes(model, input_shape)
  except (TypeError, ValueError) as e:
    return [f"config.layers: {e}"]
  return []
