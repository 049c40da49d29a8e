"""A failed batch costs its own requests; one that broke the device also ends the worker, for
the router to restart it (a poisoned CUDA context would fail every later batch too)."""

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
from shared.config import WorkerConfig

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
    header = protocol.Batch(batch_id=5, request_ids=[1], outputs=[protocol.OutputKind.POOLED],
                            max_len=3)
    return header, [memoryview(a) for a in arrays]


@pytest.mark.parametrize("fault", [None, "CUDA error: an illegal memory access"])
def test_a_failed_batch_is_answered_and_a_broken_device_is_noted(
        monkeypatch: pytest.MonkeyPatch, fault: str | None) -> None:
    monkeypatch.setattr(worker_main, "device_fault", lambda device: fault)
    socket = _Socket()
    worker = Worker(CONFIG, socket)  # type: ignore[arg-type]
    worker.outputs = {protocol.OutputKind.POOLED: _failing}
    worker.compute(SimpleNamespace(device=torch.device("cpu")), *_batch())
    [answer] = socket.sent
    assert isinstance(answer, protocol.Failed) and answer.batch_id == 5
    assert "illegal memory access" in answer.message
    assert worker.device_lost == fault


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
