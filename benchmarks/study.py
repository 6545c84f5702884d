r"""The side-by-side study: KPD and every baseline at the same block densities, seeds and
budget on Fashion-MNIST, and fixed block sizes against the one-run selection.

  python -m benchmarks.study --out=runs/study                      # everything
  python -m benchmarks.study --out=runs/study --models=mlp --seeds=0,1,2
  python -m benchmarks.study --out=runs/study --report_only \
      --lr_studies=runs/study_lr5e-3,runs/study_lr1e-2   # + each method at its best rate

Every run is ``python train.py ...`` in its own process: its command is printed and saved
in ``<run>/run.json`` with its wall time and its peak RSS, read from the operating system
when it ends.
A run whose ``summary.json`` exists is not run again, so an interrupted study resumes.
Then each run is restored and measured, and ``RESULTS.md`` (``--results``) is written with
plots in ``--plots_dir``:

- test accuracy and achieved block density (``summary.json``), mean +- std over seeds;
- training FLOPs, analytic: ``6 x forward MACs per example x examples`` (backward ~ 2x
  forward). Dense-start methods (dense, group_lasso, gradual) compute every weight;
  ``+bsr`` runs (``sparsity.finetune='bsr'``) count ``nnz*bm*bn`` per position for their
  sparse layers after the switch to block-sparse form, every stored block of each switch
  (an early switch's pruned blocks too, until a repack), and the whole grid for a layer
  that multiplies densely (``kernels.dense_from``);
  set/rigl/static count their masked layers at the target density (what a block-sparse
  kernel would compute); KPD counts its factored contractions (``bsparse.kron`` cost
  model, cheaper order per layer) at the block density logged at each step for dense
  layers and over the full block grid for convs, candidates included until the selection
  drops them;
- step time: the median over the logging windows of ``batch / examples_per_sec``, a plot
  of every window over the run, and the run's wall time (``train.py`` start to end:
  compiles and evaluations included), which also shows phases slower than the median
  step;
- memory: params + optimizer state, and XLA's own account of the compiled train step
  (arguments + temporaries: activations and workspace), and the process's peak RSS;
- inference latency (``--latency_batch``) of the serving forms of the seed-0 models.
"""
from __future__ import annotations

import dataclasses
import fractions
import itertools
import json
import math
import os
import ast
import importlib
import re
import statistics
import subprocess
import sys
import time
from typing import Any

from absl import app, flags
import flax.traverse_util as tu
import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import lr_choice  # noqa: E402
from bsparse import (baselines, checkpoints, cli, data, export, finetune,  # noqa: E402
                     metric_writers, report, selection, sparsity, train_lib)
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

KPD_FREEZE = fractions.Fraction(1, 3)  # of the run, where ``schedule`` fixes KPD masks

_OUT = flags.DEFINE_string("out", "runs/study", "Directory of the study's runs.")
_MODELS = flags.DEFINE_list("models", ["mlp", "cnn"], "Models: mlp, cnn.")
_DENSITIES = flags.DEFINE_list("densities", ["0.5", "0.25", "0.1"], "Block densities.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_EPOCHS = flags.DEFINE_float("epochs", 6.0, "Training epochs of every run.")
_RANKS = flags.DEFINE_list("ranks", ["4", "16"], "KPD ranks (each a row of the table).")
_FINETUNE = flags.DEFINE_list(
    "finetune", ["kpd", "bsr"], "How KPD runs train after the mask freeze, a table row each "
    "per rank: kpd (the factors; label 'kpd r<rank>') or bsr (the kept blocks in "
    "block-sparse form, bsparse/finetune.py; label 'kpd r<rank> +bsr').")
_PRUNE = flags.DEFINE_list(
    "prune", ["once"], "KPD pruning schedules (sparsity.prune_schedule), a row each per rank "
    "and fine-tuning form: once (top-k at the freeze), cubic (gradual from the penalty's "
    "start to the freeze; label suffix ' cubic').")
_FACTOR_LR = flags.DEFINE_list(
    "factor_lr_scales", ["1"], "KPD factor step multipliers (optimizer.factor_lr_scale), a "
    "row each per rank, fine-tuning form and pruning schedule; label suffix ', factors "
    "lr×<scale>' for scales other than 1.")
_LAMS = flags.DEFINE_list(
    "lams", [], "KPD L1 strengths (sparsity.lam), a row each per rank, fine-tuning form, "
    "pruning schedule, factor step and freeze point; label suffix ', lam <value>'. Empty: "
    "the config's own, no suffix.")
_PENALTIES = flags.DEFINE_list(
    "penalties", ["l1"], "KPD penalties (sparsity.penalty: l1, trimmed), a row each per "
    "rank, fine-tuning form, pruning schedule, factor step, freeze point and strength; "
    "label suffix ', trimmed L1' for trimmed.")
flags.register_validator("penalties", lambda v: set(v) <= set(sparsity.PENALTIES),
                         f"--penalties takes names from {', '.join(sparsity.PENALTIES)}.")
_FREEZES = flags.DEFINE_list(
    "freeze_fractions", [str(KPD_FREEZE)], "Where KPD masks fix (sparsity.freeze_epoch), "
    "as fractions of the run, a row each per rank, fine-tuning form, pruning schedule and "
    "factor step; label suffix ', mask fixed at <fraction>' for fractions other than "
    "1/3. The cubic pruning ends there too (gradual pruning ends at 1/2).")
_SWITCHES = flags.DEFINE_list(
    "switch_fractions", [], "Early switches to block-sparse form (sparsity.switch_epoch; "
    "bsparse/finetune.py) as fractions of the run. When given, the KPD rows are the +bsr "
    "cubic ones, a row each per fraction (label suffix ', switch at <fraction>'); each must "
    "lie at or after the penalty's start (1/12) and before every freeze fraction.")
_REPACKS = flags.DEFINE_list(
    "repack_steps", [], "With --switch_fractions: repack the free blocks every N steps "
    "between the switch and the freeze (sparsity.repack_every_steps), a row each per switch "
    "fraction and N; label suffix ', repacks every <N> steps'. 0 or empty: no repacks.")
flags.register_validator("repack_steps", lambda v: all(n.isdigit() for n in v),
                         "--repack_steps takes whole numbers of steps >= 0, e.g. 0,100.")
_METHODS = flags.DEFINE_list("methods", list(("group_lasso", "gradual", "set", "rigl",
                                              "static")), "Baselines to run beside KPD.")
_DENSE = flags.DEFINE_bool(
    "dense", True, "A dense run per seed (the accuracy and FLOPs reference). --nodense "
    "leaves it to another invocation into the same --out, e.g. one running beside this.")
_SWEEP = flags.DEFINE_bool("sweep", True, "Also run the block-size sweep and the selection.")
_SWEEP_DENSITY = flags.DEFINE_float("sweep_density", 0.25, "Block density of the sweep.")
_SWEEP_LAYER = flags.DEFINE_string(
    "sweep_layer", "", "The layer whose block size the sweep varies (SWEEP_SIZES lists "
    "each model's; default: its first). The rows of any other layer are labelled "
    "'fixed <layer> <m>x<n>' and 'select <layer>'.")
_RESULTS = flags.DEFINE_string("results", "RESULTS.md", "Markdown report to write (all models in the study).")
_PLOTS_DIR = flags.DEFINE_string("plots_dir", "docs/results", "Where the PNG plots go.")
_LATENCY_BATCH = flags.DEFINE_integer("latency_batch", 256, "Batch for latency timing.")
_OVERRIDES = flags.DEFINE_multi_string(
    "override", [], "Extra config override for every run, e.g. dataset.source=tfds.")
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Only rewrite --results from the measurements in --out's "
    "study.json (without one there: of the --lr_studies alone).")
