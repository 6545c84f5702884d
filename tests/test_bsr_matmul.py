"""bsr_matmul: every implementation against a dense reference, forward and gradients.

Pallas kernels run in interpret mode on CPU; ``jax.export`` lowers them for TPU (Mosaic)
and CUDA (Triton) without the hardware. The C++ CPU kernels are compiled by the test
setup (``scripts/setup.sh``) or on first use.
"""
import contextlib
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsparse.kernels import bsr, cpu, ops, pallas_gpu

IMPLS = ["xla", "cpu", "pallas_tpu", "pallas_gpu"]
ROOT = pathlib.Path(__file__).resolve().parents[1]


def mask_empty_row_and_col():
  mask = np.ones((4, 3), bool)
  mask[1, :] = False  # an empty block row
  mask[:, 2] = False  # an empty block column
  mask[3, 0] = False
  return mask


CASES = {  # name: (block_shape, mask, nnz_max)
    "empty_row_and_col": ((8, 16), mask_empty_row_and_col(), 7),
    "full": ((8, 8), np.ones((2, 3), bool), 6),
    "single_block": ((16, 8), np.eye(1, 3, k=2, dtype=bool).repeat(3, 0) * [[0], [1], [0]], 4),
    "tall_blocks_padded": ((16, 4), np.array([[1, 0, 1, 1], [0, 1, 0, 0]], bool), 8),
    "all_empty": ((8, 8), np.zeros((2, 2), bool), 2),
}


def make(case, seed=0, dtype=jnp.float32):
  (bm, bn), mask, nnz_max = CASES[case]
  m1, n1 = mask.shape
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.standard_normal((m1 * bm, n1 * bn)), dtype)
  return bsr.from_dense(w, (bm, bn), nnz_max=nnz_max, mask=jnp.asarray(mask.astype(bool)))


def inputs(w, transpose, lead=(2, 3), seed=1, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  k, n = (w.shape[1], w.shape[0]) if transpose else w.shape
  x = jnp.asarray(rng.standard_normal((*lead, k)), dtype)
  ct = jnp.asarray(rng.standard_normal((*lead, n)), dtype)
  return x, ct


def loss_sparse(impl, transpose):
  def f(x, blocks, w, ct):
    y = ops.bsr_matmul(x, w.replace(blocks=blocks), transpose, impl=impl, interpret=True)
    return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32)), y
  return f


def loss_dense(transpose):
  def f(x, blocks, w, ct):
    d = w.with_blocks(blocks).to_dense().astype(jnp.float32)
    y = x.astype(jnp.float32) @ (d.T if transpose else d)
    return jnp.sum(y * ct.astype(jnp.float32)), y
  return f


def grads(f, x, w, ct):
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, w.blocks, w, ct)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("transpose", [False, True])
def test_matches_dense_forward_and_gradients(impl, case, transpose):
  w = make(case)
  x, ct = inputs(w, transpose)
  (_, y), (dx, dblocks) = grads(loss_sparse(impl, transpose), x, w, ct)
  (_, y_ref), (dx_ref, dblocks_ref) = grads(loss_dense(transpose), x, w, ct)
  assert y.shape == y_ref.shape and y.dtype == x.dtype
  chex.assert_trees_all_close((y, dx, dblocks), (y_ref, dx_ref, dblocks_ref),
                              atol=1e-4, rtol=1e-4)
  padding = np.arange(w.nnz_max) >= int(w.nnz)
  assert not np.any(np.asarray(dblocks)[padding]), "padding entries must get zero gradient"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("transpose", [False, True])
def test_bfloat16_accumulates_in_f32(impl, transpose):
  w = make("empty_row_and_col", dtype=jnp.bfloat16)
  x, ct = inputs(w, transpose, lead=(5,), dtype=jnp.bfloat16)
  (_, y), (dx, dblocks) = grads(loss_sparse(impl, transpose), x, w, ct)
  (_, y_ref), (dx_ref, dblocks_ref) = grads(loss_dense(transpose), x, w, ct)
  assert y.dtype == dx.dtype == dblocks.dtype == jnp.bfloat16
  scale = float(jnp.abs(y_ref).max())
  chex.assert_trees_all_close(y.astype(jnp.float32), y_ref, atol=0.02 * scale)
  chex.assert_trees_all_close(dx.astype(jnp.float32), dx_ref.astype(jnp.float32),
                              atol=0.02 * float(jnp.abs(dx_ref).max()))
  chex.assert_trees_all_close(dblocks.astype(jnp.float32), dblocks_ref.astype(jnp.float32),
                              atol=0.02 * float(jnp.abs(dblocks_ref).max()))


