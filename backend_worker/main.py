"""Backend worker process: load the model, say READY, then compute batches until told to stop.

The process is a supervised child (SGLang-style prologue): it dies with its parent, logs under
its own name, and reports a start-up failure as a typed `Fatal` message before exiting, so the
router can print why instead of timing out. ZeroMQ's own IO thread receives the next batch while
this thread computes the current one, so the device does not wait on the socket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import msgspec
import numpy as np
import zmq

from backend_worker.memory import HeapTrimmer, cap_primitive_cache
from shared import protocol
from shared.dtypes import default_dtype, emulated_dtype
from shared.errors import ConfigError
from shared.logs import setup_logging
from shared.modelinfo import load_model_info
from shared.process import STOP_SIGNAL, supervised_child
from shared.protocol import WorkerConfig

if TYPE_CHECKING:  # imported in load(), after the process is set up
    import torch

log = logging.getLogger("embedserve.worker")

_POLL_MS = 200


def warmup_arrays(max_batch_tokens: int, max_len: int, packed: bool) -> protocol.BatchArrays:
    """One batch costing exactly `max_batch_tokens` (padded: within a token per sequence)."""
    max_len = min(max_len, max_batch_tokens)
    count, rest = divmod(max_batch_tokens, max_len)
    lengths = [max_len] * count + ([rest] if packed and rest else [])
    if not packed and rest:
        # The router fills a padded batch to longest * count <= the budget with any lengths
        # (two of 500 under 1000, max_len 512), where whole max_len sequences may cost half
        # of it: one sequence more, evenly shorter, when that costs more.
        shorter = max_batch_tokens // (count + 1)
        if shorter * (count + 1) > max_len * count:
            lengths = [shorter] * (count + 1)
    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    total = int(cu[-1])
    positions = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
    # Token 0 is a valid id in every vocabulary; the values do not matter, the shapes do.
    zeros = np.zeros(total, dtype=np.int32)
    return protocol.BatchArrays(zeros, positions, zeros.copy(), cu)


@contextlib.contextmanager
def _out_of_memory_says_which_flag(max_batch_tokens: int, device: str) -> Iterator[None]:
    """Warm-up runs the largest batch the router will ever send: running out of memory there
    is a configuration problem, so say which knob to turn instead of printing a traceback."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        text = str(exc)
        if not isinstance(exc, MemoryError) and "out of memory" not in text.lower() \
                and "can't allocate memory" not in text:
            raise
        raise ConfigError(
            f"out of memory on {device} warming up with a batch of --max-batch-tokens "
            f"{max_batch_tokens}: lower --max-batch-tokens (or use a smaller --dtype, or free "
            f"the device). {text.splitlines()[0] if text else ''}"
        ) from exc


def device_fault(device: torch.device) -> str | None:
    """Why `device` can no longer compute after a failed batch, or None if it still can. Some
    CUDA errors (an illegal memory access, a device-side assert) poison the process's context:
    every later batch would fail too while the worker stays alive and answers heartbeats, so
    /health would say 200 while every request gets 424. A one-element op tells the two apart
    (an out-of-memory, or a bad batch, leaves the device usable)."""
    import torch

    from backend_worker.engine import first_line

    try:
        torch.ones(1, device=device).add_(1).cpu()  # .cpu() waits for the device
    except RuntimeError as exc:  # what torch raises for a CUDA error
        return first_line(exc)
    return None


