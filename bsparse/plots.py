"""PNG plots of a run: block masks per layer and density / accuracy trajectories."""
from __future__ import annotations

import math
import os

import flax.traverse_util as tu
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bsparse import kron, metric_writers, sparsity  # noqa: E402


def plot_masks(params, path: str) -> str | None:
  """One panel per KPD term: block norms ``|S_ij| * ||sum_k A_kij B_k||`` (0 = pruned)."""
  flat = tu.flatten_dict(params)
  terms = sparsity.term_paths(params)
  if not terms:
    return None
  cols = min(4, len(terms))
  rows = math.ceil(len(terms) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
  for ax, term in zip(axes.flat, terms):
    s, a, b = (np.asarray(flat[term + (k,)]) for k in "SAB")
    norms = np.asarray(kron.block_norms(s, a, b))
    ax.imshow(np.where(s != 0, norms, np.nan), cmap="viridis", interpolation="nearest",
              aspect="auto")
    ax.set_title(f"{'/'.join(term)}\nblocks {b.shape[1]}x{b.shape[2]}, "
                 f"density {np.mean(s != 0):.2f}", fontsize=8)
    ax.set_xlabel("output block")
    ax.set_ylabel("input block")
  for ax in list(axes.flat)[len(terms):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _plot_series(ax, rows, keys, prefix: str) -> None:
  for k in keys:
    pts = [(r["step"], r[k]) for r in rows if k in r and "train/loss" in r]
    if pts:
      ax.plot(*zip(*pts), label=k.removeprefix(prefix))
  if keys:
    ax.legend(fontsize=7)


def plot_trajectories(workdir: str, path: str) -> str | None:
  """Block density per layer, each block-size candidate's share of its layer's weight norm
  (when a layer has several) and validation accuracy, against the step."""
  rows = metric_writers.read_metrics(workdir)
  if not rows:
    return None
  keys = {p: sorted({k for r in rows for k in r if k.startswith(p)})
          for p in ("density/", "share/")}
  panels = 3 if keys["share/"] else 2
  fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
  _plot_series(axes[0], rows, keys["density/"], "density/")
  axes[0].set(xlabel="step", ylabel="block density", title="density per layer")
  if keys["share/"]:
    _plot_series(axes[1], rows, keys["share/"], "share/")
    axes[1].set(xlabel="step", ylabel="share of the layer's weight norm",
                title="block-size candidates")
  for key in ("val/accuracy", "train/accuracy"):
    pts = [(r["step"], r[key]) for r in rows if key in r]
    if pts:
      axes[-1].plot(*zip(*pts), label=key)
  axes[-1].set(xlabel="step", ylabel="accuracy", title="accuracy")
  axes[-1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_run(workdir: str, params) -> list[str]:
  out = [plot_masks(params, os.path.join(workdir, "masks.png")),
         plot_trajectories(workdir, os.path.join(workdir, "trajectories.png"))]
  return [p for p in out if p]
