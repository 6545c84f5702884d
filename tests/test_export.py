"""A trained-looking KPD model served factored, block-sparse and dense gives one function."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsparse import export, layers, models


def sparsify(variables, key):
  """Zeroes about half of every selector, like a trained mask."""
  def visit(node):
    if isinstance(node, dict):
      if "S" in node:
        s = node["S"]
        keep = jax.random.uniform(jax.random.fold_in(key, s.size), s.shape) < 0.5
        return {**node, "S": jnp.where(keep, s * 1.5, 0.0)}
      return {k: visit(v) for k, v in node.items()}
    return node
  return {**variables, "params": visit(variables["params"])}


@pytest.mark.parametrize("name,kwargs,shape,blocks", [
    ("mlp", {"hidden": (40, 20)}, (28, 28, 1), {"fc1": (28, 10), "fc2": (10, 10)}),
    ("cnn", {"features": (8, 16), "hidden": 32}, (28, 28, 1), {"conv2": (4, 4), "fc1": (16, 8)}),
])
def test_serving_forms_agree(name, kwargs, shape, blocks):
  factory = layers.LayerFactory(kind="kpd", rank=2, block_shapes=blocks,
                                dense_layers=("conv1", "head"))
  model = models.create_model(name, factory, 10, **kwargs)
  x = jax.random.normal(jax.random.key(0), (3, *shape))
  variables = sparsify(model.init(jax.random.key(1), x), jax.random.key(2))
  forms = export.serving_forms(model, variables)
  ref = model.apply(variables, x)
  for form in ("bsr", "dense"):
    m, v = forms[form]
    chex.assert_trees_all_close(m.apply(v, x), ref, atol=2e-4, rtol=2e-4)
  assert export.latency_ms(*forms["bsr"], x, repeats=2) > 0
  # The block-sparse form stores only the kept blocks.
  fc1 = forms["bsr"][1]["params"]["fc1"]["blocks"]
  s = variables["params"]["fc1"][f"kron_{blocks['fc1'][0]}x{blocks['fc1'][1]}"]["S"]
  assert fc1.shape[0] == int((np.asarray(s) != 0).sum())


def test_save_blocks_writes_the_nonzero_blocks(tmp_path):
  factory = layers.LayerFactory(kind="kpd", rank=2, block_shapes={"fc1": (28, 10)},
                                dense_layers=("head",))
  model = models.create_model("mlp", factory, 10, hidden=(40,))
  variables = sparsify(model.init(jax.random.key(1), jnp.zeros((1, 28, 28, 1))),
                       jax.random.key(3))
  export.save_blocks(variables["params"], str(tmp_path / "blocks.npz"))
  saved = np.load(tmp_path / "blocks.npz")
  s = np.asarray(variables["params"]["fc1"]["kron_28x10"]["S"])
  assert saved["fc1/kron_28x10/blocks"].shape == ((s != 0).sum(), 28, 10)
  np.testing.assert_array_equal(s[saved["fc1/kron_28x10/rows"], saved["fc1/kron_28x10/cols"]] != 0,
                                True)