_LR_STUDIES = flags.DEFINE_list(
    "lr_studies", [], "Studies of the same runs at other learning rates "
    "(--override=optimizer.learning_rate=...): RESULTS.md then also reports every method at "
    "its own rate, chosen on validation accuracy (benchmarks/lr_choice.py).")
_IN_PROCESS = flags.DEFINE_bool(
    "in_process", False, "Train in this process (no per-run RSS); for tests on mock data.")

CONFIG_FILES = {"mlp": "mlp_fmnist", "cnn": "cnn_fmnist"}
DENSE_START = ("dense", "group_lasso", "gradual")
# Per model, the layers whose block size a sweep may vary (by default the first) and the
# sizes tried (the configs' own first).
SWEEP_SIZES = {"mlp": {"fc1": ((28, 10), (14, 10), (28, 20))},
               "cnn": {"fc1": ((16, 16), (8, 8), (32, 16)),
                       "conv2": ((4, 4), (2, 2), (8, 8))}}


# --------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: a row ``label`` of the tables at one density and seed."""
  model: str
  label: str  # dense | kpd r<rank> [+bsr] [cubic] | a baseline | fixed <m>x<n> | select
  method: str
  density: float
  seed: int
  overrides: tuple[tuple[str, Any], ...]

  @property
  def name(self) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", self.label.lower())
    return f"{self.model}/{slug}_d{self.density:g}_s{self.seed}"

  @property
  def config_file(self) -> str:
    dense = "_dense" if self.method != "kpd" else ""
    return f"configs/{CONFIG_FILES[self.model]}{dense}.py"


def schedule(epochs: float) -> dict[str, float]:
  """Sparsity schedules as fractions of the run: the penalty ramps over the first third,
  masks fix at one third (KPD freeze, group-lasso prune), gradual/SET/RigL stop changing
  masks at one half, the block-size candidates are chosen at one eighth (when their
  annealing is complete) and the losers gone at one sixth."""
  e = epochs / 6.0
  return {"sparsity.start_epoch": 0.5 * e, "sparsity.ramp_epochs": 1.0 * e,
          "sparsity.freeze_epoch": 2.0 * e, "baseline.prune_epoch": 2.0 * e,
          "baseline.start_epoch": 0.5 * e, "baseline.end_epoch": 3.0 * e,
          "selection.start_epoch": 0.25 * e, "selection.anneal_epochs": 0.5 * e,
          "selection.select_epoch": 1.0 * e, "selection.fade_epochs": 0.25 * e}


def plan(models, densities, seeds, ranks, methods, epochs: float, sweep: bool,
         sweep_density: float, finetunes=("kpd",), prunes=("once",),
         factor_lr_scales=(1.0,), freezes=(KPD_FREEZE,), lams=(None,),
         penalties=("l1",), switches=(None,), repacks=(0,), dense=True,
         sweep_layer: str = "") -> list[Run]:
  """Every run of the study. KPD gets a row per combination of its settings; an early
  switch (a fraction in ``switches``; None: none) applies to ``+bsr cubic`` rows only, and
  repacks (every ``N`` steps in ``repacks``; 0: none) to early switches only; ``dense``:
  a dense run per seed too; ``sweep``: the block-size sweep of ``sweep_layer`` (default:
  the model's first in ``SWEEP_SIZES``)."""
  runs = []
  sch = schedule(epochs)
  kpd_sch = {k: v for k, v in sch.items()
             if k.startswith("sparsity.") and k != "sparsity.freeze_epoch"}
  common = (("num_epochs", epochs), ("progress_bar", False))
  for model in models:
    for seed in seeds:
      base = common + (("seed", seed),)
      if dense:
        runs.append(Run(model, "dense", "dense", 1.0, seed, base + (("method", "dense"),)))
      for d in densities:
        for r, f, p, k, z, lam, pen, w, n in itertools.product(
            ranks, finetunes, prunes, factor_lr_scales, freezes, lams, penalties, switches,
            repacks):
          if (w is not None and (f, p) != ("bsr", "cubic")) or (n and w is None):
            continue
          # (label suffix, overrides) per setting; the suffix is empty at the default.
          parts = [
              (f"kpd r{r}", (("layers.rank", r), ("sparsity.target_density", d),
                             *kpd_sch.items())),
              (" +bsr", (("sparsity.finetune", "bsr"),)) if f == "bsr" else ("", ()),
              (" cubic", (("sparsity.prune_schedule", "cubic"),)) if p == "cubic"
              else ("", ()),
              (f", factors lr×{k:g}" if k != 1 else "",
               (("optimizer.factor_lr_scale", k),)),
              (f", mask fixed at {z}" if z != KPD_FREEZE else "",
               (("sparsity.freeze_epoch", epochs * z.numerator / z.denominator),)),
              (f", lam {lam:g}", (("sparsity.lam", lam),)) if lam is not None else ("", ()),
              (", trimmed L1", (("sparsity.penalty", pen),)) if pen == "trimmed"
              else ("", ()),
              (f", switch at {w}", (("sparsity.switch_epoch", epochs * w.numerator /
                                     w.denominator),)) if w is not None else ("", ()),
              (f", repacks every {n} steps", (("sparsity.repack_every_steps", n),))
              if n else ("", ())]
          runs.append(Run(model, "".join(label for label, _ in parts), "kpd", d, seed,
                          base + tuple(o for _, overrides in parts for o in overrides)))
        for m in methods:
          runs.append(Run(model, m, m, d, seed, base + (
              ("method", m), ("baseline.target_density", d),
              *((k, v) for k, v in sch.items() if k.startswith("baseline.")))))
      if sweep:
        runs += sweep_runs(model, seed, ranks[0], sweep_density, base, sch, sweep_layer)
  return runs


