"""The worker's memory hygiene (backend_worker/memory.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from backend_worker.memory import HeapTrimmer


def test_heap_is_trimmed_once_per_idle_spell_after_work() -> None:
    calls: list[int] = []
    heap = HeapTrimmer()
    heap._trim = calls.append  # type: ignore[assignment]
    heap.idle()
    assert calls == [], "nothing computed yet: nothing to give back"
    heap.worked()
    heap.worked()
    heap.idle()
    heap.idle()
    assert calls == [0], "one trim per idle spell"
    heap.worked()
    heap.idle()
    assert calls == [0, 0]


def test_sustained_load_trims_every_interval() -> None:
    now = [0.0]
    calls: list[int] = []
    heap = HeapTrimmer(busy_interval_s=5.0, clock=lambda: now[0])
    heap._trim = calls.append  # type: ignore[assignment]
    for _ in range(10):  # 10 batches within 4.5 s: no trim
        now[0] += 0.45
        heap.worked()
    assert calls == []
    now[0] += 1.0  # 5.5 s after the start, still busy
    heap.worked()
    assert calls == [0]
    heap.worked()
    assert calls == [0], "not again until another interval has passed"


def test_malloc_trim_is_found_on_glibc() -> None:
    assert HeapTrimmer()._trim is not None  # this machine runs glibc


def _capacity_after_capping(env: dict[str, str]) -> str:
    code = ("import os; from backend_worker.memory import cap_primitive_cache; "
            "cap_primitive_cache(); print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True)
    return done.stdout.strip()


def test_primitive_cache_is_capped_unless_the_user_set_it() -> None:
    base = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    assert _capacity_after_capping(base) == "128"
    assert _capacity_after_capping({**base, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "512"}) == "512"
