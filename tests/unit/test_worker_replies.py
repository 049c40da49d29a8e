"""What the router does with a worker's replies that make no sense: a malformed result fails
its own batch, an undecodable message gets its worker killed (and restarted), and neither
stops the server; and in which context replies are handled."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import numpy as np
import pytest
import zmq

from router import workers as workers_module
from router.metrics import Metrics
from router.queue import Entry
from router.workers import WorkerPool, WorkerState
from shared import protocol
from shared.errors import EmbedServeError
from shared.logs import LogSpan, current_span
from shared.protocol import WorkerConfig


def _pool(tmp_path, workers: int = 1, hang_timeout: float = 60,
          ready_timeout: float = 60) -> WorkerPool:
    configs = [WorkerConfig(worker_id=str(i), endpoint=f"ipc://{tmp_path}/w.sock",
                            model_dir="/nowhere", pooling=None, dense_path=None, device="cpu",
                            dtype=None, max_batch_tokens=64, parent_pid=os.getpid(),
                            json_output=False) for i in range(workers)]
    return WorkerPool(configs, hang_timeout=hang_timeout, ready_timeout=ready_timeout,
                      metrics=Metrics(64))


async def _until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def _exchange(tmp_path, reply, output: protocol.OutputKind = protocol.OutputKind.POOLED
                    ) -> tuple[WorkerPool, Entry]:
    """A pool whose worker 0 (a stand-in process and DEALER) answers one batch with `reply`'s
    frames; and the entry of that batch."""
    pool = _pool(tmp_path)
    loop = asyncio.get_running_loop()
    loop.add_reader(pool._fd, pool._drain)
    worker = pool.workers[0]
    worker.process = subprocess.Popen(["sleep", "60"])
    worker.pidfd = os.pidfd_open(worker.process.pid)
    loop.add_reader(worker.pidfd, pool._on_exit, worker)
    worker.state = WorkerState.READY
    dealer = pool._context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"0")
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(worker.config.endpoint)
    dealer.send_multipart(protocol.encode(protocol.Heartbeat()))
    await _until(lambda: worker.last_seen > 0)  # the router knows the identity
    ids = np.array([1, 2, 3], dtype=np.int32)
    entry = Entry("r7", ids, np.zeros(3, np.int32), 0, output, loop.create_future())
    pool.submit(worker, [entry])
    header, _ = protocol.decode(dealer.recv_multipart())
    dealer.send_multipart(reply(header))
    await _until(entry.future.done)
    dealer.close()
    return pool, entry


@pytest.fixture
def no_shutdown(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    stopped: list[str] = []
    monkeypatch.setattr(workers_module, "shut_down_for",
                        lambda what, exc: stopped.append(f"{what}: {exc!r}"))
    return stopped


def _malformed(header: protocol.Batch) -> list:
    # Two rows for a batch of one entry.
    return protocol.encode(protocol.Result(header.batch_id, 2, 4, 1.0),
                           np.zeros((2, 4), np.float32))


def _undecodable(header: protocol.Batch) -> list:
    return [b"\xc1 not msgpack"]


def _unexpected(header: protocol.Batch) -> list:
    return protocol.encode(header)  # a Batch, which only the router sends


@pytest.mark.parametrize("reply", [_malformed, _undecodable, _unexpected])
def test_a_garbled_reply_fails_its_batch_not_the_server(
        tmp_path, no_shutdown, caplog, reply) -> None:
    async def scenario() -> None:
        pool, entry = await _exchange(tmp_path, reply)
        try:
            assert no_shutdown == []
            with pytest.raises(EmbedServeError, match="worker 0"):
                entry.future.result()
            assert pool.workers[0].in_flight == {}
            if reply is not _malformed:  # its batch's answer is lost: the worker must go
                await _until(lambda: pool.workers[0].state is WorkerState.DEAD)
            else:
                assert ("batch 0: worker 0 sent a malformed result (2 rows for 1 inputs; "
                        "requests: r7)") in caplog.messages
        finally:
            pool.close_now()

    asyncio.run(scenario())


def test_a_result_is_read_as_its_batchs_output_asks(tmp_path, no_shutdown) -> None:
    """Every token's vector, for an entry of three tokens: one block of three rows."""

    def tokens(header: protocol.Batch) -> list:
        return protocol.encode(protocol.Result(header.batch_id, 3, 4, 1.0),
                               np.arange(12, dtype=np.float32).reshape(3, 4))

    async def scenario() -> None:
        pool, entry = await _exchange(tmp_path, tokens, protocol.OutputKind.ALL_TOKENS)
        try:
            assert entry.future.result()[0].tolist() == np.arange(12).reshape(3, 4).tolist()
        finally:
            pool.close_now()

    asyncio.run(scenario())


