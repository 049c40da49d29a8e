"""A client whose deadline passes, or who cancels, while its call is being answered: over a real
socket to the real server (build_server) with a stand-in service whose answers wait until
cancelled. The client sees DEADLINE_EXCEEDED (CANCELLED for its own cancel); the server cancels
the call's work (unary, stream, and a request stream's unary answer alike), logs nothing at
WARNING or above, and answers the next call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health

from router.grpc import server as grpc_server
from router.grpc.protos import pb, services
from router.results import Timings

FAST = "fast"  # the stand-in answers this input at once; any other waits until cancelled


class _Work:
    """The stand-in service's answers: how many started, how many were cancelled."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0

    async def answer(self, text: str) -> None:
        if text == FAST:
            return
        self.started += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def embed(self, request) -> SimpleNamespace:
        await self.answer(request.inputs)
        return SimpleNamespace(vectors=np.array([[0.5, 2.0]], dtype=np.float32),
                               timings=Timings(characters=1, tokens=1, tokenization_ms=0.0,
                                               queue_ms=0.0, inference_ms=0.0,
                                               admitted_at=time.perf_counter()))


def _state(work: _Work, tracer: Any = None) -> SimpleNamespace:
    service = SimpleNamespace(tracer=tracer, embed=work.embed, admission=None)
    return SimpleNamespace(
        service=service, model=SimpleNamespace(kind="embedding"), compute_type="cpu",
        config=SimpleNamespace(api_key=None, payload_limit=2_000_000,
                               max_concurrent_requests=8,
                               grpc_max_parallel_stream_requests=None))


async def _until(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _serving(work: _Work, tracer: Any = None) -> AsyncIterator[int]:
    """The server's port; on the way out every answer a call started was cancelled, not left
    running, and the server still answers."""
    server = grpc_server.build_server(_state(work, tracer), health.aio.HealthServicer())  # type: ignore[arg-type]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
        await _until(lambda: work.cancelled == work.started)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await services.EmbedStub(channel).Embed(pb.EmbedRequest(inputs=FAST),
                                                            timeout=5)
        assert list(reply.embeddings) == [0.5, 2.0]
    finally:
        await server.stop(None)


async def _served(work: _Work, client: Callable[[Any], Awaitable[None]],
                  tracer: Any = None) -> None:
    """`client(stub)` with a grpc.aio stub of the server's Embed service."""
    async with (_serving(work, tracer) as port,
                grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel):
        await client(services.EmbedStub(channel))


@pytest.fixture
def quiet(caplog: pytest.LogCaptureFixture):
    """Nothing at WARNING or above is logged: a client that went away is no server fault."""
    caplog.set_level(logging.WARNING)
    yield
    # (get_records: in a fixture's teardown, `records` would be the teardown's only)
    assert [r.getMessage() for r in caplog.get_records("call")
            if r.levelno >= logging.WARNING] == []


def test_a_unary_call_past_its_deadline_is_cancelled_quietly(quiet) -> None:
    work = _Work()

    async def client(stub) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Embed(pb.EmbedRequest(inputs="slow"), timeout=0.2)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await _until(lambda: work.cancelled == 1)

    asyncio.run(_served(work, client))
    assert (work.started, work.cancelled) == (1, 1)


def test_a_unary_call_the_client_cancels_is_cancelled_quietly(quiet) -> None:
    work = _Work()

    async def client(stub) -> None:
        call = stub.Embed(pb.EmbedRequest(inputs="slow"))
        await _until(lambda: work.started == 1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await _until(lambda: work.cancelled == 1)

    asyncio.run(_served(work, client))


def test_a_stream_past_its_deadline_mid_stream_drops_its_answers_in_flight(quiet) -> None:
    """Replies already sent stay sent; the answers still in flight (several: a stream works
    ahead of its replies) are cancelled. A sync client: grpc.aio's stream calls can end with
    INTERNAL "Internal error from Core" or a bare CancelledError at a deadline, whatever the
    server does (grpc/grpc#2685: DEADLINE_EXCEEDED is best effort over HTTP/2)."""
    work = _Work()

    def call(port: int) -> tuple[int, grpc.StatusCode]:
        messages = [pb.EmbedRequest(inputs=FAST)] * 2 + [pb.EmbedRequest(inputs="slow")] * 5
        replies = 0
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                for _ in services.EmbedStub(channel).EmbedStream(iter(messages), timeout=0.5):
                    replies += 1
            except grpc.RpcError as exc:
                return replies, exc.code()
        return replies, grpc.StatusCode.OK

    async def main() -> None:
        async with _serving(work) as port:
            assert await asyncio.to_thread(call, port) == (
                2, grpc.StatusCode.DEADLINE_EXCEEDED)

    asyncio.run(main())
    assert work.started == work.cancelled >= 2


def test_a_stream_the_client_cancels_after_a_reply_drops_its_answers_in_flight(quiet) -> None:
    work = _Work()

    async def client(stub) -> None:
        call = stub.EmbedStream([pb.EmbedRequest(inputs=FAST)]
                                + [pb.EmbedRequest(inputs="slow")] * 5)
        assert list((await call.read()).embeddings) == [0.5, 2.0]
        await _until(lambda: work.started >= 2)
        call.cancel()
        await _until(lambda: work.cancelled == work.started)

    asyncio.run(_served(work, client))
    assert work.started == work.cancelled >= 2


def test_the_span_of_a_call_its_client_abandoned_has_its_status_not_ok(
        quiet, caplog: pytest.LogCaptureFixture) -> None:
    """With --otlp-endpoint: grpc.aio cancels the handler and sends nothing, so the call's
    status stays unset, which the span recorded as OK."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    work = _Work()

    async def client(stub) -> None:
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Embed(pb.EmbedRequest(inputs="slow"), timeout=0.2)
        await _until(lambda: work.cancelled == 1)
        call = stub.Embed(pb.EmbedRequest(inputs="slow"), timeout=30)
        await _until(lambda: work.started == 2)
        call.cancel()
        await _until(lambda: work.cancelled == 2)
        stream = stub.EmbedStream([pb.EmbedRequest(inputs=FAST)]
                                  + [pb.EmbedRequest(inputs="slow")] * 3)
        await stream.read()
        await _until(lambda: work.started >= 4)
        stream.cancel()
        await _until(lambda: len(exporter.get_finished_spans()) == 3)

    with caplog.at_level(logging.DEBUG, logger="embedserve.access"):
        asyncio.run(_served(work, client, provider.get_tracer("test")))
    statuses = [(span.name, (span.attributes or {}).get("rpc.grpc.status_code"))
                for span in exporter.get_finished_spans()]
    assert statuses == [("/tei.v1.Embed/Embed", "DEADLINE_EXCEEDED"),
                        ("/tei.v1.Embed/Embed", "CANCELLED"),
                        ("/tei.v1.Embed/EmbedStream", "CANCELLED"),
                        ("/tei.v1.Embed/Embed", "OK")]  # (the check that it answers on)
    # The access lines (LOG_LEVEL=debug) say the same.
    access = [r.getMessage().rsplit(" in ", 1)[0] for r in caplog.records
              if r.name == "embedserve.access"]
    assert access == [f"{name} -> {status}" for name, status in statuses]