def check_switches(switches, freezes, finetunes, prunes, repacks=()) -> None:
  """Raises ``app.UsageError`` naming the fix where ``--switch_fractions`` or
  ``--repack_steps`` cannot apply."""
  if not switches:
    if any(repacks):
      raise app.UsageError("--repack_steps repacks after an early switch: add "
                           "--switch_fractions.")
    return
  if "bsr" not in finetunes or "cubic" not in prunes:
    raise app.UsageError("--switch_fractions applies to +bsr cubic KPD rows: add bsr to "
                         "--finetune and cubic to --prune.")
  start = fractions.Fraction(schedule(6.0)["sparsity.start_epoch"]) / 6  # penalty starts
  for w in switches:
    if not start <= w < min(freezes):
      raise app.UsageError(f"--switch_fractions={w}: a switch must lie in [{start}, "
                           f"{min(freezes)}), after the penalty starts and before the "
                           "earliest --freeze_fractions.")


def check_sweep_layer(models, layer: str) -> None:
  """Raises ``app.UsageError`` naming the choices where a model has no sweep of ``layer``."""
  for model in models:
    if layer and layer not in SWEEP_SIZES[model]:
      raise app.UsageError(f"--sweep_layer={layer}: the {model} sweep varies one of "
                           f"{', '.join(SWEEP_SIZES[model])}.")


def sweep_layer_of(label: str) -> str:
  """The layer a sweep row varies, from its label: '' for the model's first layer
  (``fixed <m>x<n>``, ``select``), else the one named (``fixed <layer> <m>x<n>``,
  ``select <layer>``)."""
  words = label.split()
  return words[1] if len(words) == (3 if words[0] == "fixed" else 2) else ""


def sweep_runs(model, seed, rank, density, base, sch, layer: str = "") -> list[Run]:
  """A fixed run per candidate size of ``layer`` (default: the model's first in
  ``SWEEP_SIZES``) and one selection run among them."""
  first = next(iter(SWEEP_SIZES[model]))
  layer = layer or first
  sizes = SWEEP_SIZES[model][layer]
  named = "" if layer == first else f" {layer}"
  kpd = base + (("layers.rank", rank), ("sparsity.target_density", density),
                *((k, v) for k, v in sch.items() if k.startswith("sparsity.")))
  runs = [Run(model, f"fixed{named} {m}x{n}", "kpd", density, seed,
              kpd + ((f"layers.block_shapes.{layer}", (m, n)),)) for m, n in sizes]
  runs.append(Run(model, f"select{named}", "kpd", density, seed, kpd + (
      (f"layers.block_shapes.{layer}", sizes),
      *((k, v) for k, v in sch.items() if k.startswith("selection.")))))
  return runs


# --------------------------------------------------------------------------- running


def _flag_value(v) -> str:
  if isinstance(v, tuple):
    return repr(v).replace(" ", "")
  return str(v)


def invocation() -> str:
  """This study's command line: every flag of this module that differs from its default."""
  args = []
  for holder in [v for v in globals().values() if isinstance(v, flags.FlagHolder)]:
    flag = flags.FLAGS[holder.name]
    if flag.value == flag.default:
      continue
    if holder is _OVERRIDES:
      args += [f"--override={v}" for v in flag.value]
    elif isinstance(flag.value, list):
      args.append(f"--{holder.name}={','.join(flag.value)}")
    elif isinstance(flag.value, bool):
      args.append(f"--{'' if flag.value else 'no'}{holder.name}")
    else:
      args.append(f"--{holder.name}={flag.value}")
  return " ".join(["python -m benchmarks.study", *args])


def extra_overrides() -> tuple[tuple[str, Any], ...]:
  """``--override key=value`` pairs, values parsed as Python literals where they are."""
  out = []
  for o in _OVERRIDES.value:
    key, _, raw = o.partition("=")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    out.append((key, value))
  return tuple(out)


def command(run: Run, workdir: str) -> list[str]:
  return [sys.executable, "train.py", f"--config={run.config_file}", f"--workdir={workdir}",
          *(f"--config.{k}={_flag_value(v)}" for k, v in run.overrides + extra_overrides())]


def config_file_config(path: str):
  """``get_config()`` of a config file named by its path, e.g. ``configs/mlp_fmnist.py``."""
  return importlib.import_module(path[:-3].replace("/", ".")).get_config()


def config_of(run: Run):
  """The run's config, built in this process as train.py's flags build it."""
  c = config_file_config(run.config_file)
  for key, value in run.overrides + extra_overrides():
    *path, last = key.split(".")
    node = c
    for p in path:
      node = node[p]
    node[last] = value
  return c


def execute(run: Run, out: str) -> None:
  """Trains ``run`` unless it has finished; records its command, wall time and peak RSS."""
  workdir = os.path.join(out, run.name)
  if os.path.exists(os.path.join(workdir, "summary.json")):
    return
  cmd = command(run, workdir)
  print(" ".join(cmd[1:]), flush=True)
  t0 = time.perf_counter()
  if _IN_PROCESS.value:
    train_lib.train_and_evaluate(config_of(run), workdir)
    rss = None
  else:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
      raise SystemExit(f"{run.name} failed (exit {proc.returncode}): {' '.join(cmd[1:])}")
    rss = usage.ru_maxrss / 1024  # KiB on Linux
  with open(os.path.join(workdir, "run.json"), "w", encoding="utf-8") as f:
    json.dump({"command": " ".join(cmd[1:]), "wall_s": time.perf_counter() - t0,
               "peak_rss_mb": rss}, f)


