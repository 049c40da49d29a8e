"""Keeping a CPU worker's memory flat under batches of ever-changing shapes.

Every batch allocates activations of a new shape. Measured on MiniLM in bfloat16 over 150
batches of 8-64 texts of 16-256 tokens: resident memory climbed from 0.35 to 2.1 GB, although
the model holds 90 MB. Two causes, two remedies:

- oneDNN caches a compiled primitive per shape (1,024 by default) and a padded batch rarely
  repeats a shape. Capped at 128 entries, resident memory ended at 1.7 GB at the same speed;
  at 16 it ended at 1.3 GB but one-query latency over HTTP rose from 0.6x to 0.9x of
  SentenceTransformer's (the few shapes of short queries no longer stayed cached), so 128.
- glibc keeps freed heap memory for reuse, fragmented by the varying sizes. Returning it
  (malloc_trim) took the worker back to 0.6 GB but costs about 10 ms, which is too much after
  every batch (20% of the throughput) and nothing when the worker has been idle: it is done
  then, and under sustained load every few seconds. Making large blocks mmap'ed instead
  (MALLOC_MMAP_THRESHOLD_) halved the throughput: every batch pays for fresh zeroed pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from collections.abc import Callable

ONEDNN_CACHE_ENTRIES = "128"


def cap_primitive_cache() -> None:
    """Before torch loads oneDNN (it reads the variable once); a user's setting wins."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_ENTRIES)


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc.malloc_trim  # glibc only
    except (OSError, AttributeError, TypeError):
        return None


class HeapTrimmer:
    """Returns free heap memory to the system once per idle spell, if there was work since, and
    under sustained load at most every `busy_interval_s` seconds (10 ms per 5 s: 0.2%)."""

    def __init__(self, busy_interval_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._trim = _malloc_trim()
        self._dirty = False
        self._interval = busy_interval_s
        self._clock = clock
        self._last = clock()

    def worked(self) -> None:
        self._dirty = True
        if self._clock() - self._last >= self._interval:
            self.idle()

    def idle(self) -> None:
        if self._dirty and self._trim is not None:
            self._trim(0)
        self._dirty = False
        self._last = self._clock()
