"""Host and accelerator memory of the training process, logged beside its metrics.

``memory/rss_mb`` and ``memory/peak_rss_mb`` are the process's resident set now and its
high-water mark (Linux ``/proc/self/status``; elsewhere only the peak, from ``getrusage``).
``memory/device_mb`` and ``memory/device_peak_mb`` are what the first local device reports
in use (GPU and TPU; XLA:CPU reports nothing). All in MB (2**20 bytes).

``release_freed`` gives the heap memory the process has freed back to the operating
system. XLA's compiler frees its working memory once a program is built, but glibc keeps
the freed pages in its arenas, and on XLA:CPU that residue was most of the process's
growth: building the KPD CNN's train step raised RSS by 128 MB (the dense CNN's by 57 MB),
and ``malloc_trim`` right after gave back 146 MB (that build's residue and earlier ones).

``forget_programs`` drops the programs a run no longer calls when it starts a new one.

``configure_malloc`` keeps glibc from holding freed memory in the first place (the
config's ``host_malloc``). By default glibc gives each thread that allocates under
contention its own arena, up to 8 per core, and serves a block from the heap rather than
from ``mmap`` once a block of that size has been freed (its threshold adapts upward, to
32 MB), so freed buffers stay resident. XLA:CPU compiles on several threads and allocates
and frees its large buffers on every step. On the KPD CNN (2 cores), two arenas lowered
the compile of its first train step from 646-689 to 582-613 MB of peak RSS, and a fixed
128 kB threshold (the CNN configs' setting) stops its growth during training. The default
keeps glibc's adaptive threshold: mapping each step's buffers afresh made the rank-32
MLP's short steps 2.4x slower.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import resource
import sys

import jax

_MB = 2.0**20


def _proc_status_kb(*fields: str) -> dict[str, float] | None:
  """``fields`` of ``/proc/self/status`` in kB, or None where there is no such file."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      lines = f.read().splitlines()
  except OSError:
    return None
  out = {}
  for line in lines:
    key, _, value = line.partition(":")
    if key in fields:
      out[key] = float(value.split()[0])
  return out


def host_scalars() -> dict[str, float]:
  """The process's resident set and its peak so far, in MB."""
  status = _proc_status_kb("VmRSS", "VmHWM")
  if status and len(status) == 2:
    return {"memory/rss_mb": status["VmRSS"] / 1024,
            "memory/peak_rss_mb": status["VmHWM"] / 1024}
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, kB elsewhere
  return {"memory/peak_rss_mb": peak / (_MB if sys.platform == "darwin" else 1024)}


def device_scalars(device: jax.Device | None = None) -> dict[str, float]:
  """Bytes in use and their peak on ``device`` (default: the first local one), in MB;
  empty where the backend keeps no such account (XLA:CPU)."""
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() or {}
  out = {}
  if "bytes_in_use" in stats:
    out["memory/device_mb"] = stats["bytes_in_use"] / _MB
  if "peak_bytes_in_use" in stats:
    out["memory/device_peak_mb"] = stats["peak_bytes_in_use"] / _MB
  return out


def scalars() -> dict[str, float]:
  """Host and device memory, for one row of the training log."""
  return {**host_scalars(), **device_scalars()}


@functools.cache
def _glibc(name: str):
  """glibc's function ``name``, or None where the C library has none (macOS, Windows)."""
  try:
    return getattr(ctypes.CDLL(None), name)
  except (AttributeError, OSError, TypeError):
    return None


def release_freed() -> bool:
  """Returns the pages of freed heap memory to the operating system (``malloc_trim(0)``
  in every arena); True if any were returned. A no-op without glibc."""
  trim = _glibc("malloc_trim")
  return bool(trim(0)) if trim is not None else False


# mallopt parameters (glibc's malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# glibc refuses thresholds above HEAP_MAX_SIZE / 2 (64-bit).
MAX_MMAP_THRESHOLD_KB = 32 * 1024


def configure_malloc(arena_max: int, mmap_threshold_kb: int) -> bool:
  """Sets glibc's malloc for this process (``mallopt``); True if every setting took.

  ``arena_max`` caps the number of malloc arenas (0 keeps glibc's 8 per core); threads
  share them instead of each keeping its own freed memory. ``mmap_threshold_kb`` fixes the
  size from which blocks come from ``mmap`` and go straight back to the operating system
  on ``free`` (-1 keeps glibc's adaptive threshold). Takes full effect when called before
  the process starts its threads (JAX starts its own when the backend initialises); a
  no-op returning False without glibc.
  """
  mallopt = _glibc("mallopt")
  if mallopt is None:
    return False
  took = True
  if arena_max > 0:
    took &= bool(mallopt(_M_ARENA_MAX, arena_max))
  if mmap_threshold_kb >= 0:
    took &= bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold_kb * 1024))
  return took


def forget_programs() -> None:
  """Drops every program JAX has traced or compiled so far (``jax.clear_caches``) and
  returns the memory that frees. Meant for when a run moves to a new program: model init,
  the factored steps before a switch to block-sparse form and the helpers that ran on
  them are not called again, yet their executables and traces held tens of MB. Whatever
  is still called is compiled again on its next call."""
  jax.clear_caches()
  gc.collect()
  release_freed()
