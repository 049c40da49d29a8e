"""The worker pool's own bookkeeping, with stand-in processes: which worker gets a batch, what a
batch's header and records say, what a death does (its batches' error, the back-off, the
restart and its count), when the watchdog kills, how stop ends workers, and the first READY or
FATAL that start waits for."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq

from router.queue import Dispatch, Entry
from router.workers import InFlight, WorkerPool, WorkerState
from shared import protocol
from shared.errors import ConfigError, EmbedServeError
from tests.fixtures.prometheus import samples
from tests.unit.test_worker_replies import _pool, _until


def _ready(pid: int, warmup_ms: float = 1.0) -> protocol.Ready:
    return protocol.Ready(
        worker_id="0", pid=pid, device="cpu", dtype="float32", hidden_size=4, embedding_dim=4,
        vocab_size=10, max_positions=8, cost_model=protocol.CostModel.PACKED,
        outputs=[protocol.OutputKind.POOLED], warmup_ms=warmup_ms)


def _entry(length: int, pool_from: int = 0, request_id: str = "") -> Entry:
    ids = np.arange(1, length + 1, dtype=np.int32)
    return Entry(request_id, ids, np.zeros(length, np.int32), 0, protocol.OutputKind.POOLED,
                 asyncio.get_running_loop().create_future(), pool_from=pool_from)


def _restart_delays(pool: WorkerPool, loop: asyncio.AbstractEventLoop) -> list[float]:
    """The delays of the restarts the pool schedules, none of which is run."""
    delays: list[float] = []
    call_later = loop.call_later

    def later(delay, callback, *args, **kwargs):
        if callback == pool._restart:
            delays.append(delay)
            return None
        return call_later(delay, callback, *args, **kwargs)

    loop.call_later = later  # type: ignore[method-assign]
    return delays


def _error(entry: Entry) -> str:
    exc = entry.future.exception()
    assert isinstance(exc, EmbedServeError)
    return exc.message


def test_a_batch_goes_to_the_ready_worker_with_a_free_slot_and_the_fewest_tokens(
        tmp_path) -> None:
    pool = _pool(tmp_path, workers=2)
    try:
        first, second = pool.workers
        assert pool.pick() is None and not pool.any_ready and not pool.healthy
        first.state = WorkerState.READY
        assert pool.pick() is first and pool.any_ready and not pool.healthy
        second.state = WorkerState.READY
        assert pool.healthy
        first.in_flight[0] = InFlight([], 10)
        assert pool.pick() is second
        second.in_flight[1] = InFlight([], 30)
        assert pool.pick() is first  # 10 tokens outstanding, not 30
        first.in_flight[2] = InFlight([], 1)  # its two slots taken
        assert pool.pick() is second
        second.in_flight[3] = InFlight([], 1)
        assert pool.pick() is None
        first.in_flight.clear()
        first.state = WorkerState.STARTING
        assert pool.pick() is None and not pool.healthy
    finally:
        pool.close_now()


def test_a_batch_header_and_records_and_its_result(tmp_path) -> None:
    async def scenario() -> None:
        pool = _pool(tmp_path)
        loop = asyncio.get_running_loop()
        loop.add_reader(pool._fd, pool._drain)
        worker = pool.workers[0]
        worker.state = WorkerState.READY
        dealer = pool._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, b"0")
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(worker.config.endpoint)
        try:
            dealer.send_multipart(protocol.encode(protocol.Heartbeat()))
            await _until(lambda: worker.last_seen > 0)
            short, long = _entry(3, request_id="r1"), _entry(5, pool_from=2, request_id="r1")
            pool.submit(worker, [short, long])
            header, _ = protocol.decode(dealer.recv_multipart())
            assert (header.batch_id, header.max_len, header.pool_from) == (0, 5, [0, 2])
            assert header.request_ids == ["r1"]
            assert short.batch == long.batch == Dispatch("0", 0, 2, 8)
            assert 0 < short.dispatched_at == long.dispatched_at <= time.perf_counter()
            assert worker.outstanding_tokens == 8
            alone = _entry(4)
            pool.submit(worker, [alone])
            header, _ = protocol.decode(dealer.recv_multipart())
            assert (header.batch_id, header.pool_from, header.request_ids) == (1, [], [])
            values = samples(pool.metrics.render().decode())
            assert values["te_batch_next_size_sum"] == 3
            assert values["te_batch_next_tokens_sum"] == 12
            dealer.send_multipart(protocol.encode(protocol.Result(0, 2, 4, 250.0),
                                                  np.array([[1] * 4, [2] * 4], np.float32)))
            dealer.send_multipart(protocol.encode(protocol.Failed(1, "out of memory")))
            await _until(lambda: short.future.done() and alone.future.done())
            assert short.future.result()[0].tolist() == [1] * 4
            assert long.future.result()[0].tolist() == [2] * 4
            assert _error(alone) == "out of memory"
            assert (worker.batches_done, worker.tokens_done, worker.in_flight) == (1, 8, {})
            values = samples(pool.metrics.render().decode())
            assert values["te_batch_inference_duration_sum"] == 0.25
        finally:
            dealer.close()
            pool.close_now()

    asyncio.run(scenario())


def test_a_batch_for_a_worker_not_connected_fails_at_once(tmp_path) -> None:
    async def scenario() -> None:
        pool = _pool(tmp_path)
        worker = pool.workers[0]
        worker.state = WorkerState.READY
        entry = _entry(3)
        try:
            pool.submit(worker, [entry])
            assert _error(entry).startswith("worker 0 unreachable: ")
            assert worker.in_flight == {}
        finally:
            pool.close_now()

    asyncio.run(scenario())


def test_a_death_fails_its_batches_and_restarts_it_with_back_off(
        tmp_path, monkeypatch, caplog) -> None:
    """The real _spawn with stand-in processes: one killed, then one that exits 0."""
    commands = [["sleep", "60"], ["sh", "-c", "exit 0"], ["sleep", "60"]]
    spawned: list[list[str]] = []
    popen = subprocess.Popen

    def stand_in(args, **kwargs):
        spawned.append(args)
        return popen(commands[len(spawned) - 1], **kwargs)

    monkeypatch.setattr(subprocess, "Popen", stand_in)

    async def scenario() -> None:
        pool = _pool(tmp_path)
        loop = asyncio.get_running_loop()
        delays = _restart_delays(pool, loop)
        changes: list[None] = []
        pool.on_change = lambda: changes.append(None)
        worker = pool.workers[0]
        worker.ready, worker.kill_reason = _ready(1), "a reason from before"
        try:
            pool._spawn(worker)
            assert spawned[0][:3] == [sys.executable, "-m", "backend_worker"]
            assert (worker.state, worker.ready, worker.kill_reason) == (
                WorkerState.STARTING, None, None)
            assert worker.last_seen > 0
            worker.state = WorkerState.READY
            entry = _entry(3, request_id="r1")
            worker.in_flight[0] = InFlight([entry], 3)
            worker.process.kill()  # type: ignore[union-attr]
            await _until(lambda: worker.state is WorkerState.DEAD)
            assert _error(entry) == "worker 0 died (signal 9) while computing"
            # The log ties the clients' failed requests to the death.
            assert "batch 0 lost with worker 0 (requests: r1)" in caplog.messages
            assert (worker.in_flight, worker.failures, delays) == ({}, 1, [0.5])
            assert changes
            pool._restart(worker)
            assert (worker.restarts, worker.state) == (1, WorkerState.STARTING)
            entry = _entry(3)  # (its exit is read on a later turn of the loop)
            worker.in_flight[0] = InFlight([entry], 3)
            await _until(lambda: worker.state is WorkerState.DEAD)
            assert _error(entry) == "worker 0 died (exit code 0) while computing"
            assert (worker.failures, delays) == (2, [0.5, 1.0])
            pool._restart(worker)
            assert worker.restarts == 2
            pool._restart(worker)  # not dead: no second process
            assert (worker.restarts, len(spawned)) == (2, 3)
            pool._kill(worker, "hung: silent for 9.0 s")
            pool._kill(worker, "garbled")  # the first reason stays
            entry = _entry(3)
            worker.in_flight[4] = InFlight([entry], 3)
            await _until(lambda: worker.state is WorkerState.DEAD)
            assert _error(entry) == "worker 0 died (hung: silent for 9.0 s) while computing"
            assert "batch 4 lost with worker 0 (requests: none named)" in caplog.messages
            assert delays == [0.5, 1.0, 2.0]
            pool._stopping = True
            pool._restart(worker)
            assert (worker.restarts, len(spawned)) == (2, 3)
        finally:
            pool.close_now()

    asyncio.run(scenario())


@pytest.mark.parametrize("stopping", ["the pool", "the worker", "closed at exit"])
def test_a_death_while_stopping_is_not_restarted(tmp_path, stopping: str) -> None:
    async def scenario() -> None:
        pool = _pool(tmp_path)
        loop = asyncio.get_running_loop()
        delays = _restart_delays(pool, loop)
        worker = pool.workers[0]
        worker.process = subprocess.Popen(["sleep", "60"])
        worker.pidfd = os.pidfd_open(worker.process.pid)
        loop.add_reader(worker.pidfd, pool._on_exit, worker)
        worker.state = WorkerState.READY
        if stopping == "the pool":
            pool._stopping = True
        elif stopping == "the worker":
            worker.state = WorkerState.STOPPING
        try:
            if stopping == "closed at exit":  # after a failed start: no stop() before
                pool.close_now()
            else:
                worker.process.kill()
            await _until(lambda: worker.state is WorkerState.DEAD)
            assert (worker.failures, delays) == (0, [])
        finally:
            pool.close_now()

    asyncio.run(scenario())


def test_close_now_kills_every_live_worker(tmp_path) -> None:
    pool = _pool(tmp_path, workers=2)
    live = pool.workers[0].process = subprocess.Popen(["sleep", "60"])
    pool.close_now()  # (outside an event loop, as at exit; worker 1 has no process)
    assert live.wait(timeout=10) == -9


def test_silence_limits(tmp_path) -> None:
    pool = _pool(tmp_path, hang_timeout=60, ready_timeout=300)
    try:
        worker = pool.workers[0]
        assert pool._silence_limit(worker) == 300  # STARTING: loading a model
        worker.state, worker.ready = WorkerState.READY, _ready(1, warmup_ms=1.0)
        assert pool._silence_limit(worker) == 60
        worker.ready = _ready(1, warmup_ms=10_000.0)  # a slow device: 10x its warm-up
        assert pool._silence_limit(worker) == 100.0
    finally:
        pool.close_now()


def test_the_watchdog_kills_silent_workers_only(tmp_path) -> None:
    async def scenario() -> None:
        pool = _pool(tmp_path, workers=4, hang_timeout=30, ready_timeout=30)
        now = time.monotonic()
        states = [WorkerState.READY, WorkerState.STARTING, WorkerState.READY,
                  WorkerState.STOPPING]
        for worker, state in zip(pool.workers, states, strict=True):
            worker.process = subprocess.Popen(["sleep", "60"])
            worker.state, worker.last_seen = state, now - 100
        pool.workers[2].last_seen = now + 100  # heard from: not silent
        watchdog = asyncio.ensure_future(pool._watch())
        try:
            await _until(lambda: pool.workers[1].kill_reason is not None)
            await _until(lambda: pool.workers[0].kill_reason is not None)
            assert pool.workers[0].kill_reason.startswith("hung: silent for 1")
            assert pool.workers[1].kill_reason.startswith("not ready after 1")
            await asyncio.sleep(0.6)  # two more rounds
            assert [w.kill_reason for w in pool.workers[2:]] == [None, None]
            assert [w.process.poll() for w in pool.workers] == [-9, -9, None, None]
        finally:
            watchdog.cancel()
            pool.close_now()

    asyncio.run(scenario())


def test_stop_signals_each_worker_and_kills_one_that_stays(tmp_path) -> None:
    async def scenario() -> None:
        pool = _pool(tmp_path, workers=2)
        graceful, stubborn = pool.workers
        graceful.process = subprocess.Popen(
            ["sh", "-c", "trap 'exit 0' USR1; echo set; while :; do sleep 0.05; done"],
            stdout=subprocess.PIPE)
        stubborn.process = subprocess.Popen(["sh", "-c", "trap '' USR1; echo set; exec sleep 60"],
                                            stdout=subprocess.PIPE)
        for process in (graceful.process, stubborn.process):
            assert process.stdout is not None and process.stdout.readline() == b"set\n"
            process.stdout.close()
        pool._watchdog = asyncio.ensure_future(pool._watch())
        await pool.stop(timeout=2.0)
        await asyncio.sleep(0)
        assert pool._stopping and pool._watchdog.cancelled()
        assert [w.state for w in pool.workers] == [WorkerState.STOPPING] * 2
        assert (graceful.process.returncode, stubborn.process.returncode) == (0, -9)

    asyncio.run(scenario())


def test_start_waits_for_the_first_ready_or_fatal(tmp_path) -> None:
    async def scenario() -> None:
        pool = _pool(tmp_path)
        pool._spawn = lambda worker: None  # type: ignore[method-assign]
        worker = pool.workers[0]
        try:
            with pytest.raises(ConfigError) as refused:
                await pool.start(0.2)
            assert str(refused.value) == (
                "no worker became ready within 0.2 s (--worker-ready-timeout)")
            pool._watchdog.cancel()  # type: ignore[union-attr]
            worker.process = subprocess.Popen(["sleep", "60"])
            started = asyncio.ensure_future(pool.start(5))
            await asyncio.sleep(0.05)
            worker.failures = 3
            first = _ready(worker.process.pid)
            pool._handle(worker, first, [])
            pool._handle(worker, _ready(worker.process.pid), [])  # a second one is no error
            assert await started is first
            assert (worker.state, worker.ready, worker.failures) == (
                WorkerState.READY, first, 0)
            pool._watchdog.cancel()  # type: ignore[union-attr]
            started = asyncio.ensure_future(pool.start(5))
            await asyncio.sleep(0.05)
            pool._handle(worker, protocol.Fatal("0", "no such model"), [])
            pool._handle(worker, protocol.Fatal("0", "again"), [])
            with pytest.raises(ConfigError) as refused:
                await started
            assert str(refused.value) == "the model cannot be served: no such model"
        finally:
            if worker.process is not None:
                worker.process.kill()
                worker.process.wait()
            pool.close_now()

    asyncio.run(scenario())


def test_replies_for_abandoned_inputs_free_their_slots_and_wake_the_scheduler(
        tmp_path, monkeypatch) -> None:
    """Two inputs' requests went away (their futures cancelled) before the answer: the result
    and the failure are taken all the same, and the server stays up; a malformed result wakes
    the scheduler too (its slot is free)."""
    from router import workers as workers_module

    stopped: list[str] = []
    monkeypatch.setattr(workers_module, "shut_down_for", lambda what, exc: stopped.append(what))

    async def scenario() -> None:
        pool = _pool(tmp_path)
        asyncio.get_running_loop().add_reader(pool._fd, pool._drain)
        changes: list[None] = []
        pool.on_change = lambda: changes.append(None)
        worker = pool.workers[0]
        worker.state = WorkerState.READY
        dealer = pool._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, b"0")
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(worker.config.endpoint)
        try:
            dealer.send_multipart(protocol.encode(protocol.Heartbeat()))
            await _until(lambda: worker.last_seen > 0)
            first, second, third = _entry(3), _entry(3), _entry(3)
            pool.submit(worker, [first])
            pool.submit(worker, [second])
            pool.submit(worker, [third])
            first.future.cancel()
            second.future.cancel()
            changes.clear()
            dealer.send_multipart(protocol.encode(protocol.Result(0, 1, 4, 1.0),
                                                  np.ones((1, 4), np.float32)))
            await _until(lambda: len(changes) == 1)
            dealer.send_multipart(protocol.encode(protocol.Failed(1, "out of memory")))
            await _until(lambda: len(changes) == 2)
            dealer.send_multipart(protocol.encode(protocol.Result(2, 2, 4, 1.0),  # 2 rows, 1 input
                                                  np.ones((2, 4), np.float32)))
            await _until(lambda: len(changes) == 3)
            assert _error(third) == "worker 0 sent a malformed result: 2 rows for 1 inputs"
            assert (worker.in_flight, worker.batches_done, stopped) == ({}, 2, [])
        finally:
            dealer.close()
            pool.close_now()

    asyncio.run(scenario())



@pytest.mark.parametrize("failing", ["Popen", "pidfd_open"])
def test_a_restart_that_cannot_spawn_is_tried_again_with_back_off(
        tmp_path, monkeypatch, failing: str) -> None:
    """fork can fail for a while (EAGAIN at a container's pids limit, ENOMEM) and so can
    pidfd_open (EMFILE): the worker stays DEAD and its restart comes again after the next
    back-off, instead of a worker left 'starting' for ever (and a process left unwatched)."""
    popen, pidfd_open = subprocess.Popen, os.pidfd_open
    started: list[subprocess.Popen] = []
    attempts = [0]

    def stand_in(args, **kwargs):
        attempts[0] += 1
        if failing == "Popen" and attempts[0] == 1:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        started.append(popen(["sleep", "60"], **kwargs))
        return started[-1]

    def no_fd(pid: int) -> int:
        if attempts[0] == 1:
            raise OSError(24, "Too many open files")
        return pidfd_open(pid)

    monkeypatch.setattr(subprocess, "Popen", stand_in)
    if failing == "pidfd_open":
        monkeypatch.setattr(os, "pidfd_open", no_fd)

    async def scenario() -> None:
        pool = _pool(tmp_path)
        delays = _restart_delays(pool, asyncio.get_running_loop())
        worker = pool.workers[0]
        worker.state, worker.failures = WorkerState.DEAD, 1
        try:
            pool._restart(worker)
            assert (worker.state, worker.failures, delays) == (WorkerState.DEAD, 2, [1.0])
            if failing == "pidfd_open":  # the process it could not watch does not live on
                assert started[0].wait(timeout=10) == -9
            pool._restart(worker)
            assert worker.state is WorkerState.STARTING and worker.pidfd is not None
            assert worker.process is started[-1] and worker.process.poll() is None
            assert worker.restarts == 2
        finally:
            pool.close_now()

    asyncio.run(scenario())
