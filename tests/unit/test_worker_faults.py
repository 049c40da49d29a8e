"""A failed batch costs its own requests; one that broke the device also ends the worker, for
the router to restart it (a poisoned CUDA context would fail every later batch too). The serve
loop's other ends: a lost router and the stop signal."""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import msgspec
import numpy as np
import pytest
import torch
import zmq

from backend_worker import main as worker_main
from backend_worker.main import Worker, device_fault
from shared import protocol
from shared.protocol import WorkerConfig

CONFIG = WorkerConfig(worker_id="0", endpoint="ipc:///nowhere", model_dir="/nowhere",
                      pooling=None, dense_path=None, device="cpu", dtype=None,
                      max_batch_tokens=64, parent_pid=1, json_output=False)


class _Socket:
    def __init__(self) -> None:
        self.sent: list[protocol.Message] = []

    def send_multipart(self, frames, copy: bool = False) -> None:
        self.sent.append(protocol.decode(list(frames))[0])


def _failing(arrays, pool_from) -> tuple:
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def _batch() -> tuple[protocol.Batch, list[memoryview]]:
    ids = np.array([101, 7, 102], dtype=np.int32)
    arrays = (ids, np.arange(3, dtype=np.int32), np.zeros(3, dtype=np.int32),
              np.array([0, 3], dtype=np.int32))
    header = protocol.Batch(batch_id=5, request_ids=["r1"], outputs=[protocol.OutputKind.POOLED],
                            max_len=3)
    return header, [memoryview(a) for a in arrays]


@pytest.mark.parametrize("fault", [None, "CUDA error: an illegal memory access"])
def test_a_failed_batch_is_answered_and_a_broken_device_is_noted(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        fault: str | None) -> None:
    monkeypatch.setattr(worker_main, "device_fault", lambda device: fault)
    socket = _Socket()
    worker = Worker(CONFIG, socket)  # type: ignore[arg-type]
    worker.outputs = {protocol.OutputKind.POOLED: _failing}
    worker.compute(SimpleNamespace(device=torch.device("cpu")), *_batch())
    [answer] = socket.sent
    assert isinstance(answer, protocol.Failed) and answer.batch_id == 5
    assert "illegal memory access" in answer.message
    assert worker.device_lost == fault
    assert "batch 5 failed (requests: r1)" in caplog.messages


def test_the_serve_loop_ends_once_the_device_is_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_main, "device_fault", lambda device: "CUDA error: poisoned")
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind("inproc://faults")
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"0")
    dealer.connect("inproc://faults")
    try:
        # The real parent: a worker whose parent is gone also stops (not the reason sought).
        worker = Worker(msgspec.structs.replace(CONFIG, parent_pid=os.getppid()), dealer)
        worker.outputs = {protocol.OutputKind.POOLED: _failing}
        dealer.send(b"hello")  # so the router knows the dealer's identity
        assert router.recv_multipart()[0] == b"0"
        header, buffers = _batch()
        router.send_multipart([b"0", *protocol.encode(header, *(np.asarray(b) for b in buffers))])
        done = threading.Thread(target=worker.serve,
                                args=(SimpleNamespace(device=torch.device("cpu")),))
        done.start()
        done.join(timeout=10)
        assert not done.is_alive(), "the worker kept serving on a lost device"
        answer = protocol.decode(router.recv_multipart()[1:])[0]
        assert isinstance(answer, protocol.Failed) and worker.device_lost == "CUDA error: poisoned"
    finally:
        dealer.close(linger=0)
        router.close(linger=0)
        context.term()


def test_a_usable_device_has_no_fault() -> None:
    assert device_fault(torch.device("cpu")) is None


# The worker process as the router starts it, its model load failing at once.
_FAILING_WORKER = """
import runpy, sys
from backend_worker import main
from shared.errors import ConfigError
def load(self):
    raise ConfigError("no weights here")
main.Worker.load = load
sys.argv = ["backend_worker", sys.argv[1]]
runpy.run_module("backend_worker", run_name="__main__")
"""


def test_a_worker_that_cannot_load_delivers_its_fatal_before_leaving(tmp_path) -> None:
    # The worker leaves by os._exit, which does not wait for zmq's I/O thread: its Fatal
    # (why the model cannot be served, the router's only word of it) must be out before.
    # The router binds only once the worker has failed, so a Fatal still queued is seen lost.
    import subprocess
    import sys

    endpoint = f"ipc://{tmp_path}/workers.sock"
    config = msgspec.structs.replace(CONFIG, endpoint=endpoint, parent_pid=os.getpid())
    worker = subprocess.Popen(
        [sys.executable, "-c", _FAILING_WORKER, msgspec.json.encode(config).decode()],
        stderr=subprocess.PIPE, text=True)
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    try:
        assert worker.stderr is not None
        for line in worker.stderr:
            if "cannot load the model" in line:
                break
        router.bind(endpoint)
        assert router.poll(5000), "no Fatal came"
        message, _ = protocol.decode(router.recv_multipart()[1:])
        assert isinstance(message, protocol.Fatal) and "no weights here" in message.message
        assert worker.wait(timeout=10) == 1
    finally:
        worker.kill()
        router.close(linger=0)
        context.term()


def test_the_stop_signal_ends_an_idle_wait_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The router waits for its workers to stop (a rolling restart waits with it): an idle
    worker hears the signal as it comes, not at its poll's timeout, here made 30 s."""
    import signal
    import time

    from shared.process import STOP_SIGNAL

    monkeypatch.setattr(worker_main, "_POLL_MS", 30_000)
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind("inproc://stop")
    dealer = context.socket(zmq.DEALER)
    dealer.connect("inproc://stop")
    previous = signal.getsignal(STOP_SIGNAL)
    previous_wakeup = signal.set_wakeup_fd(-1)
    worker = Worker(msgspec.structs.replace(CONFIG, parent_pid=os.getppid()), dealer)
    wakeup = worker_main.stop_on_signal(worker)
    try:
        threading.Timer(0.3, os.kill, (os.getpid(), STOP_SIGNAL)).start()
        started = time.monotonic()
        worker.serve(SimpleNamespace(device=torch.device("cpu")), wakeup)  # the main thread's
        assert worker.stopping
        assert time.monotonic() - started < 15, "the stop waited for the poll's timeout"
    finally:
        signal.signal(STOP_SIGNAL, previous)
        os.close(signal.set_wakeup_fd(previous_wakeup))  # the pipe's write end
        os.close(wakeup)
        dealer.close(linger=0)
        router.close(linger=0)
        context.term()
