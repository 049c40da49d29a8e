"""The watchdog against a worker's real heartbeats: an idle worker is silent for a heartbeat
interval and a little more between them, so no --worker-timeout may make that a hang."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time

import msgspec
import zmq

from backend_worker.main import Worker
from router.workers import WorkerState
from tests.unit.test_worker_faults import CONFIG
from tests.unit.test_worker_pool import _ready
from tests.unit.test_worker_replies import _pool


def test_an_idle_worker_is_not_killed_as_hung_at_a_short_worker_timeout(tmp_path) -> None:
    """--worker-timeout 1 on a fast device (a warm-up batch of 1 ms): the worker's own serve
    loop, idle, heartbeats about once a second; it must live through several of them."""

    async def scenario() -> str | None:
        pool = _pool(tmp_path, hang_timeout=1.0)
        asyncio.get_running_loop().add_reader(pool._fd, pool._drain)
        worker = pool.workers[0]
        worker.process = subprocess.Popen(["sleep", "60"])
        worker.state, worker.ready = WorkerState.READY, _ready(worker.process.pid, 1.0)
        worker.last_seen = time.monotonic()  # (as its READY just now)
        context = zmq.Context()
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, b"0")
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(worker.config.endpoint)
        config = msgspec.structs.replace(CONFIG, endpoint=worker.config.endpoint,
                                         parent_pid=os.getppid())
        serving = Worker(config, dealer)
        loop = threading.Thread(target=serving.serve, args=(None,))
        loop.start()
        pool._watchdog = asyncio.ensure_future(pool._watch())
        try:
            await asyncio.sleep(4.5)  # about four heartbeats
            return worker.kill_reason
        finally:
            serving.stopping = True  # (its next poll ends the loop)
            loop.join()
            dealer.close()
            context.term()
            pool._watchdog.cancel()
            pool.close_now()
            worker.process.kill()
            worker.process.wait()

    assert asyncio.run(scenario()) is None


def test_a_silence_limit_is_never_shorter_than_two_heartbeats(tmp_path) -> None:
    pool = _pool(tmp_path, hang_timeout=0.5)
    try:
        worker = pool.workers[0]
        worker.state, worker.ready = WorkerState.READY, _ready(1, warmup_ms=1.0)
        assert pool._silence_limit(worker) == 2.0
    finally:
        pool.close_now()