# --------------------------------------------------------------------------- measuring


def _at_density(m1, m2, n1, n2, rank, taps, in_pos, out_pos):
  """``density -> forward MACs per example`` of one KPD term (``report.kpd_macs``)."""
  return lambda d: report.kpd_macs(m1, m2, n1, n2, rank, taps, round(d * m1 * n1), in_pos,
                                   out_pos)


def _term_costs(program, variables, image_shape) -> tuple[dict[str, Any], int]:
  """``({'layer/term': density -> MACs per example}, MACs of the dense weight layers)``."""
  shapes = report.io_shapes(program.model, variables, (1, *image_shape))
  flat = tu.flatten_dict(variables["params"])
  costs, dense = {}, 0
  for path, leaf in flat.items():
    layer = path[:-2] if path[-1] == "S" else path[:-1]
    in_shape, out_shape = shapes.get(layer, ((1, 1), (1, 1)))
    in_pos, out_pos = report.positions(in_shape), report.positions(out_shape)
    if path[-1] == "kernel":
      dense += out_pos * int(np.prod(leaf.shape))
    elif path[-1] == "S":
      r, m2, n2 = flat[path[:-1] + ("B",)].shape
      m1, n1 = leaf.shape
      taps = int(math.prod(flat[path[:-1] + ("A",)].shape[1:-2]))
      costs["/".join(path[:-1])] = _at_density(m1, m2, n1, n2, r, taps, in_pos, out_pos)
  return costs, dense


def training_flops(run: Run, config, program, variables, image_shape, rows,
                   switches=()) -> float:
  """Analytic training FLOPs of the run (see the module docstring); ``switches``:
  ``(step, MACs per example)`` of each block-sparse model a run switched to, oldest
  first."""
  costs, dense_macs = _term_costs(program, variables, image_shape)
  per_step = []  # (step, MACs per example)
  if run.method == "kpd":
    for r in rows:
      if "train/loss" not in r:
        continue
      after = [macs for step, macs in switches if r["step"] > step]
      if after:
        per_step.append((r["step"], after[-1]))
      else:
        per_step.append((r["step"], dense_macs + sum(
            c(r[f"density/{k}"]) for k, c in costs.items() if f"density/{k}" in r)))
  else:
    masked = dense_masked_macs(config, program, variables, image_shape)
    sparse_start = run.method in ("set", "rigl", "static")
    macs = dense_macs - (1 - run.density) * masked if sparse_start else dense_macs
    per_step = [(r["step"], macs) for r in rows if "train/loss" in r]
  total, prev = 0.0, 0
  for step, macs in per_step:
    total += (step - prev) * macs
    prev = step
  return 6.0 * total * config.batch_size


