"""Admission: each pool's --max-concurrent-requests permits, and the drain at shutdown.

A request holds permits for as long as it is queued, tokenized or computed; past the limit it
is refused at once (429), as TEI does, rather than queued without bound; a gRPC stream's
message waits for its permits instead (`patiently`), as TEI's streams do. At shutdown the drain
refuses new requests, waits for the admitted ones, and answers what the grace leaves with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal, TypeVar

from router.inputs import check_admissible
from shared.errors import overloaded, unhealthy

log = logging.getLogger(__name__)

# Admission pools: inference (queue and workers), and the tokenizer pool's own operations.
Permits = Literal["inference", "tokenizer"]
SHUT_DOWN = "the server shut down before this request was done (--shutdown-grace)"
# After the grace, how long the handlers get to write their 503s before the port closes.
_ANSWER_S = 1.0
# Set within `patiently`: `admitted` waits for permits there instead of refusing.
_patient = contextvars.ContextVar("patient", default=False)
T = TypeVar("T")


async def patiently(answer: Callable[[], Awaitable[T]]) -> T:
    """`answer()`, its admissions waiting for permits where they would be refused (429 /
    RESOURCE_EXHAUSTED): TEI's gRPC streams wait for each message's permit
    (`acquire_permit().await`), so a stream is never ended by other clients' load. The wait
    is inside `admitted`, before anything is counted: a message that waits is one request in
    the metrics, not a refusal and then a request."""
    token = _patient.set(True)
    try:
        return await answer()
    finally:
        _patient.reset(token)


class Admission:
    def __init__(self, max_concurrent_requests: int) -> None:
        self.max_concurrent_requests = max_concurrent_requests
        self._permits: dict[Permits, int] = {"inference": max_concurrent_requests,
                                             "tokenizer": max_concurrent_requests}
        self._active = 0
        self._expired = False  # the shutdown grace ran out (drain)
        self._admitted: set[asyncio.Task] = set()  # tasks holding permits (`admitted`)
        # The requests waiting for permits (`patiently`), first come first served as in TEI's
        # (tokio's) Semaphore: each future is set True once its permits are handed to it, or
        # False when the drain refuses it. Free permits are the head's while it waits.
        self._waiting: dict[Permits, deque[tuple[int, asyncio.Future[bool]]]] = {
            "inference": deque(), "tokenizer": deque()}
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        self.deadline: float | None = None  # the loop's time when the drain's grace ends

    @contextlib.asynccontextmanager
    async def admitted(self, inputs: int, pool: Permits = "inference") -> AsyncIterator[None]:
        """Hold `inputs` of `pool`'s --max-concurrent-requests permits for the block, or
        refuse at once (422 if it could never fit, 429 if not now; within `patiently`, wait
        for them); a drain waits for every admitted block to end. /tokenize and /decode draw
        on a pool of their own: bounded as inference is, never refused because inference
        holds every permit (TEI takes none)."""
        if self.draining:
            raise unhealthy("the server is shutting down")
        check_admissible(inputs, self.max_concurrent_requests)
        if self._waiting[pool] or inputs > self._permits[pool]:
            if not _patient.get():
                raise overloaded()  # as tokio's try_acquire: never ahead of the waiters
            await self._wait(inputs, pool)  # returns with the permits taken
        else:
            self._permits[pool] -= inputs
        task = asyncio.current_task()
        assert task is not None
        self._active += 1
        self._idle.clear()
        self._admitted.add(task)
        try:
            yield
        except asyncio.CancelledError:
            if not self._expired:
                raise
            # The drain cancelled it (see `drain`): an answer, not a dropped connection.
            task.uncancel()
            raise unhealthy(SHUT_DOWN) from None
        finally:
            self._admitted.discard(task)
            self._give_back(inputs, pool)
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    async def _wait(self, inputs: int, pool: Permits) -> None:
        """Queue for `inputs` of `pool`'s permits; return once they are handed over (taken)."""
        waiter = (inputs, asyncio.get_running_loop().create_future())
        self._waiting[pool].append(waiter)
        try:
            handed = await waiter[1]
        except asyncio.CancelledError:
            if waiter[1].done() and not waiter[1].cancelled() and waiter[1].result():
                self._give_back(inputs, pool)  # handed over before it could run
            else:
                with contextlib.suppress(ValueError):
                    self._waiting[pool].remove(waiter)
                self._hand_out(pool)  # the next waiter may fit now
            raise
        if not handed or self.draining:  # refused by the drain, or it began since
            if handed:
                self._give_back(inputs, pool)
            raise unhealthy("the server is shutting down")

    def _give_back(self, inputs: int, pool: Permits) -> None:
        self._permits[pool] += inputs
        self._hand_out(pool)

    def _hand_out(self, pool: Permits) -> None:
        """Hand the free permits to the waiters in order, while the head's need fits."""
        waiting = self._waiting[pool]
        while waiting and (waiting[0][1].done() or waiting[0][0] <= self._permits[pool]):
            inputs, future = waiting.popleft()
            if not future.done():  # a cancelled one leaves on its own
                self._permits[pool] -= inputs
                future.set_result(True)

    def free(self, pool: Permits = "inference") -> int:
        """How many of `pool`'s permits `admitted` could hand out now (none while others
        wait: the free ones are theirs)."""
        return 0 if self._waiting[pool] else self._permits[pool]

    async def drain(self, grace: float) -> None:
        """Refuse new requests; wait (at most `grace` s) for the ones in flight, then answer
        what is left with 503 (not the empty 500 of a handler cancelled at exit)."""
        self.draining = True
        self.deadline = asyncio.get_running_loop().time() + grace
        for waiting in self._waiting.values():  # not admitted: refused as new requests are
            while waiting:
                if not (future := waiting.popleft()[1]).done():
                    future.set_result(False)
        try:
            if not self._idle.is_set():  # (wait_for's 0 s times out even on a set event)
                await asyncio.wait_for(self._idle.wait(), grace)
            return
        except TimeoutError:
            log.warning("%d requests still in flight after %g s; answering them 503",
                        self._active, grace)
        self._expired = True
        for task in list(self._admitted):  # queued, tokenizing or computing: see `admitted`
            task.cancel()
        with contextlib.suppress(TimeoutError):  # the handlers write their answers
            await asyncio.wait_for(self._idle.wait(), _ANSWER_S)
