"""Background tasks whose failure somebody observes.

A task that dies unobserved is how requests end up hanging forever (Infinity's worker futures):
every long-lived task of the router is started here, and its failure stops the server loudly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)

_running: set[asyncio.Task] = set()
# What failed, for the exit status: a server stopped by a bug must not exit 0.
failures: list[str] = []


def start_supervised(coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task:
    """Run `coro` as a task; if it ever fails, log why and shut the server down (SIGTERM)."""
    task = asyncio.get_running_loop().create_task(coro, name=what)
    _running.add(task)

    def done(task: asyncio.Task) -> None:
        _running.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            shut_down_for(what, exc)

    task.add_done_callback(done)
    return task


def shut_down_for(what: str, exc: BaseException) -> None:
    """A long-lived part of the router (a task, or an event-loop callback) failed: log why and
    shut the server down (SIGTERM)."""
    log.critical("%s failed; shutting down", what, exc_info=exc)
    failures.append(what)
    os.kill(os.getpid(), signal.SIGTERM)
