"""The backend workers as the router sees them: processes, their sockets, their batches.

One ROUTER socket (bound here) talks to every worker (DEALER, identity = worker id). Each worker
process is watched through a pidfd, so a death is noticed the moment it happens: its in-flight
batches fail at once with a Backend error and it is restarted with back-off. Nothing here waits
on a worker without a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import msgspec
import zmq

from router.metrics import Metrics
from router.packing import pack
from router.queue import Dispatch, Entry, request_ids
from router.tasks import shut_down_for, start_supervised
from shared import protocol
from shared.errors import ConfigError, backend
from shared.process import STOP_SIGNAL
from shared.protocol import WorkerConfig

log = logging.getLogger(__name__)

# One batch computing and one staged per worker: the device never waits on the socket.
SLOTS_PER_WORKER = 2
RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# The shortest silence taken for a hang, whatever --worker-timeout says: an idle worker is
# silent for a heartbeat interval and a little more (its poll, a heap trim) between heartbeats,
# and a shorter limit would kill it, idle, again and again.
MIN_SILENCE_S = 2 * protocol.HEARTBEAT_S


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DEAD = "dead"
    STOPPING = "stopping"


@dataclass(eq=False)
class InFlight:
    entries: list[Entry]
    tokens: int


@dataclass(eq=False)
class WorkerHandle:
    id: str
    config: WorkerConfig
    state: WorkerState = WorkerState.STARTING
    process: subprocess.Popen | None = None
    ready: protocol.Ready | None = None
    in_flight: dict[int, InFlight] = field(default_factory=dict)
    failures: int = 0  # consecutive deaths, for the back-off
    restarts: int = 0
    pidfd: int | None = None
    batches_done: int = 0
    tokens_done: int = 0
    last_seen: float = 0.0  # monotonic time of the last message (or of the spawn)
    kill_reason: str | None = None  # set when we kill it, for the error its requests get

    @property
    def outstanding_tokens(self) -> int:
        return sum(b.tokens for b in self.in_flight.values())

    @property
    def has_free_slot(self) -> bool:
        return self.state is WorkerState.READY and len(self.in_flight) < SLOTS_PER_WORKER


class WorkerPool:
    """Spawns, feeds, watches and restarts the backend workers."""

    def __init__(self, configs: list[WorkerConfig], *, hang_timeout: float,
                 ready_timeout: float, metrics: Metrics) -> None:
        self.workers = [WorkerHandle(c.worker_id, c) for c in configs]
        self.metrics = metrics
        metrics.watch_workers(self.workers)
        self._by_id = {w.id.encode(): w for w in self.workers}
        # Told of every READY, result, failure and death (the scheduler wakes on it).
        self.on_change: Callable[[], None] = lambda: None
        # A plain socket drained by an event-loop reader callback (_drain) rather than
        # zmq.asyncio's future per message: a result reaches its request ~25 us sooner.
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        # A restarted worker reuses its identity; an unknown identity must fail loudly.
        self._socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(configs[0].endpoint)
        self._fd: int = self._socket.FD
        self._next_batch_id = 0
        self._stopping = False
        self._watchdog: asyncio.Task | None = None
        self._hang_timeout = hang_timeout
        self._ready_timeout = ready_timeout
        self._first_ready: asyncio.Future[protocol.Ready] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, timeout: float) -> protocol.Ready:
        """Spawn every worker; return the first READY. Raise ConfigError if none comes."""
        loop = asyncio.get_running_loop()
        self._first_ready = loop.create_future()
        loop.add_reader(self._fd, self._drain)
        self._watchdog = start_supervised(self._watch(), "the worker watchdog")
        for worker in self.workers:
            self._spawn(worker)
        try:
            return await asyncio.wait_for(asyncio.shield(self._first_ready), timeout)
        except TimeoutError:
            raise ConfigError(
                f"no worker became ready within {timeout:g} s (--worker-ready-timeout)"
            ) from None

    @property
    def healthy(self) -> bool:
        return all(w.state is WorkerState.READY for w in self.workers)

    @property
    def any_ready(self) -> bool:
        return any(w.state is WorkerState.READY for w in self.workers)

    def _spawn(self, worker: WorkerHandle) -> None:
        worker.state = WorkerState.STARTING
        worker.ready = None
        worker.kill_reason = None
        worker.last_seen = time.monotonic()
        args = [sys.executable, "-m", "backend_worker",
                msgspec.json.encode(worker.config).decode()]
        worker.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        try:
            worker.pidfd = os.pidfd_open(worker.process.pid)
        except OSError:  # (EMFILE) unwatched, its death would go unseen: no such worker
            worker.process.kill()
            worker.process.wait()
            raise
        asyncio.get_running_loop().add_reader(worker.pidfd, self._on_exit, worker)
        log.info("worker %s started (pid %d)", worker.id, worker.process.pid)

    def _on_exit(self, worker: WorkerHandle) -> None:
        loop = asyncio.get_running_loop()
        assert worker.pidfd is not None and worker.process is not None
        loop.remove_reader(worker.pidfd)
        os.close(worker.pidfd)
        worker.pidfd = None
        code = worker.process.wait()
        how = worker.kill_reason or (f"signal {-code}" if code < 0 else f"exit code {code}")
        was = worker.state
        worker.state = WorkerState.DEAD
        self._fail_in_flight(worker, f"worker {worker.id} died ({how}) while computing")
        self.on_change()
        if self._stopping or was is WorkerState.STOPPING:
            log.info("worker %s stopped (%s)", worker.id, how)
            return
        self._restart_later(worker, f"died ({how})")

    def _restart_later(self, worker: WorkerHandle, what: str) -> None:
        worker.failures += 1
        delay = RESTART_BACKOFF[min(worker.failures - 1, len(RESTART_BACKOFF) - 1)]
        log.error("worker %s %s; restarting in %.1f s", worker.id, what, delay)
        asyncio.get_running_loop().call_later(delay, self._restart, worker)

    def _restart(self, worker: WorkerHandle) -> None:
        if not self._stopping and worker.state is WorkerState.DEAD:
            worker.restarts += 1
            try:
                self._spawn(worker)
            except OSError as exc:
                # fork or pidfd_open can fail for a while (EAGAIN at a pids limit, ENOMEM,
                # EMFILE). Raised out of this callback, it left the worker "starting" with no
                # process, never restarted: /health 503 for ever, and no worker at all once
                # each had met it. It is a failed start: tried again after the back-off.
                worker.state = WorkerState.DEAD
                self._restart_later(worker, f"could not be started ({exc})")

    def _silence_limit(self, worker: WorkerHandle) -> float:
        if worker.state is WorkerState.STARTING:
            return self._ready_timeout
        # A full batch may legitimately take long on a slow device: never less than 10x the
        # warm-up batch, which had exactly --max-batch-tokens tokens.
        warmup_s = worker.ready.warmup_ms / 1e3 if worker.ready else 0.0
        return max(self._hang_timeout, 10 * warmup_s, MIN_SILENCE_S)

    async def _watch(self) -> None:
        """Kill workers that went silent; the pidfd then reports the death as usual."""
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for worker in self.workers:
                if worker.state not in (WorkerState.STARTING, WorkerState.READY):
                    continue
                if worker.kill_reason is not None or worker.process is None:
                    continue
                silent = now - worker.last_seen
                if silent > self._silence_limit(worker):
                    self._kill(worker, f"hung: silent for {silent:.1f} s"
                               if worker.state is WorkerState.READY
                               else f"not ready after {silent:.0f} s")

    @staticmethod
    def _kill(worker: WorkerHandle, reason: str) -> None:
        """SIGKILL `worker`; the pidfd then reports the death as usual, `reason` its cause."""
        if worker.kill_reason is not None or worker.process is None:
            return
        worker.kill_reason = reason
        log.error("worker %s is %s; killing it", worker.id, reason)
        worker.process.kill()

    async def stop(self, timeout: float = 10.0) -> None:
        """Tell every worker to stop (STOP_SIGNAL: they finish what they hold), SIGKILL after
        `timeout`. Not SIGTERM, which workers ignore: a supervisor that sends it to the whole
        process group would stop them while the router still drains."""
        self._stopping = True
        live = [(w, w.process) for w in self.workers
                if w.process is not None and w.process.poll() is None]
        for worker, process in live:
            worker.state = WorkerState.STOPPING
            process.send_signal(STOP_SIGNAL)
        deadline = time.monotonic() + timeout
        for worker, process in live:
            while process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if process.poll() is None:
                log.warning("worker %s did not stop in time; killing it", worker.id)
                process.kill()
                process.wait()
        if self._watchdog is not None:
            self._watchdog.cancel()
        asyncio.get_running_loop().remove_reader(self._fd)
        self._socket.close(linger=0)
        self._context.term()

    # -- batches -----------------------------------------------------------------------------

    def pick(self) -> WorkerHandle | None:
        """The ready worker with a free slot and the fewest outstanding tokens."""
        free = [w for w in self.workers if w.has_free_slot]
        return min(free, key=lambda w: w.outstanding_tokens) if free else None

    def submit(self, worker: WorkerHandle, entries: list[Entry]) -> None:
        arrays = pack(entries)
        batch_id = self._next_batch_id
        self._next_batch_id += 1
        header = protocol.Batch(
            batch_id=batch_id,
            request_ids=request_ids(entries),
            outputs=[e.output for e in entries],
            max_len=int(arrays.lengths.max()),
            pool_from=([e.pool_from for e in entries]
                       if any(e.pool_from for e in entries) else []),
        )
        tokens = int(arrays.cu_seqlens[-1])
        dispatch = Dispatch(worker.id, batch_id, len(entries), tokens)
        now = time.perf_counter()
        for entry in entries:
            entry.dispatched_at = now
            entry.batch = dispatch
        worker.in_flight[batch_id] = InFlight(entries, tokens)
        self.metrics.batch_formed(len(entries), tokens)
        try:
            # NOBLOCK: the event loop never waits on a worker (a worker holds at most two
            # batches, far below the high-water mark: EAGAIN would mean a wedged worker).
            # (numpy's stubs declare ndarray a buffer only from Python 3.12)
            self._socket.send_multipart(
                [worker.id.encode(), *protocol.encode(header, *arrays)],  # type: ignore[list-item]
                zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # the worker vanished between pick and send
            del worker.in_flight[batch_id]
            self._fail(entries, f"worker {worker.id} unreachable: {exc}")
        # libzmq's FD signals an edge, and a send can consume the edge of a reply that already
        # waits: look, and drain on the next loop turn (not here: submit runs inside _drain).
        # In a context of its own: submit may run in a request's, whose id would otherwise
        # mark every line the drain logs (a worker ready, killed) and no other request's.
        if cast(int, self._socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            asyncio.get_running_loop().call_soon(self._drain, context=contextvars.Context())

    def _drain(self) -> None:
        """Handle every message waiting on the socket; the event loop calls this when the
        socket's FD signals. It stops only when the socket is empty, so that the next message
        raises a new edge."""
        try:
            while not self._socket.closed:  # (a drain that submit scheduled may follow stop)
                try:
                    frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    return
                worker = self._by_id.get(frames[0].bytes)
                if worker is None:
                    log.error("message from unknown worker %r", frames[0].bytes)
                    continue
                try:
                    message, buffers = protocol.decode(frames[1:])
                except msgspec.DecodeError as exc:
                    # Whichever batch it answered would wait for ever: the worker goes, its
                    # batches fail, and it is restarted; the server lives on.
                    self._kill(worker, f"garbled: it sent an undecodable message ({exc})")
                    continue
                worker.last_seen = time.monotonic()
                self._handle(worker, message, buffers)
        except Exception as exc:
            asyncio.get_running_loop().remove_reader(self._fd)
            shut_down_for("the worker receive loop", exc)

    def _handle(self, worker: WorkerHandle, message: protocol.Message, buffers) -> None:
        match message:
            case protocol.Result():
                done = worker.in_flight.pop(message.batch_id, None)
                if done is not None:
                    worker.batches_done += 1
                    worker.tokens_done += done.tokens
                    self.metrics.batch_inference.observe(message.compute_ms / 1e3)
                    try:
                        rows = protocol.result_rows(message, buffers, done.entries[0].output,
                                                    [e.length for e in done.entries])
                        if len(rows) != len(done.entries):
                            raise ValueError(f"{len(rows)} rows for {len(done.entries)} inputs")
                    except ValueError as exc:  # its own batch's loss, not the server's
                        log.error("batch %d: worker %s sent a malformed result (%s; requests: "
                                  "%s)", message.batch_id, worker.id, exc,
                                  ", ".join(request_ids(done.entries)) or "none named")
                        self._fail(done.entries, f"worker {worker.id} sent a malformed "
                                                 f"result: {exc}")
                        self.on_change()
                        return
                    finished = time.perf_counter()
                    for entry, row in zip(done.entries, rows, strict=True):
                        if not entry.future.done():
                            entry.future.set_result((row, finished))
            case protocol.Failed():
                done = worker.in_flight.pop(message.batch_id, None)
                if done is not None:
                    self._fail(done.entries, message.message)
            case protocol.Ready() if (worker.state is WorkerState.DEAD or worker.process is None
                                      or message.pid != worker.process.pid):
                # Sent just before a death that the pidfd reported first (or by the process
                # before a restart, its id being the same): marked ready, the dead worker
                # would take batches, and never be restarted.
                log.warning("worker %s: a READY from pid %d, which is not its live process",
                            worker.id, message.pid)
            case protocol.Ready():
                worker.state = WorkerState.READY
                worker.ready = message
                worker.failures = 0
                log.info("worker %s ready: pid %d, %s %s, cost model %s", worker.id, message.pid,
                         message.device, message.dtype, message.cost_model.value)
                if self._first_ready is not None and not self._first_ready.done():
                    self._first_ready.set_result(message)
            case protocol.Heartbeat():
                return  # last_seen is all it is for
            case protocol.Fatal():
                log.error("worker %s cannot start: %s", worker.id, message.message)
                if self._first_ready is not None and not self._first_ready.done():
                    self._first_ready.set_exception(
                        ConfigError(f"the model cannot be served: {message.message}"))
            case _:
                self._kill(worker, f"garbled: it sent a {type(message).__name__}")
        self.on_change()

    def _fail_in_flight(self, worker: WorkerHandle, message: str) -> None:
        batches, worker.in_flight = worker.in_flight, {}
        for batch_id, batch in batches.items():
            # What ties the clients' failed requests to this death in the log.
            log.error("batch %d lost with worker %s (requests: %s)", batch_id, worker.id,
                      ", ".join(request_ids(batch.entries)) or "none named")
            self._fail(batch.entries, message)

    @staticmethod
    def _fail(entries: list[Entry], message: str) -> None:
        for entry in entries:
            if not entry.future.done():
                entry.future.set_exception(backend(message))

    def close_now(self) -> None:
        """Last resort at exit: no worker may outlive the router."""
        # Nor come back: a worker killed here is no death to restart it from (an exit after a
        # failed start reaches this without stop()).
        self._stopping = True
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.kill()
        with contextlib.suppress(RuntimeError):  # no running loop: nothing reads for us
            asyncio.get_running_loop().remove_reader(self._fd)
        with contextlib.suppress(zmq.ZMQError):
            self._socket.close(linger=0)
