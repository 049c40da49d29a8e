"""What a tei.v1 call leaves behind (router.grpc.observed), over a real socket to the real
server (build_server) with a stand-in service that notes the log span its answers run in: the
client's `x-request-id` metadata, else a new one, comes back in the trailing metadata whatever
the status, is the log span's (so the batch entries' and the log lines'), shared by a stream's
messages, and with tracing carries the trace's ids and sits on the call's span; at debug, each
call has an access line with its status and time."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health

from router.grpc import server as grpc_server
from router.grpc.protos import pb, services
from router.results import Timings
from shared import logs
from shared.errors import validation

BAD = "bad"  # the stand-in refuses this input (INVALID_ARGUMENT)
NEW_ID = re.compile(r"[0-9a-f]{32}")


class _Service:
    def __init__(self, tracer: Any = None) -> None:
        self.tracer = tracer
        self.admission = None
        self.seen: list[logs.LogSpan | None] = []

    async def embed(self, request) -> SimpleNamespace:
        self.seen.append(logs.current_span.get())
        logging.getLogger("test.grpc").warning("answering %s", request.inputs)
        if request.inputs == BAD:
            raise validation("Input validation error: bad")
        return SimpleNamespace(vectors=np.array([[0.5, 2.0]], dtype=np.float32),
                               timings=Timings(characters=1, tokens=1, tokenization_ms=0.0,
                                               queue_ms=0.0, inference_ms=0.0,
                                               admitted_at=time.perf_counter()))


def _served(service: _Service, client: Callable[[Any], Awaitable[None]]) -> None:
    state = SimpleNamespace(
        service=service, model=SimpleNamespace(kind="embedding"), compute_type="cpu",
        config=SimpleNamespace(api_key=None, payload_limit=2_000_000,
                               max_concurrent_requests=8, grpc_max_parallel_stream_requests=None))

    async def run() -> None:
        server = grpc_server.build_server(state, health.aio.HealthServicer())  # type: ignore[arg-type]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await client(services.EmbedStub(channel))
        finally:
            await server.stop(None)

    asyncio.run(run())


def _echoed(metadata: Any) -> str:
    ids = [value for key, value in metadata or () if key == "x-request-id"]
    assert len(ids) == 1, metadata
    return ids[0]


def test_a_calls_own_id_is_its_log_span_and_comes_back_in_the_trailing_metadata() -> None:
    service = _Service()
    echoed: list[str] = []

    async def client(stub) -> None:
        call = stub.Embed(pb.EmbedRequest(inputs="a"), metadata=(("x-request-id", "abc-1"),))
        await call
        echoed.append(_echoed(await call.trailing_metadata()))

    written = io.StringIO()
    handler = logging.StreamHandler(written)
    handler.setFormatter(logs.TextFormatter("router"))
    logging.getLogger("test.grpc").addHandler(handler)
    try:
        _served(service, client)
    finally:
        logging.getLogger("test.grpc").removeHandler(handler)
    assert echoed == ["abc-1"]
    assert service.seen == [logs.LogSpan("/tei.v1.Embed/Embed", "abc-1")]
    assert "/tei.v1.Embed/Embed{request_id=abc-1}: answering a" in written.getvalue()


@pytest.mark.parametrize("given", [None, "x" * 129, "two words"])
def test_a_call_without_a_usable_id_gets_a_new_one(given: str | None) -> None:
    service = _Service()
    echoed: list[str] = []

    async def client(stub) -> None:
        metadata = () if given is None else (("x-request-id", given),)
        for _ in range(2):
            call = stub.Embed(pb.EmbedRequest(inputs="a"), metadata=metadata)
            await call
            echoed.append(_echoed(await call.trailing_metadata()))

    _served(service, client)
    assert all(NEW_ID.fullmatch(i) for i in echoed) and echoed[0] != echoed[1], echoed
    assert [span.request_id for span in service.seen if span] == echoed


def test_a_failed_call_carries_its_id_with_its_status() -> None:
    service = _Service()
    failures: list[grpc.aio.AioRpcError] = []

    async def client(stub) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await stub.Embed(pb.EmbedRequest(inputs=BAD), metadata=(("x-request-id", "u-1"),))
        stream = stub.EmbedStream([pb.EmbedRequest(inputs="a"), pb.EmbedRequest(inputs=BAD)],
                                  metadata=(("x-request-id", "s-1"),))
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            async for _ in stream:
                pass
        failures.extend((unary.value, streamed.value))

    _served(service, client)
    assert [f.code() for f in failures] == [grpc.StatusCode.INVALID_ARGUMENT] * 2
    assert [_echoed(f.trailing_metadata()) for f in failures] == ["u-1", "s-1"]


def test_a_streams_messages_share_its_id() -> None:
    service = _Service()
    echoed: list[str] = []

    async def client(stub) -> None:
        stream = stub.EmbedStream([pb.EmbedRequest(inputs=t) for t in "abc"])
        assert len([reply async for reply in stream]) == 3
        echoed.append(_echoed(await stream.trailing_metadata()))

    _served(service, client)
    assert service.seen == [logs.LogSpan("/tei.v1.Embed/EmbedStream", echoed[0])] * 3
    assert logs.current_span.get() is None  # nothing left behind in the test's own context


def test_a_traced_calls_log_span_carries_the_traces_ids_and_its_span_the_id() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    service = _Service(provider.get_tracer("test"))

    async def client(stub) -> None:
        await stub.Embed(pb.EmbedRequest(inputs="a"), metadata=(("x-request-id", "t-1"),))
        stream = stub.EmbedStream([pb.EmbedRequest(inputs="b")] * 2,
                                  metadata=(("x-request-id", "t-2"),))
        assert len([reply async for reply in stream]) == 2

    _served(service, client)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    for name, request_id, seen in (("/tei.v1.Embed/Embed", "t-1", service.seen[:1]),
                                   ("/tei.v1.Embed/EmbedStream", "t-2", service.seen[1:])):
        span = spans[name]
        assert (span.attributes or {}).get("request_id") == request_id
        context = span.get_span_context()
        assert context is not None
        assert seen == [logs.LogSpan(name, request_id, f"{context.trace_id:032x}",
                                     f"{context.span_id:016x}")] * len(seen)


def test_at_debug_each_call_has_an_access_line_with_its_status() -> None:
    service = _Service()

    async def client(stub) -> None:
        await stub.Embed(pb.EmbedRequest(inputs="a"), metadata=(("x-request-id", "d-1"),))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Embed(pb.EmbedRequest(inputs=BAD), metadata=(("x-request-id", "d-2"),))
        stream = stub.EmbedStream([pb.EmbedRequest(inputs="a")] * 2,
                                  metadata=(("x-request-id", "d-3"),))
        assert len([reply async for reply in stream]) == 2

    written = io.StringIO()
    handler = logging.StreamHandler(written)
    handler.setFormatter(logs.TextFormatter("router"))
    access = logging.getLogger("embedserve.access")
    level = access.level
    access.addHandler(handler)
    access.setLevel(logging.DEBUG)
    try:
        _served(service, client)
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    lines = written.getvalue().splitlines()
    assert [re.sub(r".*embedserve.access: | in [0-9.]+ ms$", "", line) for line in lines] == [
        "/tei.v1.Embed/Embed{request_id=d-1}: /tei.v1.Embed/Embed -> OK",
        "/tei.v1.Embed/Embed{request_id=d-2}: /tei.v1.Embed/Embed -> INVALID_ARGUMENT",
        "/tei.v1.Embed/EmbedStream{request_id=d-3}: /tei.v1.Embed/EmbedStream -> OK"], lines
