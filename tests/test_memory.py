"""Process and device memory in the training log (bsparse/memory.py)."""
import sys

import jax
import numpy as np
import pytest

from bsparse import memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_host_scalars_follow_an_allocation():
  before = memory.host_scalars()
  block = np.ones(64 * 2**20 // 8)  # 64 MB, every page written
  during = memory.host_scalars()
  assert during["memory/rss_mb"] - before["memory/rss_mb"] > 48
  assert during["memory/peak_rss_mb"] >= during["memory/rss_mb"]
  del block
  after = memory.host_scalars()
  assert after["memory/rss_mb"] < during["memory/rss_mb"] - 48  # freed: large blocks are mmapped
  # The kernel's RSS counters are per-thread and folded in lazily: 1 MB of slack.
  assert after["memory/peak_rss_mb"] > during["memory/rss_mb"] - 1


@pytest.mark.skipif(memory._malloc_trim() is None, reason="needs glibc's malloc_trim")
def test_release_freed_returns_the_pages_of_freed_small_blocks():
  blobs = [bytes(1000) + bytes([i % 256]) for i in range(100_000)]  # ~100 MB of malloc'd blocks
  last = blobs[-1]  # holds the top of the heap, so free() alone cannot shrink it
  during = memory.host_scalars()["memory/rss_mb"]
  del blobs
  assert memory.host_scalars()["memory/rss_mb"] > during - 20  # freed, but still resident
  assert memory.release_freed()
  assert memory.host_scalars()["memory/rss_mb"] < during - 80
  assert last[-1] == 99_999 % 256


class _Device:

  def __init__(self, stats):
    self._stats = stats

  def memory_stats(self):
    return self._stats


def test_device_scalars_in_mb_and_empty_without_an_account():
  got = memory.device_scalars(_Device({"bytes_in_use": 3 * 2**20, "peak_bytes_in_use": 2**22}))
  assert got == {"memory/device_mb": 3.0, "memory/device_peak_mb": 4.0}
  assert memory.device_scalars(_Device(None)) == {}


def test_forget_programs_drops_compiled_programs_and_they_still_run():
  traces = []

  @jax.jit
  def double(x):
    traces.append(x.shape)  # runs only when JAX traces the function anew
    return 2 * x

  for _ in range(2):
    np.testing.assert_array_equal(double(np.arange(3.0)), [0.0, 2.0, 4.0])
  assert len(traces) == 1
  memory.forget_programs()
  np.testing.assert_array_equal(double(np.arange(3.0)), [0.0, 2.0, 4.0])
  assert len(traces) == 2  # traced and built again
