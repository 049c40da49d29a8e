"""Tracing in-process, with the SDK's in-memory exporter: the request span continues the
caller's `traceparent`, the phase spans are its children with the batch facts, and routes that
are probed or scraped are not traced."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from router.http import RequestIdMiddleware
from router.queue import Dispatch, Entry
from router.tracing import TracingMiddleware, record_phases
from shared import logs
from shared.protocol import OutputKind

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def entry(length: int, enqueued: float, dispatched: float, batch: Dispatch) -> Entry:
    ids = np.zeros(length, dtype=np.int32)
    made = Entry("", ids, ids, 0, OutputKind.POOLED, cast(Any, None))
    made.enqueued_at, made.dispatched_at, made.batch = enqueued, dispatched, batch
    return made


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def client(exporter: InMemorySpanExporter) -> TestClient:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    seen: dict[str, logs.LogSpan | None] = {}

    async def embed(request: Request) -> Response:
        seen["log_span"] = logs.current_span.get()
        # A request's timeline (seconds after t0), recorded once it is over, as the service does.
        t0 = time.perf_counter()
        await asyncio.sleep(0.012)
        first, second = Dispatch("0", 1, 3, 40), Dispatch("1", 2, 1, 9)
        finished = {entry(5, t0 + 0.002, t0 + 0.004, first): t0 + 0.010,
                    entry(7, t0 + 0.002, t0 + 0.006, second): t0 + 0.011}
        record_phases(tracer, t0, t0 + 0.002, finished)
        return Response("[]", headers={"x-compute-tokens": "12", "x-queue-time": "3"})

    async def broken(request: Request) -> Response:
        return Response("no", status_code=503)

    async def health(request: Request) -> Response:
        return Response()

    app = Starlette(
        routes=[Route("/embed", embed, methods=["POST"]),
                Route("/broken", broken, methods=["POST"]),
                Route("/health", health)],
        middleware=[Middleware(RequestIdMiddleware),
                    Middleware(TracingMiddleware, tracer=tracer)])
    test_client = TestClient(app)
    test_client.seen = seen  # type: ignore[attr-defined]
    return test_client


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, list[ReadableSpan]]:
    named: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        named.setdefault(span.name, []).append(span)
    return named


def test_the_request_span_continues_the_callers_trace(client, exporter) -> None:
    client.post("/embed", headers={"traceparent": TRACEPARENT, "x-request-id": "r-1"})
    [request] = by_name(exporter.get_finished_spans())["POST /embed"]
    assert request.kind is SpanKind.SERVER
    assert f"{request.context.trace_id:032x}" == TRACE_ID
    assert request.parent is not None and f"{request.parent.span_id:016x}" == PARENT_ID
    assert request.parent.is_remote
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["request_id"] == "r-1"
    assert request.attributes["compute_tokens"] == 12
    assert request.attributes["queue_time_ms"] == 3


def test_without_traceparent_a_new_trace_starts(client, exporter) -> None:
    client.post("/embed")
    [request] = by_name(exporter.get_finished_spans())["POST /embed"]
    assert request.parent is None
    assert f"{request.context.trace_id:032x}" != TRACE_ID


def test_phases_are_children_of_the_request_with_batch_facts(client, exporter) -> None:
    client.post("/embed", headers={"traceparent": TRACEPARENT})
    spans = by_name(exporter.get_finished_spans())
    [request] = spans["POST /embed"]
    [tokenize], [queue] = spans["tokenize"], spans["queue"]
    inference = sorted(spans["inference"], key=lambda s: s.attributes["worker"])
    for child in (tokenize, queue, *inference):
        assert child.parent is not None and child.parent.span_id == request.context.span_id
        assert child.context.trace_id == request.context.trace_id
        assert request.start_time <= child.start_time <= child.end_time <= request.end_time
    assert tokenize.attributes == {"inputs": 2, "tokens": 12}
    assert tokenize.end_time <= queue.start_time
    assert queue.end_time - queue.start_time == pytest.approx(4e6, abs=1e3)  # 2 -> 6 ms
    assert [s.end_time - s.start_time for s in inference] == pytest.approx([6e6, 5e6], abs=1e3)
    assert [dict(s.attributes) for s in inference] == [
        {"batch_size": 3, "batch_tokens": 40, "worker": "0", "inputs": 1},
        {"batch_size": 1, "batch_tokens": 9, "worker": "1", "inputs": 1},
    ]


def test_log_lines_of_a_traced_request_carry_its_ids(client, exporter) -> None:
    client.post("/embed", headers={"traceparent": TRACEPARENT, "x-request-id": "r-2"})
    log_span = client.seen["log_span"]
    assert log_span.name == "POST /embed" and log_span.request_id == "r-2"
    assert log_span.trace_id == TRACE_ID
    [request] = by_name(exporter.get_finished_spans())["POST /embed"]
    assert log_span.span_id == f"{request.context.span_id:016x}"


def test_server_errors_mark_the_span(client, exporter) -> None:
    assert client.post("/broken").status_code == 503
    [request] = exporter.get_finished_spans()
    assert request.status.status_code is StatusCode.ERROR


def test_probes_are_not_traced(client, exporter) -> None:
    assert client.get("/health", headers={"traceparent": TRACEPARENT}).status_code == 200
    assert exporter.get_finished_spans() == ()


def test_a_request_the_router_answers_itself_has_tokenize_and_inference_spans(exporter) -> None:
    """An inference-free SPLADE query (router/query_route.py): no entries, no queue span."""
    from router.tokenization import Encoded

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ids = np.arange(4, dtype=np.int32)
    t0 = time.perf_counter()
    record_phases(provider.get_tracer("test"), t0, t0 + 0.002, {},
                  (t0 + 0.003, [Encoded(ids, ids), Encoded(ids[:1], ids[:1])]))
    spans = by_name(exporter.get_finished_spans())
    assert set(spans) == {"tokenize", "inference"}
    assert dict(spans["tokenize"][0].attributes or {}) == {"inputs": 2, "tokens": 5}
    inference = spans["inference"][0]
    assert dict(inference.attributes or {}) == {"inputs": 2, "worker": "router"}
    assert inference.end_time is not None and inference.start_time is not None
    assert abs((inference.end_time - inference.start_time) / 1e6 - 1.0) < 0.01


def test_the_request_span_names_its_route(client, exporter) -> None:
    client.post("/embed")
    [request] = by_name(exporter.get_finished_spans())["POST /embed"]
    assert {key: request.attributes[key] for key in ("http.request.method", "url.path",
                                                     "http.route")} == {
        "http.request.method": "POST", "url.path": "/embed", "http.route": "/embed"}


def test_a_trace_id_with_leading_zeros_keeps_its_32_digits_in_log_lines(client) -> None:
    trace_id = "00000000000000000000000000abcdef"
    client.post("/embed", headers={"traceparent": f"00-{trace_id}-{PARENT_ID}-01"})
    assert client.seen["log_span"].trace_id == trace_id


@pytest.mark.parametrize(("status", "error"), [(500, True), (499, False), (404, False)])
def test_only_a_5xx_is_the_servers_error_and_header_names_match_in_any_case(
        exporter, status: int, error: bool) -> None:
    async def app(scope, receive, send) -> None:  # raw ASGI: header names as the app spells them
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"X-Inference-Time", b"7")]})
        await send({"type": "http.response.body", "body": b""})

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    client = TestClient(TracingMiddleware(app, provider.get_tracer("test")))
    assert client.post("/embed").status_code == status
    [request] = exporter.get_finished_spans()
    assert request.attributes["inference_time_ms"] == 7
    assert request.status.status_code is (StatusCode.ERROR if error else StatusCode.UNSET)


def test_the_queue_span_runs_from_the_first_input_queued_to_the_last_dispatched(
        exporter) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    t0 = time.perf_counter()
    batch = Dispatch("0", 1, 2, 12)
    finished = {entry(5, t0 + 0.001, t0 + 0.004, batch): t0 + 0.010,
                entry(7, t0 + 0.003, t0 + 0.004, batch): t0 + 0.010}
    # (the service hands its encodings over whoever answered: entries mean the workers did)
    record_phases(provider.get_tracer("test"), t0, t0 + 0.001, finished, (t0 + 0.011, []))
    spans = by_name(exporter.get_finished_spans())
    assert dict(spans["inference"][0].attributes or {})["worker"] == "0"
    [queue] = spans["queue"]
    assert queue.end_time - queue.start_time == pytest.approx(3e6, abs=1e3)  # 1 -> 4 ms


def test_a_grpc_call_span_continues_the_callers_trace_and_ends_with_its_status(
        exporter) -> None:
    import grpc

    from router.tracing import rpc_ended, rpc_start

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    codes = [None, *grpc.StatusCode]
    for code in codes:
        span = rpc_start(tracer, "/tei.v1.Embed/Embed", [("traceparent", TRACEPARENT),
                                                        ("x-data-bin", b"\x00")])
        rpc_ended(span, code)
        span.end()
    spans = exporter.get_finished_spans()
    assert len(spans) == len(codes)
    for span, code in zip(spans, codes, strict=True):
        assert span.kind is SpanKind.SERVER and span.name == "/tei.v1.Embed/Embed"
        assert f"{span.context.trace_id:032x}" == TRACE_ID
        name = "OK" if code is None else code.name
        assert dict(span.attributes or {}) == {
            "rpc.system": "grpc", "rpc.method": "/tei.v1.Embed/Embed",
            "rpc.grpc.status_code": name}
        assert span.status.status_code is (
            StatusCode.ERROR if name in ("INTERNAL", "UNAVAILABLE", "UNKNOWN", "DATA_LOSS")
            else StatusCode.UNSET), name


def test_the_provider_names_the_service_and_its_version() -> None:
    from router.tracing import Tracing

    tracing = Tracing("http://127.0.0.1:1", "my-embedder", "1.2.3")
    try:
        attributes = tracing.provider.resource.attributes
        assert (attributes["service.name"], attributes["service.version"]) == (
            "my-embedder", "1.2.3")
    finally:
        tracing.shutdown()
