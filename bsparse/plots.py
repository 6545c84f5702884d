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


def block_norms(params) -> dict[str, tuple[np.ndarray, tuple[int, int]]]:
  """Per KPD term (its ``/``-joined path): the ``(m1, n1)`` block norms
  ``|S_ij| * ||sum_k A_kij B_k||``, NaN where ``S`` is zero (a pruned block), and the
  block shape ``(m2, n2)``."""
  flat = tu.flatten_dict(params)
  out = {}
  for term in sparsity.term_paths(params):
    s, a, b = (np.asarray(flat[term + (k,)]) for k in "SAB")
    norms = np.asarray(kron.block_norms(s, a, b), np.float32)
    out["/".join(term)] = (np.where(s != 0, norms, np.nan), tuple(b.shape[1:]))
  return out


def save_block_norms(params, path: str) -> None:
  """Writes ``block_norms(params)`` to an ``.npz`` file (atomically), for ``plot_run`` to
  draw once the run ends."""
  arrays = {}
  for name, (norms, block) in block_norms(params).items():
    arrays[f"norms/{name}"], arrays[f"block/{name}"] = norms, np.asarray(block)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def load_block_norms(path: str) -> dict[str, tuple[np.ndarray, tuple[int, int]]]:
  """What ``save_block_norms`` wrote."""
  with np.load(path) as data:
    names = [k.removeprefix("norms/") for k in data.files if k.startswith("norms/")]
    return {n: (data[f"norms/{n}"], tuple(int(v) for v in data[f"block/{n}"])) for n in names}


def plot_block_norms(norms: dict, path: str) -> str | None:
  """One panel per KPD term of ``block_norms``' output (blank = pruned block); None when
  there are none."""
  if not norms:
    return None
  cols = min(4, len(norms))
  rows = math.ceil(len(norms) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
  for ax, (name, (grid, block)) in zip(axes.flat, norms.items()):
    ax.imshow(grid, cmap="viridis", interpolation="nearest", aspect="auto")
    ax.set_title(f"{name}\nblocks {block[0]}x{block[1]}, "
                 f"density {np.mean(~np.isnan(grid)):.2f}", fontsize=8)
    ax.set_xlabel("output block")
    ax.set_ylabel("input block")
  for ax in list(axes.flat)[len(norms):]:
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


SWITCH_NORMS = "masks.npz"


def plot_run(workdir: str, params) -> list[str]:
  """``masks.png`` and ``trajectories.png`` in ``workdir``. The masks are those of
  ``params`` or, once a run has switched to block-sparse form (no KPD terms left), the
  block norms it saved at the switch (``SWITCH_NORMS``)."""
  norms = block_norms(params)
  saved = os.path.join(workdir, SWITCH_NORMS)
  if not norms and os.path.exists(saved):
    norms = load_block_norms(saved)
  out = [plot_block_norms(norms, os.path.join(workdir, "masks.png")),
         plot_trajectories(workdir, os.path.join(workdir, "trajectories.png"))]
  return [p for p in out if p]
