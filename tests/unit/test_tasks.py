"""router/tasks.py: a supervised task is held until it ends; its failure, and only that (not a
cancel), logs why and stops the server with SIGTERM, named in `failures` for the exit status
(mutation testing, round 8)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from router import tasks


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(tasks.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    monkeypatch.setattr(tasks, "failures", [])
    return sent


def test_a_failed_task_stops_the_server_with_sigterm(kills: list[tuple[int, int]]) -> None:
    async def fails() -> None:
        raise RuntimeError("bug")

    async def main() -> tuple[bool, bool]:
        task = tasks.start_supervised(fails(), "the batch scheduler")
        held = task in tasks._running
        await asyncio.wait({task})
        await asyncio.sleep(0)
        return held, task in tasks._running

    assert asyncio.run(main()) == (True, False)
    assert kills == [(os.getpid(), signal.SIGTERM)]
    assert tasks.failures == ["the batch scheduler"]


def test_a_cancelled_or_finished_task_stops_nothing(kills: list[tuple[int, int]]) -> None:
    async def main() -> list[dict]:
        errors: list[dict] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context:
                                                         errors.append(context))
        cancelled = tasks.start_supervised(asyncio.sleep(60), "cancelled")
        finished = tasks.start_supervised(asyncio.sleep(0), "finished")
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.wait({cancelled, finished})
        await asyncio.sleep(0)
        return errors

    assert asyncio.run(main()) == []
    assert (kills, tasks.failures) == ([], [])
