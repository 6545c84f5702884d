r"""Each method at its own learning rate, chosen on validation accuracy, across studies.

  python -m benchmarks.lr_choice runs/study runs/study_lr5e-3 runs/study_lr1e-2
  python -m benchmarks.lr_choice --no_base runs/study_lr5e-3 runs/study_lr1e-2

Reads the ``study.json`` of every study directory given (studies that differ only in
``--override=optimizer.learning_rate=...``), groups the runs by model, method and target
density and budget (epochs), and for each group prints every learning rate's mean final
validation accuracy and test accuracy (mean ± std over seeds), marking the learning rate
with the best mean validation accuracy: the one a tuned comparison reports. Test accuracy
plays no part in the choice. The first directory is the study at the configs' rate: its
groups that no other directory runs are left out (nothing was tuned); a group the other
directories run at one rate only is reported at that rate, marked so. With ``--no_base``
first, every directory counts as a learning-rate study (each method run only at the rate
chosen earlier, say, is reported at that rate). Within a group only
the seeds every learning rate has are compared. ``benchmarks/study.py --lr_studies=...``
writes this table and the study's tables at the chosen rates into ``RESULTS.md``.
"""
from __future__ import annotations

import collections
import json
import os
import statistics
import sys

from bsparse import checkpoints, metric_writers


def final_val_accuracy(workdir: str) -> float:
  vals = [r["val/accuracy"] for r in metric_writers.read_metrics(workdir)
          if "val/accuracy" in r]
  if not vals:
    raise SystemExit(f"{workdir}: no validation accuracy logged (dataset.val_size = 0?).")
  return vals[-1]


def has_study(out: str) -> bool:
  return os.path.exists(os.path.join(out, "study.json"))


def read_study(out: str) -> dict:
  """A study directory's ``study.json``: ``{'runs': {name: run}, 'invocations': ...}``."""
  path = os.path.join(out, "study.json")
  if not has_study(out):
    raise SystemExit(f"{path} does not exist: is {out} a study's --out directory?")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def collect(out_dirs: list[str], base: bool = True) -> dict:
  """``{(model, epochs, label, target): {lr: [run, ...]}}`` of the groups the studies after
  the first run (every study's, without a ``base``): each run is its ``study.json`` record
  with ``lr`` and ``val`` (final validation accuracy) added."""
  groups = collections.defaultdict(lambda: collections.defaultdict(list))
  tuned = set()
  for i, out in enumerate(out_dirs):
    for r in read_study(out)["runs"].values():
      workdir = os.path.join(out, r["run"])
      lr = checkpoints.load_config(workdir).optimizer.learning_rate
      key = (r["model"], r["epochs"], r["label"], r["target"])
      groups[key][lr].append({**r, "lr": lr, "val": final_val_accuracy(workdir)})
      if i or not base:
        tuned.add(key)
  return {k: v for k, v in groups.items() if k in tuned}


def compared(by_lr: dict) -> dict:
  """``{lr: runs}`` restricted to the seeds every learning rate has, sorted by seed."""
  seeds = set.intersection(*({r["seed"] for r in rs} for rs in by_lr.values()))
  return {lr: sorted((r for r in rs if r["seed"] in seeds), key=lambda r: r["seed"])
          for lr, rs in by_lr.items()}


def best_lr(by_lr: dict) -> float:
  """The learning rate with the best mean final validation accuracy, of ``compared`` runs."""
  return max(by_lr, key=lambda lr: statistics.mean(r["val"] for r in by_lr[lr]))


def chosen_runs(groups: dict) -> list[dict]:
  """The runs of every group at the group's chosen rate."""
  out = []
  for by_lr in groups.values():
    by_lr = compared(by_lr)
    out += by_lr[best_lr(by_lr)]
  return out


def _pm(values) -> str:
  values = [100 * v for v in values]
  sd = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def table(groups: dict) -> str:
  rows = ["| model | epochs | method | target density | learning rate | seeds "
          "| val accuracy % | test accuracy % | chosen |", "|" + "---|" * 9]
  for (model, epochs, label, target), by_lr in sorted(groups.items()):
    by_lr = compared(by_lr)
    best = best_lr(by_lr)
    mark = "**yes**" if len(by_lr) > 1 else "the only rate run"
    for lr, rs in sorted(by_lr.items()):
      rows.append(f"| {model} | {epochs:g} | {label} | {target:g} | {lr:g} | {len(rs)} "
                  f"| {_pm([r['val'] for r in rs])} | {_pm([r['accuracy'] for r in rs])} "
                  f"| {mark if lr == best else ''} |")
  return "\n".join(rows)


def main(argv: list[str]) -> None:
  base = "--no_base" not in argv
  dirs = [a for a in argv[1:] if a != "--no_base"]
  if not dirs:
    raise SystemExit(__doc__)
  print(table(collect(dirs, base)))


if __name__ == "__main__":
  main(sys.argv)