def test_a_ready_read_after_its_workers_death_does_not_revive_it(tmp_path, no_shutdown) -> None:
    """A worker that says READY and dies at once: the event loop may see the death (pidfd)
    before the READY waiting on the socket. The dead worker must stay dead, to be restarted,
    not be marked ready (requests sent to it would fail, and the restart never come)."""

    async def scenario() -> None:
        pool = _pool(tmp_path)
        restarted: list[str] = []
        pool._spawn = lambda worker: restarted.append(worker.id)  # type: ignore[method-assign]
        worker = pool.workers[0]
        worker.process = subprocess.Popen(["sleep", "60"])
        worker.pidfd = os.pidfd_open(worker.process.pid)
        asyncio.get_running_loop().add_reader(worker.pidfd, pool._on_exit, worker)
        dealer = pool._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, b"0")
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(worker.config.endpoint)
        ready = protocol.Ready(
            worker_id="0", pid=worker.process.pid, device="cpu", dtype="float32",
            hidden_size=4, embedding_dim=4, vocab_size=10, max_positions=8,
            cost_model=protocol.CostModel.PACKED, outputs=[protocol.OutputKind.POOLED],
            warmup_ms=1.0)
        dealer.send_multipart(protocol.encode(ready))
        worker.process.kill()
        try:
            await _until(lambda: worker.state is WorkerState.DEAD)  # the death, seen first
            await asyncio.sleep(0.1)  # the READY reaches the router's socket
            pool._drain()
            assert not pool.any_ready
            await _until(lambda: restarted == ["0"], seconds=3)
        finally:
            dealer.close()
            pool.close_now()

    asyncio.run(scenario())


def test_a_ready_from_the_process_before_a_restart_is_ignored(tmp_path, no_shutdown) -> None:
    """The restarted process has the same ZeroMQ identity: a READY its predecessor sent late
    must not mark the new one ready while it still loads."""

    async def scenario() -> None:
        pool = _pool(tmp_path)
        worker = pool.workers[0]
        worker.process = subprocess.Popen(["sleep", "60"])
        worker.state = WorkerState.STARTING
        dealer = pool._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, b"0")
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(worker.config.endpoint)

        def ready(pid: int) -> protocol.Ready:
            return protocol.Ready(
                worker_id="0", pid=pid, device="cpu", dtype="float32", hidden_size=4,
                embedding_dim=4, vocab_size=10, max_positions=8,
                cost_model=protocol.CostModel.PACKED, outputs=[protocol.OutputKind.POOLED],
                warmup_ms=1.0)

        try:
            dealer.send_multipart(protocol.encode(ready(worker.process.pid + 100_000)))
            await asyncio.sleep(0.1)
            pool._drain()
            assert worker.state is WorkerState.STARTING
            dealer.send_multipart(protocol.encode(ready(worker.process.pid)))
            await _until(lambda: (pool._drain(), worker.state)[1] is WorkerState.READY)
        finally:
            worker.process.kill()
            worker.process.wait()
            dealer.close()
            pool.close_now()

    asyncio.run(scenario())


def test_a_drain_reads_on_past_a_strangers_message_and_an_undecodable_one(tmp_path) -> None:
    async def scenario() -> None:
        pool = _pool(tmp_path)  # (no reader on its FD: one drain, called below)
        worker = pool.workers[0]
        dealers = []
        for identity in (b"9", b"0"):
            dealer = pool._context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.IDENTITY, identity)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(worker.config.endpoint)
            dealers.append(dealer)
        stranger, own = dealers
        try:
            stranger.send_multipart(protocol.encode(protocol.Heartbeat()))
            await asyncio.sleep(0.3)  # first in line
            own.send_multipart([b"\xc1 not msgpack"])
            own.send_multipart(protocol.encode(protocol.Heartbeat()))
            await asyncio.sleep(0.3)
            pool._drain()
            assert worker.last_seen > 0  # the heartbeat behind both was read
        finally:
            for dealer in dealers:
                dealer.close()
            pool.close_now()

    asyncio.run(scenario())


# The worker socket's messages are handled outside any request's context: a reply that
# `submit` finds waiting is drained on a later loop turn, and what that drain logs (a worker
# ready, killed, garbled) belongs to no request, whichever request's batch was sent.

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
            entry = Entry("r7", np.array([1, 2, 3], np.int32), np.zeros(3, np.int32), 0,
                          protocol.OutputKind.POOLED, asyncio.get_running_loop().create_future())

            async def request() -> None:  # as the router's request middleware sets it
                current_span.set(LogSpan("POST /embed", "abc123"))
                pool.submit(worker, [entry])

            await asyncio.create_task(request())
            await _until(lambda: spans)
            assert spans == [None]
        finally:
            dealer.close()
            pool.close_now()

    asyncio.run(scenario())