class Worker:
    def __init__(self, config: WorkerConfig, socket: zmq.Socket) -> None:
        self.config = config
        self.socket = socket
        self.stopping = False
        # Set when a failed batch left the device unusable: the worker exits (status 1) and
        # the router restarts it, with a fresh device context.
        self.device_lost: str | None = None
        self.warmup_ms = 0.0
        # Per output kind, how to compute it; fixed at load (with the model's head, if any).
        self.outputs: dict[protocol.OutputKind, Head] = {}

    def send(self, message: protocol.Message, *arrays: np.ndarray) -> None:
        # (numpy's stubs declare ndarray a buffer only from Python 3.12)
        self.socket.send_multipart(protocol.encode(message, *arrays),  # type: ignore[arg-type]
                                   copy=False)

    def load(self):
        import torch

        from backend_worker.engine import Engine
        from backend_worker.heads import build_head
        from backend_worker.lexical import build_lexical

        info = load_model_info(self.config.model_dir, self.config.pooling, self.config.dense_path)
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)
        device = self.config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda:"):
            torch.cuda.set_device(torch.device(device))  # this process owns this one GPU
        dtype_name = self.config.dtype or default_dtype(torch.device(device).type,
                                                        model_type=info.model_type)
        if emulated_dtype(torch.device(device).type, dtype_name):
            log.warning("this CPU has no native %s matmul: torch emulates it, many times slower "
                        "than float32 (the default here; --dtype float32)", dtype_name)
        engine = Engine.load(info, device=device, dtype=getattr(torch, dtype_name))
        head = build_head(info, engine.device)
        lexical = (build_lexical(info.lexical, info.hidden_size, info.vocab_size, engine.device)
                   if info.lexical is not None else None)
        served = self.outputs = outputs(engine, head, lexical)
        # Warm up on what the model serves (a SPLADE head's [tokens, vocab] chunks are the
        # memory peak, not pooling), so the first real batch meets no allocation surprise.
        primary = next(k for k in (protocol.OutputKind.POOLED, protocol.OutputKind.LOGITS,
                                   protocol.OutputKind.SPARSE) if k in served)
        with _out_of_memory_says_which_flag(self.config.max_batch_tokens, engine.device_name):
            started = time.perf_counter()
            served[primary](warmup_arrays(
                self.config.max_batch_tokens, info.max_input_length,
                engine.cost_model is protocol.CostModel.PACKED,
            ), [])
            # The batch alone: the router's hang yardstick (Ready.warmup_ms), capture excluded.
            self.warmup_ms = (time.perf_counter() - started) * 1e3
            log.info("warm-up with %d tokens took %.0f ms", self.config.max_batch_tokens,
                     self.warmup_ms)
            # Graphs end in what serves short requests: the pooler, or a classifier's head
            # (a SPLADE head's [tokens, vocab] output is not a latency path).
            if (engine.device.type == "cuda" and self.config.cuda_graphs
                    and primary is not protocol.OutputKind.SPARSE):
                from backend_worker.graphs import cuda_capture

                started = time.perf_counter()
                if engine.capture_graphs(self.config.max_batch_tokens, cuda_capture(),
                                         reduce=head if primary is protocol.OutputKind.LOGITS
                                         else None):
                    log.info("captured CUDA graphs in %.0f ms",
                             (time.perf_counter() - started) * 1e3)
        return info, engine

    def serve(self, engine, wakeup: int | None = None) -> None:
        """Compute batches until stopped (drained), the router is gone or the device is lost.
        `wakeup`, from `stop_on_signal`, ends a wait as the stop signal comes."""
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        if wakeup is not None:
            poller.register(wakeup, zmq.POLLIN)
        last_sent = time.monotonic()
        heap = HeapTrimmer()
        while True:
            ready = dict(poller.poll(0 if self.stopping else _POLL_MS))
            if wakeup is not None and wakeup in ready:
                os.read(wakeup, 64)  # a byte per signal: emptied, so the next wait can wait
            if self.socket not in ready:
                if self.stopping:
                    return  # drained: nothing left to compute
                heap.idle()  # no batch for _POLL_MS: a good moment to give memory back
                if os.getppid() != self.config.parent_pid:
                    log.error("router is gone; exiting")
                    return
                if time.monotonic() - last_sent >= protocol.HEARTBEAT_S:
                    self.send(protocol.Heartbeat())
                    last_sent = time.monotonic()
                continue
            # Copied: plain bytes come out of libzmq ~10 us sooner than zero-copy Frames (one
            # query's batch), and a full batch (192 KB at 16k tokens) is small next to its compute.
            frames = self.socket.recv_multipart()
            message, buffers = protocol.decode(frames)
            if not isinstance(message, protocol.Batch):
                raise RuntimeError(f"worker got an unexpected {type(message).__name__}")
            self.compute(engine, message, buffers)
            if self.device_lost is not None:
                return
            heap.worked()
            last_sent = time.monotonic()

    def compute(self, engine, batch: protocol.Batch, buffers: list[memoryview]) -> None:
        started = time.perf_counter()
        try:
            if len(set(batch.outputs)) != 1:
                raise ValueError("a batch must ask for one output kind")
            head = self.outputs.get(batch.outputs[0])
            if head is None:
                raise ValueError(f"this model does not give {batch.outputs[0].name} outputs")
            rows, dim, *arrays = head(protocol.batch_arrays(buffers), batch.pool_from)
        except Exception as exc:
            # One bad batch costs only its own requests; the worker keeps serving, unless the
            # failure broke the device itself.
            log.exception("batch %d failed (requests: %s)", batch.batch_id,
                          ", ".join(batch.request_ids) or "none named")
            self.send(protocol.Failed(batch.batch_id, f"inference failed: {exc}"))
            self.device_lost = device_fault(engine.device)
            if self.device_lost is not None:
                log.critical("%s can no longer compute (%s): exiting, for the router to "
                             "restart this worker", engine.device, self.device_lost)
            return
        elapsed = (time.perf_counter() - started) * 1e3
        self.send(protocol.Result(batch.batch_id, rows, dim, elapsed), *arrays)


