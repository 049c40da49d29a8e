"""The worker socket's messages are handled outside any request's context: a reply that
`submit` finds waiting is drained on a later loop turn, and what that drain logs (a worker
ready, killed, garbled) belongs to no request, whichever request's batch happened to be sent."""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import zmq

from router.metrics import Metrics
from router.queue import Entry
from router.workers import WorkerPool, WorkerState
from shared import protocol
from shared.config import WorkerConfig
from shared.logs import LogSpan, current_span


def _pool(tmp_path) -> WorkerPool:
    config = WorkerConfig(worker_id="0", endpoint=f"ipc://{tmp_path}/w.sock",
                          model_dir="/nowhere", pooling=None, dense_path=None, device="cpu",
                          dtype=None, max_batch_tokens=64, parent_pid=os.getpid(),
                          json_output=False)
    return WorkerPool([config], hang_timeout=60, ready_timeout=60, metrics=Metrics(64))


async def _until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_drain_scheduled_by_a_requests_submit_runs_outside_that_request(tmp_path) -> None:
    async def scenario() -> None:
        pool = _pool(tmp_path)  # (no reader on its FD: the waiting message stays unread)
        worker = pool.workers[0]
        worker.state = WorkerState.READY
        dealer = pool._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, b"0")
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(worker.config.endpoint)
        spans: list[LogSpan | None] = []
        handle = pool._handle

        def recording(worker_, message, buffers) -> None:
            spans.append(current_span.get())
            handle(worker_, message, buffers)

        pool._handle = recording  # type: ignore[method-assign]
        try:
            dealer.send_multipart(protocol.encode(protocol.Heartbeat()))
            await _until(lambda: pool._socket.getsockopt(zmq.EVENTS) & zmq.POLLIN)
            entry = Entry(7, np.array([1, 2, 3], np.int32), np.zeros(3, np.int32), 0,
                          protocol.OutputKind.POOLED, asyncio.get_running_loop().create_future())

            async def request() -> None:  # as the router's request middleware sets it
                current_span.set(LogSpan("POST /embed", "abc123"))
                pool.submit(worker, [entry])

            await asyncio.create_task(request())
            await _until(lambda: spans)
            assert spans == [None]
        finally:
            dealer.close()
            pool._stopping = True
            pool.close_now()

    asyncio.run(scenario())
