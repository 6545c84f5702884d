"""Process and device memory in the training log (bsparse/memory.py)."""
import subprocess
import sys

import jax
import numpy as np
import pytest

from bsparse import memory, train_lib, validate


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


@pytest.mark.skipif(memory._glibc("malloc_trim") is None, reason="needs glibc's malloc_trim")
def test_release_freed_returns_the_pages_of_freed_small_blocks():
  blobs = [bytes(1000) + bytes([i % 256]) for i in range(100_000)]  # ~100 MB of malloc'd blocks
  last = blobs[-1]  # holds the top of the heap, so free() alone cannot shrink it
  during = memory.host_scalars()["memory/rss_mb"]
  del blobs
  assert memory.host_scalars()["memory/rss_mb"] > during - 20  # freed, but still resident
  assert memory.release_freed()
  assert memory.host_scalars()["memory/rss_mb"] < during - 80
  assert last[-1] == 99_999 % 256


_FREED_BLOCKS = """
import sys
import numpy as np
from bsparse import memory
if sys.argv[1] == "fixed":
  assert memory.configure_malloc(arena_max=2, mmap_threshold_kb=128)
rss = lambda: memory.host_scalars()["memory/rss_mb"]
np.ones(2**20)  # 8 MB, mmapped and freed: glibc's adaptive threshold rises to 8 MB
before = rss()
blocks, pins = [], []
for _ in range(64):
  blocks.append(np.ones(2**17))  # 1 MB
  pins.append(np.ones(2**12))  # 32 kB above it: the heap cannot shrink past these
del blocks
print(rss() - before)
"""


@pytest.mark.skipif(memory._glibc("mallopt") is None or not sys.platform.startswith("linux"),
                    reason="needs glibc's mallopt and /proc/self/status")
def test_a_fixed_mmap_threshold_returns_freed_buffers_that_glibc_would_keep():
  def kept_mb(mode):
    out = subprocess.run([sys.executable, "-c", _FREED_BLOCKS, mode], check=True,
                         capture_output=True, text=True)
    return float(out.stdout.split()[-1])

  assert kept_mb("adaptive") > 48  # served from the heap, and freed there
  assert kept_mb("fixed") < 16  # each 1 MB block mmapped, and unmapped on free


def test_malloc_settings_are_checked_before_anything_runs(monkeypatch):
  from configs import base
  calls = []
  monkeypatch.setattr(memory, "configure_malloc", lambda **kw: calls.append(kw))
  c = base.get_config()
  c.host_malloc.arena_max = 3
  train_lib.configure_host(c)
  assert calls == [{"arena_max": 3, "mmap_threshold_kb": -1}]
  c.host_malloc.arena_max = -1
  c.host_malloc.mmap_threshold_kb = 64 * 1024
  with pytest.raises(validate.ConfigError) as e:
    train_lib.configure_host(c)
  assert "config.host_malloc.arena_max = -1: must be >= 0" in str(e.value)
  assert "config.host_malloc.mmap_threshold_kb = 65536: must be in [-1, 32768]" in str(e.value)
  assert len(calls) == 1  # nothing applied


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