# (arrays, pool_from: the Batch's leading tokens per entry that pooling leaves out)
Head = Callable[[protocol.BatchArrays, list[int]], tuple]


def _dense(array: np.ndarray) -> tuple:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return array.shape[0], array.shape[1], array


def outputs(engine, head=None, lexical=None) -> dict[protocol.OutputKind, Head]:
    """What this engine can compute, per output kind: (rows, dim, *frames) of a Result.

    An embedding model gives POOLED; a classifier / re-ranker gives LOGITS and a SPLADE or CSR
    model SPARSE (only) through its `head` (backend_worker.heads); BGE-M3 gives SPARSE too, its
    `lexical` weights (backend_worker.lexical); every model gives ALL_TOKENS.
    """
    from backend_worker.heads import run_head
    from backend_worker.lexical import run_lexical

    served: dict[protocol.OutputKind, Head] = (
        {protocol.OutputKind.POOLED:
         lambda arrays, pool_from: _dense(engine.embed(arrays, pool_from))}
        if head is None else {head.output: _unpooled(run_head(engine, head))}
    )
    if lexical is not None:
        served[protocol.OutputKind.SPARSE] = _unpooled(run_lexical(engine, lexical))
    served[protocol.OutputKind.ALL_TOKENS] = _unpooled(lambda arrays: _dense(
        engine.hidden_states(arrays).float().cpu().numpy()))
    return served


def _unpooled(compute: Callable[[protocol.BatchArrays], tuple]) -> Head:
    """An output of every token, or of a head that pools by itself: a prompt left out of the
    Pooling module's vector is still part of these (as in sentence-transformers)."""
    return lambda arrays, pool_from: compute(arrays)


def stop_on_signal(worker: Worker) -> int:
    """Make STOP_SIGNAL (the router's alone: SIGTERM is ignored) stop `worker` once it has
    computed the batches it received. Returns a pipe's read end that the signal makes readable:
    Python runs a handler only between bytecodes, and pyzmq resumes an interrupted poll, so
    without it an idle worker heard the signal only at its poll's timeout (up to 200 ms)."""
    def on_stop(signum: int, frame: object) -> None:
        log.info("told to stop: finishing received batches, then exiting")
        worker.stopping = True

    read, write = os.pipe()
    for end in (read, write):
        os.set_blocking(end, False)  # set_wakeup_fd's condition; reads of an empty pipe return
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    signal.signal(STOP_SIGNAL, on_stop)
    return read


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = msgspec.json.decode(argv[0], type=WorkerConfig)
    supervised_child(config.parent_pid)
    cap_primitive_cache()  # before torch is imported (Worker.load)
    setup_logging(config.json_output, f"worker-{config.worker_id}")
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.IDENTITY, config.worker_id.encode())
    socket.setsockopt(zmq.LINGER, 2000)
    socket.connect(config.endpoint)
    worker = Worker(config, socket)
    wakeup = stop_on_signal(worker)
    try:
        info, engine = worker.load()
    except Exception as exc:
        if isinstance(exc, ConfigError):  # a refusal that names its reason: no traceback
            log.error("cannot load the model: %s", exc)
        else:
            log.exception("cannot load the model")
        worker.send(protocol.Fatal(config.worker_id, f"{type(exc).__name__}: {exc}"))
        socket.close(linger=2000)
        # Waits (up to the linger) until the Fatal is out: the process leaves by os._exit
        # (__main__), which would drop a message zmq's I/O thread has not sent yet.
        context.term()
        return 1
    worker.send(protocol.Ready(
        worker_id=config.worker_id,
        pid=os.getpid(),
        device=engine.device_name,
        dtype=engine.dtype_name,
        hidden_size=info.hidden_size,
        embedding_dim=info.embedding_dim,
        vocab_size=info.vocab_size,
        max_positions=engine.max_positions,
        cost_model=engine.cost_model,
        outputs=sorted(worker.outputs),
        warmup_ms=worker.warmup_ms,
    ))
    log.info("ready on %s (%s)", engine.device_name, engine.dtype_name)
    worker.serve(engine, wakeup)
    socket.close(linger=2000)  # the failed batch's answer still goes out
    context.term()
    return 0 if worker.device_lost is None else 1
