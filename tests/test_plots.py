"""The PNGs a run writes: block masks per KPD term and the trajectories."""
import json

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np

from bsparse import layers, plots


def _plot_masks(params, path):
  return plots.plot_block_norms(plots.block_norms(params), path)


def _kpd_params(zero_rows: int):
  layer = layers.KronDense(12, block_shapes=((2, 3), (4, 4)), rank=2)
  params = jax.tree.map(np.array, layer.init(jax.random.key(0), jnp.zeros((1, 8)))["params"])
  params["kron_2x3"]["S"][:zero_rows] = 0.0  # pruned blocks: blank in the plot
  return params


def test_plot_masks_draws_one_panel_per_term_with_pruned_blocks_blank(tmp_path):
  path = str(tmp_path / "masks.png")
  assert _plot_masks(_kpd_params(zero_rows=2), path) == path
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 200  # two panels
  # The blank (NaN) blocks are drawn in the background colour: the pruned plot is whiter.
  whiteness = lambda img: float(np.mean(img[..., :3] > 0.99))
  dense = str(tmp_path / "dense.png")
  _plot_masks(_kpd_params(zero_rows=0), dense)
  assert whiteness(image) > whiteness(matplotlib.image.imread(dense)) + 0.01


def test_plot_masks_skips_models_without_kpd_terms(tmp_path):
  params = {"dense": {"kernel": np.ones((4, 4)), "bias": np.zeros(4)}}
  assert _plot_masks(params, str(tmp_path / "masks.png")) is None
  assert not (tmp_path / "masks.png").exists()


def test_plot_run_writes_masks_and_trajectories(tmp_path):
  rows = [{"step": s, "train/loss": 1.0 / s, "train/accuracy": 0.5, "density/fc1/kron_2x3":
           1.0 - s / 10, "share/fc1/kron_2x3": 0.5} for s in range(1, 6)]
  rows.append({"step": 5, "val/accuracy": 0.7})
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  written = plots.plot_run(str(tmp_path), _kpd_params(zero_rows=1))
  assert sorted(p.rsplit("/", 1)[-1] for p in written) == ["masks.png", "trajectories.png"]
  assert matplotlib.image.imread(written[1]).shape[1] > 3 * 400  # three panels with shares


def test_a_switched_run_draws_the_masks_it_saved_at_the_switch(tmp_path):
  kpd = _kpd_params(zero_rows=2)
  saved = str(tmp_path / plots.SWITCH_NORMS)
  plots.save_block_norms(kpd, saved)
  norms, want = plots.load_block_norms(saved), plots.block_norms(kpd)
  assert norms.keys() == want.keys() == {"kron_2x3", "kron_4x4"}
  for name, (grid, block) in want.items():
    np.testing.assert_array_equal(norms[name][0], grid)  # NaN where pruned, in place
    assert norms[name][1] == block
  assert np.isnan(norms["kron_2x3"][0][:2]).all() and not np.isnan(norms["kron_4x4"][0]).any()
  # After the switch the parameters hold no KPD terms: the saved norms are drawn instead.
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 1.0, "train/accuracy": 0.5}) + "\n")
  bsr_params = {"fc1": {"blocks": np.ones((3, 2, 3)), "bias": np.zeros(12)}}
  written = plots.plot_run(str(tmp_path), bsr_params)
  assert sorted(p.rsplit("/", 1)[-1] for p in written) == ["masks.png", "trajectories.png"]
  image = matplotlib.image.imread(written[0])
  assert image.shape[1] > 400  # two panels


def test_a_run_without_kpd_terms_or_saved_norms_draws_no_masks(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 1.0, "train/accuracy": 0.5}) + "\n")
  written = plots.plot_run(str(tmp_path), {"dense": {"kernel": np.ones((4, 4))}})
  assert [p.rsplit("/", 1)[-1] for p in written] == ["trajectories.png"]
