"""Dropping losing block-size candidates from params, optimizer state and config."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bsparse import selection, sparsity
from tests.test_sparsity import two_candidates


def test_prune_tree_removes_dead_terms_everywhere():
  params = two_candidates(jax.random.key(0))
  params["fc1"]["kron_6x5"]["S"] = 0.01 * params["fc1"]["kron_6x5"]["S"]
  tx = optax.chain(optax.adam(1e-3), sparsity.block_sparsity(
      lam=lambda t: 0.0, lr=lambda t: 1.0, lr_peak=1.0, select_step=0))
  state = tx.init(params)
  updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  params = optax.apply_updates(params, updates)
  dead = selection.dead_terms(state)
  assert dead == [("fc1", "kron_6x5")]
  params2, state2 = selection.prune_tree(params, dead), selection.prune_tree(state, dead)
  assert set(params2["fc1"]) == {"kron_3x2"}
  adam = state2[0][0]
  assert set(adam.mu["fc1"]) == {"kron_3x2"} and set(adam.nu["fc1"]) == {"kron_3x2"}
  sp = sparsity.sparsity_state(state2)
  assert set(sp.masks) == {"fc1/kron_3x2"} and set(sp.alive) == {"fc1/kron_3x2"}
  assert selection.block_shapes(params2) == {"fc1": ((3, 2),)}
  # The pruned state keeps working with the pruned params.
  grads = jax.tree.map(jnp.ones_like, params2)
  updates, _ = tx.update(grads, state2, params2)
  assert np.all(np.isfinite(np.asarray(updates["fc1"]["kron_3x2"]["A"])))