def test_mask_change_does_not_recompile():
  traces = []

  @jax.jit
  def step(x, w):
    traces.append(1)
    return jax.grad(lambda x, b: jnp.sum(ops.bsr_matmul(x, w.replace(blocks=b)) ** 2),
                    argnums=(0, 1))(x, w.blocks)

  rng = np.random.default_rng(0)
  dense = jnp.asarray(rng.standard_normal((32, 48)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((4, 32)), jnp.float32)
  for seed in range(3):
    mask = np.random.default_rng(seed).random((4, 3)) < 0.5
    w = bsr.from_dense(dense, (8, 16), nnz_max=8, mask=jnp.asarray(mask))
    dx, _ = step(x, w)
    d = np.asarray(w.to_dense())
    np.testing.assert_allclose(dx, 2 * (np.asarray(x) @ d) @ d.T, rtol=1e-4, atol=1e-4)
  assert len(traces) == 1 and step._cache_size() == 1


def test_dispatch_auto_and_fallback():
  w = make("full")
  assert jax.default_backend() == "cpu"
  assert ops.resolve_impl(None, w, jnp.float32) == "cpu"
  assert ops.resolve_impl("xla", w, jnp.float32) == "xla"
  assert ops.resolve_impl("cpu", w, jnp.int32) == "xla"
  # 8x8 blocks meet neither kernel's constraints: fall back unless interpreting.
  assert ops.resolve_impl("pallas_tpu", w, jnp.float32) == "xla"
  assert ops.resolve_impl("pallas_gpu", w, jnp.float32) == "xla"
  assert ops.resolve_impl("pallas_gpu", w, jnp.float32, interpret=True) == "pallas_gpu"
  big = bsr.from_dense(jnp.ones((256, 256)), (128, 128))
  assert ops.resolve_impl("pallas_tpu", big, jnp.float32) == "pallas_tpu"
  assert ops.resolve_impl("pallas_gpu", big, jnp.float32) == "pallas_gpu"


def test_process_setting_forces_an_implementation(monkeypatch):
  calls = []
  kernel = pallas_gpu.matmul
  monkeypatch.setattr(pallas_gpu, "matmul", lambda *a, **k: calls.append(1) or kernel(*a, **k))
  w = make("full")
  x = jnp.ones((3, w.shape[0]))
  ops.bsr_matmul(x, w)
  assert not calls
  with ops.use_impl("pallas_gpu", interpret=True):
    np.testing.assert_allclose(ops.bsr_matmul(x, w), x @ w.to_dense(), rtol=1e-5, atol=1e-5)
  assert len(calls) == 1
  ops.bsr_matmul(x, w)
  assert len(calls) == 1
  with pytest.raises(ValueError, match="unknown bsr_matmul impl 'cuda'"):
    ops.set_impl("cuda")


@pytest.mark.parametrize("block_shape,lead", [((7, 29), (300,)), ((32, 16), (3, 70))])
def test_cpu_kernel_tiles_and_tails(block_shape, lead):
  """Row tiles (6, split 7-9 rows), 16/8/4/1-wide column chunks, several row ranges and
  depth tiles of the weight gradient (more than 256 rows of x)."""
  bm, bn = block_shape
  mask = np.random.default_rng(3).random((3, 4)) < 0.6
  w = bsr.from_dense(jnp.asarray(np.random.default_rng(4).standard_normal((3 * bm, 4 * bn)),
                                 jnp.float32), block_shape, nnz_max=12, mask=jnp.asarray(mask))
  for transpose in (False, True):
    x, ct = inputs(w, transpose, lead=lead)
    (_, y), (dx, dblocks) = grads(loss_sparse("cpu", transpose), x, w, ct)
    (_, y_ref), (dx_ref, dblocks_ref) = grads(loss_dense(transpose), x, w, ct)
    chex.assert_trees_all_close((y, dx, dblocks), (y_ref, dx_ref, dblocks_ref),
                                rtol=1e-4, atol=1e-3)


def test_cpu_kernel_rejects_out_of_range_blocks():
  w = make("full")
  bad = w.replace(rows=w.rows.at[0].set(5))
  with pytest.raises(Exception, match="block index out of range"):
    jax.block_until_ready(ops.bsr_matmul(jnp.ones((2, w.shape[0])), bad, impl="cpu"))


def test_cpu_kernels_fall_back_without_a_compiler(monkeypatch, tmp_path):
  monkeypatch.setenv("BSPARSE_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  with pytest.raises(cpu.BuildError, match="compiling cpu_kernels.cc failed"):
    cpu.build()
  assert not list(tmp_path.glob("*.so"))
  monkeypatch.setattr(cpu, "available", lambda: False)
  w = make("full")
  assert ops.resolve_impl(None, w, jnp.float32) == "xla"
  x = jnp.ones((3, w.shape[0]))
  np.testing.assert_allclose(ops.bsr_matmul(x, w), x @ w.to_dense(), rtol=1e-5, atol=1e-5)


def test_shape_mismatch_is_an_error():
  w = make("full")
  with pytest.raises(ValueError, match="x has 17 features"):
    ops.bsr_matmul(jnp.ones((2, 17)), w)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows", [12, 10])  # 12 split over 4 devices; 10 cannot be
def test_split_batch_runs_each_device_on_its_rows(impl, rows):
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,))
  w = make("empty_row_and_col")
  x, ct = inputs(w, False, lead=(rows,))
  on_rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  x, ct = (jax.device_put(v, on_rows) if rows % 4 == 0 else v for v in (x, ct))
  f = jax.value_and_grad(loss_sparse(impl, False), argnums=(0, 1), has_aux=True)

  def split(*args):
    with ops.split_batch(mesh, "data"):
      return f(*args)

  step = jax.jit(split)
  (_, y), (dx, dblocks) = step(x, w.blocks, w, ct)
  (_, y_ref), (dx_ref, dblocks_ref) = grads(loss_dense(False), x, w, ct)
  chex.assert_trees_all_close((y, dx, dblocks), (y_ref, dx_ref, dblocks_ref),
                              atol=1e-4, rtol=1e-4)
  hlo = step.lower(x, w.blocks, w, ct).compile().as_text()
  # Split: the block gradient is summed over devices, no device sees all rows of x.
  assert ("all-gather" not in hlo and "all-reduce" in hlo) == (rows % 4 == 0)