def bsr_macs(model, switch, image_shape) -> float:
  """Forward MACs per example of ``model``, the block-sparse model of ``switch``: every
  stored block counts, pruned or not (``report.layer_table``)."""
  x = jax.ShapeDtypeStruct((1, *image_shape), np.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  table = report.layer_table(model, {**variables, **switch.index()}, (1, *image_shape))
  return report.totals(table)["bsr_macs"]


def dense_masked_macs(config, program, variables, image_shape) -> float:
  """MACs per example of the layers a baseline masks."""
  names = baselines.masked_kernels(variables["params"],
                                   baselines.layout_from_config(config.layers))
  rows = report.layer_table(program.model, variables, (1, *image_shape))
  return float(sum(r["dense_macs"] for r in rows if r["layer"] in names))


def step_memory(program, state, config, image_shape) -> dict[str, float]:
  """State bytes and XLA's memory account of the compiled train step, in MB."""
  batch = {"image": np.zeros((config.batch_size, *image_shape), np.float32),
           "label": np.zeros((config.batch_size,), np.int32)}
  compiled = program.steps.lower_train(state, program.steps.put_batch(batch)).compile()
  mem = compiled.memory_analysis()
  state_bytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
  return {"state_mb": state_bytes / 2**20,
          "step_mb": (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**20,
          "temp_mb": mem.temp_size_in_bytes / 2**20}


def median_step_ms(rows, batch_size: int) -> float:
  rates = [r["examples_per_sec"] for r in rows if "examples_per_sec" in r][1:]
  return 1000 * batch_size / statistics.median(rates) if rates else float("nan")


def step_ms_trace(rows, batch_size: int) -> list[list[float]]:
  """``[step, ms per step]`` of each logging window (``batch / examples_per_sec``: the
  window's wall time, compiles, repacks and evaluations in it included)."""
  return [[r["step"], 1000 * batch_size / r["examples_per_sec"]]
          for r in rows if r.get("examples_per_sec")]


def measure(run: Run, out: str, datasets, latency: bool) -> dict[str, Any]:
  workdir = os.path.join(out, run.name)
  config = checkpoints.load_config(workdir)
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  with open(os.path.join(workdir, "run.json"), encoding="utf-8") as f:
    info = json.load(f)
  rows = metric_writers.read_metrics(workdir)
  state, program, build = train_lib.read_program(config, workdir, datasets)
  # The initial model (every candidate) prices the steps before a selection or a switch
  # to block-sparse form; costs need shapes only, so its variables stay abstract.
  choice = selection.load_choice(workdir)
  initial = build(config) if choice or program.switch else program
  switches = [(s.step, bsr_macs(train_lib.build_model(config, datasets.num_classes, s), s,
                                datasets.image_shape))
              for s in finetune.load_switches(workdir)]
  x = jax.ShapeDtypeStruct((1, *datasets.image_shape), np.float32)
  init_vars = jax.eval_shape(lambda x: initial.model.init(jax.random.key(0), x, train=False), x)
  density = summary.get("density/weights", 1.0)
  result = {"run": run.name, "model": run.model, "label": run.label, "method": run.method,
            "target": run.density, "seed": run.seed, "accuracy": summary["test/accuracy"],
            "density": density, "command": info["command"], "wall_s": info["wall_s"],
            "rss_mb": info["peak_rss_mb"],
            "flops": training_flops(run, config, initial, init_vars, datasets.image_shape,
                                    rows, switches),
            "step_ms": median_step_ms(rows, config.batch_size),
            "step_ms_trace": step_ms_trace(rows, config.batch_size),
            **step_memory(program, state, config, datasets.image_shape)}
  if choice is not None:
    result["chosen"] = {k: list(v) for k, v in choice.block_shapes.items()}
  if latency:
    result["latency_ms"] = latency_of(program, state, datasets)
  return result


def latency_of(program, state, datasets) -> dict[str, float]:
  x = next(data.eval_batches(datasets.test, batch_size=_LATENCY_BATCH.value))["image"]
  variables = jax.device_get(program.variables(state))
  if program.switch is None and not sparsity.term_paths(variables["params"]):
    return {"dense": export.latency_ms(program.model, variables, x)}
  forms = export.serving_forms(program.model, variables, (1, *datasets.image_shape))
  return {k: export.latency_ms(m, v, x) for k, (m, v) in forms.items()}


# --------------------------------------------------------------------------- reporting


def merge(path: str, fresh: list[dict], invocations: dict[str, str]) -> dict:
  """Adds this invocation's results and command line to the study file ``path`` (runs
  keyed by name), so models studied by separate invocations (other budgets, more seeds)
  share one RESULTS.md."""
  study = {"runs": {}, "invocations": {}}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      study = json.load(f)
  study["runs"].update({r["run"]: r for r in fresh})
  for model, command in invocations.items():
    known = study["invocations"].setdefault(model, [])
    if command not in known:
      known.append(command)
  checkpoints.write_text_atomic(path, json.dumps(study, indent=1))
  return study


def _groups(results, key):
  out: dict[Any, list] = {}
  for r in results:
    out.setdefault(key(r), []).append(r)
  return out


def _ms(values, fmt="{:.2f}") -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  if len(values) == 1:
    return fmt.format(values[0])
  return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def _mean(rs, k):
  return statistics.mean(r[k] for r in rs)


def rows_of(results, model, sweep: bool = False) -> list[dict]:
  """``model``'s rows of ``results``: its block-size sweep's (labels ``fixed ...`` and
  ``select ...``) with ``sweep``, else the others."""
  return [r for r in results
          if r["model"] == model and r["label"].startswith(("fixed", "select")) == sweep]


def main_table(results, model) -> str:
  rs = rows_of(results, model)
  dense = [r for r in rs if r["method"] == "dense"]
  dense_flops = _mean(dense, "flops") if dense else float("nan")
  lines = ["| method | target density | seeds | test accuracy % | achieved density | "
           "training TFLOPs | × dense FLOPs | step ms | wall s | state MB | step memory MB | "
           "peak RSS MB |", "|" + "---|" * 12]
  order = lambda k: (-k[1], ["dense", "kpd"].index(k[0].split()[0])
                     if k[0].split()[0] in ("dense", "kpd") else 2, k[0])
  for (label, target), g in sorted(_groups(rs, lambda r: (r["label"], r["target"])).items(),
                                   key=lambda kv: order(kv[0])):
    lines.append("| " + " | ".join([
        label, f"{target:g}", str(len(g)), _ms([100 * r["accuracy"] for r in g]),
        _ms([r["density"] for r in g], "{:.3f}"), _ms([r["flops"] / 1e12 for r in g], "{:.3f}"),
        f"{_mean(g, 'flops') / dense_flops:.2f}", _ms([r["step_ms"] for r in g]),
        _ms([r["wall_s"] for r in g], "{:.0f}"), f"{_mean(g, 'state_mb'):.2f}",
        f"{_mean(g, 'step_mb'):.1f}",
        _ms([r["rss_mb"] for r in g], "{:.0f}")]) + " |")
  return "\n".join(lines)


def latency_table(results, model) -> str:
  rs = [r for r in results if r["model"] == model and "latency_ms" in r]
  if not rs:
    return ""
  lines = ["| run | test accuracy % | density | " + " | ".join(
      f"{k} ms" for k in ("dense", "kpd", "bsr")) + " |", "|" + "---|" * 6]
  for r in sorted(rs, key=lambda r: (-r["target"], r["label"], r["seed"])):
    lat = r["latency_ms"]
    lines.append(f"| {r['label']} d={r['target']:g} seed {r['seed']} | "
                 f"{100 * r['accuracy']:.2f} | "
                 f"{r['density']:.3f} | " + " | ".join(
                     f"{lat[k]:.2f}" if k in lat else "-" for k in ("dense", "kpd", "bsr"))
                 + " |")
  return "\n".join(lines)


def sweeps(results, model) -> dict[str, list[dict]]:
  """``{layer: rows}`` of each of ``model``'s block-size sweeps; layer '' is its first."""
  return _groups(rows_of(results, model, sweep=True), lambda r: sweep_layer_of(r["label"]))


def sweep_summaries(results, model) -> list[tuple[str, str, list[tuple[str, str, bool]]]]:
  """Per layer swept, ``(layer, table, checks)``: the sweep table and the selection's
  checks (``targets`` rows), per seed; layer '' is the model's first."""
  return [(layer, *sweep_summary(g, layer)) for layer, g in sorted(sweeps(results, model).items())]


def sweep_summary(rs, layer: str) -> tuple[str, list[tuple[str, str, bool]]]:
  """The table and checks of one layer's sweep rows ``rs``."""
  groups = _groups(rs, lambda r: r["label"])
  lines = ["| run | seeds | test accuracy % | training TFLOPs | wall s | chosen |",
           "|---|---|---|---|---|---|"]
  for label, g in sorted(groups.items()):
    chosen = sorted({"x".join(map(str, v)) for r in g for v in r.get("chosen", {}).values()})
    lines.append(f"| {label} | {len(g)} | {_ms([100 * r['accuracy'] for r in g])} | "
                 f"{_ms([r['flops'] / 1e12 for r in g], '{:.3f}')} | "
                 f"{_ms([r['wall_s'] for r in g], '{:.0f}')} | {', '.join(chosen) or '-'} |")
  checks = []
  named = f" {layer}" if layer else ""
  fixed = {k: g for k, g in groups.items() if k.startswith("fixed")}
  if f"select{named}" in groups and fixed:
    best = max(fixed, key=lambda k: _mean(fixed[k], "accuracy"))
    for r in sorted(groups[f"select{named}"], key=lambda r: r["seed"]):
      size = "x".join(map(str, next(iter(r.get("chosen", {}).values()), [])))
      who = f"selection{' of ' + layer if layer else ''}, seed {r['seed']}"
      mine = fixed.get(f"fixed{named} {size}")
      if mine is None:
        checks.append((f"{who}: picks a size of the sweep", f"chose {size or 'nothing'}",
                       False))
        continue
      gap = 100 * (_mean(fixed[best], "accuracy") - _mean(mine, "accuracy"))
      cost = r["flops"] / _mean(mine, "flops")
      wall = r["wall_s"] / _mean(mine, "wall_s")
      checks += [
          (f"{who}: its size's fixed run within 0.5 points of the best fixed size",
           f"chose {size}, {gap:.2f} below {best.split()[-1]}", gap <= 0.5),
          (f"{who}: training FLOPs ≤ 1.5x that fixed run", f"{cost:.2f}x", cost <= 1.5),
          (f"{who}: wall time ≤ 1.5x that fixed run", f"{wall:.2f}x", wall <= 1.5)]
  return "\n".join(lines), checks


def targets(results, model, rank_label: str) -> list[tuple[str, str, bool]]:
  """The done-when checks of KPD row ``rank_label`` at the study's lowest density:
  ``(target, measured, met)``."""
  rs = rows_of(results, model)
  low = min((r["target"] for r in rs if r["method"] != "dense"), default=None)
  if low is None:
    return []
  get = lambda label: [r for r in rs if r["label"] == label and
                       (r["target"] == low or label == "dense")]
  kpd, dense = get(rank_label), get("dense")
  if not kpd or not dense:
    return []
  acc = lambda g: 100 * _mean(g, "accuracy")
  who = f"{rank_label} at density {low:g}"
  gap = acc(dense) - acc(kpd)
  out = [(f"{who}: within 1.0 point of dense",
          f"{acc(kpd):.2f}% vs {acc(dense):.2f}% (gap {gap:.2f})", gap <= 1.0)]
  for other in ("gradual", "group_lasso"):
    g = get(other)
    if not g:
      continue
    flops = _mean(kpd, "flops") / _mean(g, "flops")
    pair = lambda k, fmt: (f"{fmt.format(_mean(kpd, k))} vs {fmt.format(_mean(g, k))}",
                           _mean(kpd, k) < _mean(g, k))
    out += [(f"{who}: at least as accurate as {other}",
             f"{acc(kpd):.2f}% vs {acc(g):.2f}% ({acc(kpd) - acc(g):+.2f})",
             acc(kpd) >= acc(g)),
            (f"{who}: training FLOPs ≤ 0.3x {other}", f"{flops:.2f}x", flops <= 0.3),
            (f"{who}: step time below {other}", *pair("step_ms", "{:.2f} ms")),
            # The median step hides slower phases (an early switch's high-density
            # block-sparse steps, its repacks' compiles): the run's wall time shows them.
            (f"{who}: wall time below {other}", *pair("wall_s", "{:.0f} s")),
            (f"{who}: step memory below {other}", *pair("step_mb", "{:.1f} MB"))]
    if all(r["rss_mb"] is not None for r in kpd + g):
      out.append((f"{who}: peak RSS below {other}", *pair("rss_mb", "{:.0f} MB")))
  return out


def targets_table(checks, lead: tuple[str, ...] = ()) -> str:
  """``targets`` rows as a Markdown table; ``lead``: names of leading columns, each
  check then starts with their values."""
  lines = ["| " + " | ".join((*lead, "target", "measured", "verdict")) + " |",
           "|" + "---|" * (len(lead) + 3)]
  for c in checks:
    *head, measured, met = c
    lines.append("| " + " | ".join((*head, measured, "met" if met else "**missed**")) + " |")
  return "\n".join(lines)


def plot_accuracy(results, model, path) -> str:
  rs = rows_of(results, model)
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
  for label, g in sorted(_groups(rs, lambda r: r["label"]).items()):
    pts = sorted(_groups(g, lambda r: r["target"]).items())
    xs = [t for t, _ in pts]
    ys = [100 * _mean(v, "accuracy") for _, v in pts]
    es = [100 * statistics.stdev([r["accuracy"] for r in v]) if len(v) > 1 else 0
          for _, v in pts]
    fl = [_mean(v, "flops") / 1e12 for _, v in pts]
    style = "-o" if label.startswith("kpd") else ("k*" if label == "dense" else "--s")
    ax1.errorbar(xs, ys, yerr=es, fmt=style, label=label, capsize=3, markersize=5)
    ax2.plot(fl, ys, style, label=label, markersize=5)
  ax1.set(xscale="log", xlabel="block density", ylabel="test accuracy %",
          title=f"{model}: accuracy vs density")
  ax2.set(xscale="log", xlabel="training TFLOPs (analytic)", ylabel="test accuracy %",
          title=f"{model}: accuracy vs training cost")
  ax1.legend(fontsize=7)
  _save(fig, path)
  return path


def plot_sweep(rs, title: str, path: str) -> None:
  """Test accuracy against training FLOPs and against wall time for one layer's sweep
  rows ``rs``: each fixed size as its mean ± std over seeds, each selection run as a
  point marked with its seed and the size it chose."""
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
  groups = _groups(rs, lambda r: r["label"])
  spread = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
  for ax, key, scale, xlabel in ((axes[0], "flops", 1e12, "training TFLOPs (analytic)"),
                                 (axes[1], "wall_s", 1.0, "wall time s")):
    for label, g in sorted(groups.items()):
      xs, ys = [r[key] / scale for r in g], [100 * r["accuracy"] for r in g]
      if label.startswith("fixed"):
        ax.errorbar(statistics.mean(xs), statistics.mean(ys), xerr=spread(xs),
                    yerr=spread(ys), fmt="s", capsize=3, label=label)
        continue
      ax.plot(xs, ys, "k^", label=label)
      for r, x, y in zip(g, xs, ys):
        size = "x".join(map(str, next(iter(r.get("chosen", {}).values()), ["-"])))
        ax.annotate(f"s{r['seed']}: {size}", (x, y), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    ax.margins(x=0.15)  # room for the selection runs' labels
    ax.set(xlabel=xlabel, ylabel="test accuracy %", title=title)
  axes[0].legend(fontsize=7)
  _save(fig, path)


def _save(fig, path: str) -> None:
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_step_times(results, model, path) -> bool:
  """Milliseconds per step over the run, per row of ``model`` (the median over seeds of
  each logging window), to show where a run's wall time goes beyond the median step.
  False (and no plot) when no run has a trace."""
  rs = [r for r in rows_of(results, model) if r.get("step_ms_trace")]
  if not rs:
    return False
  fig, ax = plt.subplots(figsize=(12, 4.2))
  for label, g in sorted(_groups(rs, lambda r: r["label"]).items()):
    by_step = {}
    for r in g:
      for step, ms in r["step_ms_trace"]:
        by_step.setdefault(step, []).append(ms)
    steps = sorted(by_step)
    style = "-" if label.startswith("kpd") else ("k:" if label == "dense" else "--")
    ax.plot(steps, [statistics.median(by_step[t]) for t in steps], style, label=label,
            linewidth=1.2)
  ax.set(xlabel="step", ylabel="ms per step (logging window)",
         title=f"{model}: step time over the run (median over seeds)")
  ax.legend(fontsize=7)
  _save(fig, path)
  return True


def kpd_labels(results, model) -> list[str]:
  """The KPD table rows of ``model`` (``kpd r<rank>``, with ``+bsr`` and ``cubic`` variants)."""
  labels = {r["label"] for r in results if r["model"] == model and r["label"].startswith("kpd")}
  return sorted(labels, key=lambda l: (int(re.match(r"kpd r(\d+)", l)[1]), l))


def kpd_targets(results, model) -> list[tuple[str, str, bool]]:
  """``targets`` of every KPD row of ``model``."""
  return [c for label in kpd_labels(results, model) for c in targets(results, model, label)]


def best_kpd_label(tuned, model) -> str:
  """Of ``model``'s KPD rows at their chosen rates, the one with the best mean final
  validation accuracy: KPD's own settings (factor step, freeze, L1) chosen as its rate is."""
  return max(kpd_labels(tuned, model), key=lambda label: statistics.mean(
      r["val"] for r in tuned if r["model"] == model and r["label"] == label))


def budgets(runs):
  """``(model, epochs, runs of that model and budget)``, sorted."""
  for model, epochs in sorted({(r["model"], r["epochs"]) for r in runs}):
    yield model, epochs, [r for r in runs if r["model"] == model and r["epochs"] == epochs]


def layer_ranks_note(model: str) -> str:
  """Names the per-layer KPD ranks the model's config fixes (a row's ``r`` is the rest)."""
  path = f"configs/{CONFIG_FILES[model]}.py"
  ranks = config_file_config(path).layers.ranks
  if not ranks:
    return ""
  fixed = ", ".join(f"{k} at rank {v}" for k, v in sorted(ranks.items()))
  return (f" KPD rows: {fixed} (`{path}`); the `r` of a row is the rank of the other "
          "KPD layers.")


def model_section(results, model, plots_dir, rel, plot_name: str) -> list[str]:
  """The main table, its plot (``plot_name`` in ``plots_dir``) and the done-when checks
  of one model; nothing when it has only sweep rows."""
  if not rows_of(results, model):
    return []
  parts = [main_table(results, model) + "\n", f"![{model}]({rel}/{plot_name})\n"]
  plot_accuracy(results, model, os.path.join(plots_dir, plot_name))
  steps_name = plot_name.replace("accuracy", "step_times")
  if plot_step_times(results, model, os.path.join(plots_dir, steps_name)):
    parts.append(f"![{model} step times]({rel}/{steps_name})\n")
  checks = kpd_targets(results, model)
  if checks:
    parts.append("Targets:\n\n" + targets_table(checks) + "\n")
  return parts


def tuned_section(out_dirs: list[str], groups: dict, plots_dir: str, rel: str,
                  base: bool = True) -> list[str]:
  """Every method at its own learning rate, chosen on validation accuracy; a table, plot
  and the done-when checks per model and budget. ``groups``: ``lr_choice.collect`` of
  ``out_dirs``; ``base``: the first of them is the study at the configs' rate."""
  commands = [shown(c) for out in out_dirs[1 if base else 0:]
              for cs in lr_choice.read_study(out)["invocations"].values() for c in cs]
  where = ("The tables above train every method at the configs' learning rate. Here each "
           if base else "Each ")
  sources = ("The configs' rate is the study above; the other rates come from these "
             "commands:" if base else "The rates come from these commands:")
  parts = ["## Each method at its own learning rate\n",
           f"{where}method (model, budget, target density) is run at several rates and "
           "reported at the one with the best mean final accuracy on the validation split "
           "(held out from the training set; a method run at one rate only is reported at "
           "it, marked so); test accuracy plays no part in the choice "
           f"(`benchmarks/lr_choice.py`). {sources}\n",
           "\n".join(f"- `{c}`" for c in commands) + "\n", lr_choice.table(groups) + "\n"]
  for model, epochs, runs in budgets(lr_choice.chosen_runs(groups)):
    parts.append(f"### {model}, {epochs:g} epochs, at the chosen rates\n")
    parts += model_section(runs, model, plots_dir, rel,
                           f"{model}_{epochs:g}ep_accuracy_tuned_lr.png")
  return parts


def shown(command: str) -> str:
  """A recorded study command as the report shows it: without ``--results`` and
  ``--plots_dir`` (where that invocation wrote its own report; the runs do not depend on
  them) and with ``--out`` relative to the working directory when it lies below it."""
  words = [w for w in command.split() if not w.startswith(("--results=", "--plots_dir="))]
  here = os.getcwd() + os.sep
  return " ".join(f"--out={w[len('--out=') + len(here):]}"
                  if w.startswith("--out=" + here) else w for w in words)


def glance(results, tuned) -> list[str]:
  """The done-when checks in one table: KPD against the baselines, at the chosen learning
  rates when ``tuned`` (``lr_choice.chosen_runs``) has runs, and the block-size selection."""
  rows = [(model, f"{epochs:g} epochs, tuned rates", *c)
          for model, epochs, runs in budgets(tuned) if kpd_labels(runs, model)
          for c in targets(runs, model, best_kpd_label(runs, model))]
  for model, epochs, rs in budgets(results):
    checks = ([] if tuned else kpd_targets(rs, model)) + [
        c for _, _, sel in sweep_summaries(rs, model) for c in sel]
    rows += [(model, f"{epochs:g} epochs", *c) for c in checks]
  if not rows:
    return []
  where = (" (KPD and the baselines at the learning rates chosen on validation, section "
           "\"Each method at its own learning rate\"; of KPD's rows, the one with the best "
           "mean validation accuracy)" if tuned else "")
  return ["## Targets at a glance\n",
          f"The done-when checks{where}; the sections below have the tables they come "
          "from.\n", targets_table(rows, ("model", "budget")) + "\n"]


def write_results(study: dict, path: str, plots_dir: str, lr_dirs=()) -> None:
  """Writes the study's report; ``lr_dirs``: this study (when it has runs) and its
  learning-rate variants, for the section at the chosen rates (none when empty)."""
  results = list(study["runs"].values())
  rel = os.path.relpath(plots_dir, os.path.dirname(os.path.abspath(path)) or ".")
  models = sorted({r["model"] for r in results})
  parts = ["# Results: block-sparse training on Fashion-MNIST, side by side\n",
           "Written by `python -m benchmarks.study`; every run's `train.py` command, wall "
           "time and measurements are in `study.json` in the study's `--out` directory. "
           f"Machine: {jax.default_backend()} ({os.cpu_count()} cores), JAX "
           f"{jax.__version__}. Accuracy is on the 10,000-image test split, mean ± std "
           "over seeds; every method of a model has the same data, epochs and batch. "
           "`benchmarks/study.py` says how each column is measured. Step time, wall time "
           "and RSS were measured on a machine that other jobs shared at times: the ± "
           "shows that spread, and the analytic FLOPs are the stable cost measure. Peak "
           "RSS is mostly the JAX runtime and its libraries (about 0.3 GB), the dataset, "
           "and XLA's working memory while it compiles the largest train step.\n"]
  base = bool(results)
  groups = lr_choice.collect(lr_dirs, base) if lr_dirs else {}
  parts += glance(results, lr_choice.chosen_runs(groups))
  for model in models:
    rs = [r for r in results if r["model"] == model]
    parts.append(f"## {model}\n")
    parts.append(f"Budget: {rs[0]['epochs']:g} epochs, seeds "
                 f"{', '.join(map(str, sorted({r['seed'] for r in rs})))}. Reproduce with "
                 + " then ".join(f"`{shown(c)}`" for c in study["invocations"].get(model, []))
                 + "." + layer_ranks_note(model) + "\n")
    parts += model_section(results, model, plots_dir, rel, f"{model}_accuracy.png")
    lat = latency_table(results, model)
    if lat:
      parts.append(f"Inference latency, batch {_LATENCY_BATCH.value}, of the lowest seed "
                   "of each invocation (dense = W built, kpd = factored, bsr = nonzero "
                   "blocks only):\n\n"
                   + lat + "\n")
    for layer, rs_layer in sorted(sweeps(results, model).items()):
      table, sel = sweep_summary(rs_layer, layer)
      swept = layer or next(iter(SWEEP_SIZES[model]))
      name = f"{model}_{swept}_sweep.png"
      plot_sweep(rs_layer, f"{model}: block size of {swept}", os.path.join(plots_dir, name))
      parts.append(f"### Block size of `{swept}`: fixed sizes vs the one-run selection\n\n"
                   + table + "\n\n" + f"![{model} {swept} sweep]({rel}/{name})\n")
      if sel:
        parts.append(targets_table(sel) + "\n")
  if lr_dirs:
    parts += tuned_section(lr_dirs, groups, plots_dir, rel, base)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(parts))


# --------------------------------------------------------------------------- main


def lr_dirs(out: str) -> list[str]:
  """This study (when it has run anything) and its ``--lr_studies``, or nothing when there
  are none."""
  others = [os.path.abspath(d) for d in _LR_STUDIES.value]
  mine = [out] if lr_choice.has_study(out) else []
  return [*mine, *(d for d in others if d != out)] if others else []


def reported_study(out: str) -> dict:
  """``--out``'s ``study.json`` for ``--report_only``; without one, an empty study when
  ``--lr_studies`` are given (the report is then theirs alone)."""
  if lr_choice.has_study(out) or not _LR_STUDIES.value:
    return lr_choice.read_study(out)
  return {"runs": {}, "invocations": {}}


def main(argv):
  del argv
  cli.quiet_logging(sys.argv)
  out = os.path.abspath(_OUT.value)
  ranks = [int(r) for r in _RANKS.value]
  if _REPORT_ONLY.value:
    write_results(reported_study(out), _RESULTS.value, _PLOTS_DIR.value, lr_dirs(out))
    print(f"wrote {_RESULTS.value} and {_PLOTS_DIR.value}/")
    return
  switches = [fractions.Fraction(w) for w in _SWITCHES.value]
  freezes = [fractions.Fraction(z) for z in _FREEZES.value]
  repacks = [int(n) for n in _REPACKS.value]
  check_switches(switches, freezes, _FINETUNE.value, _PRUNE.value, repacks)
  check_sweep_layer(_MODELS.value, _SWEEP_LAYER.value)
  runs = plan(_MODELS.value, [float(d) for d in _DENSITIES.value],
              [int(s) for s in _SEEDS.value], ranks, _METHODS.value, _EPOCHS.value,
              _SWEEP.value, _SWEEP_DENSITY.value, _FINETUNE.value, _PRUNE.value,
              [float(k) for k in _FACTOR_LR.value],
              freezes, [float(v) for v in _LAMS.value] or [None], _PENALTIES.value,
              switches or [None], repacks or [0], _DENSE.value, _SWEEP_LAYER.value)
  unique = list({r.name: r for r in runs}.values())
  if not unique:
    raise app.UsageError("No run planned: give --methods, --ranks or --dense.")
  print(f"{len(unique)} runs in {out}")
  for i, run in enumerate(unique):
    print(f"[{i + 1}/{len(unique)}] {run.name}", flush=True)
    execute(run, out)
  datasets = data.get_datasets(config_of(unique[0]))
  fresh = []
  for run in unique:
    latency = run.seed == min(r.seed for r in unique) and run.label.split()[0] in (
        "dense", "kpd")
    fresh.append({**measure(run, out, datasets, latency), "epochs": _EPOCHS.value})
  study = merge(os.path.join(out, "study.json"), fresh,
                {m: invocation() for m in _MODELS.value})
  write_results(study, _RESULTS.value, _PLOTS_DIR.value, lr_dirs(out))
  print(f"wrote {_RESULTS.value} and {_PLOTS_DIR.value}/")


if __name__ == "__main__":
  app.run(main)