def export_text(impl, platform, block_shape, dtype, transpose=False, mesh=None):
  """The module of a value-and-grad step lowered for ``platform``; with ``mesh``, ``x``'s
  rows are sharded over its ``data`` axis and the step traced under ``split_batch``."""
  rng = np.random.default_rng(0)
  (bm, bn), grid = block_shape, (2, 3)
  mask = jnp.asarray(rng.random(grid) < 0.6)
  w = bsr.from_dense(jnp.ones((grid[0] * bm, grid[1] * bn), dtype), block_shape,
                     nnz_max=5, mask=mask)
  k = w.shape[1] if transpose else w.shape[0]
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")) if mesh else None
  x = jax.ShapeDtypeStruct((256, k), dtype, sharding=rows)

  def step(x, w):
    f = lambda x, b: jnp.sum(  # noqa: E731
        ops.bsr_matmul(x, w.replace(blocks=b), transpose, impl=impl).astype(jnp.float32))
    return jax.value_and_grad(f, argnums=(0, 1))(x, w.blocks)

  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  with ops.split_batch(mesh, "data") if mesh else contextlib.nullcontext():
    exported = jax.export.export(jax.jit(step), platforms=[platform],
                                 disabled_checks=checks)(x, w)
  assert exported.nr_devices == (mesh.size if mesh else 1)
  return exported.mlir_module()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("transpose", [False, True])
def test_pallas_tpu_lowers_for_tpu(dtype, transpose):
  text = export_text("pallas_tpu", "tpu", (128, 256), dtype, transpose)
  assert text.count("tpu_custom_call") == 3  # forward, dx, dW


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("transpose", [False, True])
def test_pallas_gpu_lowers_for_cuda(dtype, transpose):
  text = export_text("pallas_gpu", "cuda", (32, 64), dtype, transpose)
  assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dx, dW


@pytest.mark.parametrize("impl,platform,block_shape,call", [
    ("pallas_tpu", "tpu", (128, 256), "tpu_custom_call"),
    ("pallas_gpu", "cuda", (32, 64), "__gpu$xla.gpu.triton")])
def test_split_batch_lowers_for_each_device_of_a_tpu_or_gpu_mesh(impl, platform, block_shape,
                                                                 call):
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,))
  text = export_text(impl, platform, block_shape, jnp.float32, mesh=mesh)
  assert text.count(call) == 3  # forward, dx, dW: once, inside the per-device body
  # Each device multiplies its own 64 rows; only the block gradient crosses devices.
  assert "all_gather" not in text and text.count("all_reduce") == 1


def test_benchmark_prints_both_cpu_paths_beside_dense(tmp_path):
  out = tmp_path / "table.md"
  cmd = [sys.executable, "-m", "benchmarks.bsr_matmul", "--m=8", "--kn=64", "--blocks=16",
         "--densities=0.25", "--dtypes=float32", "--rounds=1", "--max_tries=1",
         "--min_round_ms=0", f"--out={out}"]
  subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=300)
  cells = [r.split("|")[1:-1] for r in out.read_text().splitlines()
           if r.startswith("| 8 | 64 |")]
  timings = [c for c in cells if len(c) == 14]  # the break-even rows have 5 cells
  assert [c[3].strip() for c in timings] == ["fwd", "fwd+bwd"]
  for c in timings:
    dense_ms, bsr_ms, xla_ms = (float(c[i]) for i in (6, 7, 8))
    assert min(dense_ms, bsr_ms, xla_ms) > 0
