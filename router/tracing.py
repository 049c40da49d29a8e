"""OpenTelemetry tracing: one span per request, a child of the caller's W3C `traceparent`, with
its tokenize, queue and inference phases as children, exported to --otlp-endpoint.

The exporter speaks OTLP over gRPC, as TEI's does: the collector address a TEI deployment
passes (e.g. `http://otel-collector:4317`, the gRPC port) works unchanged, and grpcio is a
dependency already (the gRPC API). Without --otlp-endpoint none of this runs: no provider is
made, the middleware is not installed and the service skips its one `tracer is None` check, so
a request pays nothing for tracing.

The phase spans are recorded when the request is answered, from the timestamps the queue keeps
anyway (enqueued, dispatched, finished), instead of being opened and closed around each await:
the hot path stays free of span bookkeeping, and one request's inputs that went into several
batches get one inference span per batch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, use_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.http import is_open
from router.queue import Entry
from shared import logs

_PROPAGATOR = TraceContextTextMapPropagator()
# Response headers copied onto the request span (TEI's span fields).
_SPAN_HEADERS = {
    "x-compute-characters": "compute_chars",
    "x-compute-tokens": "compute_tokens",
    "x-tokenization-time": "tokenization_time_ms",
    "x-queue-time": "queue_time_ms",
    "x-inference-time": "inference_time_ms",
}


class Tracing:
    """The tracer provider of one server and its OTLP/gRPC exporter."""

    def __init__(self, endpoint: str, service_name: str, version: str) -> None:
        # Imported here: a server without --otlp-endpoint never loads the SDK or the exporter.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        # NOTE: not installed as the global provider: the tracer is handed to whoever traces,
        # so tests and several apps in one process cannot see each other's spans.
        self.provider = TracerProvider(resource=Resource.create(
            {"service.name": service_name, "service.version": version}))
        # An http:// endpoint means a plaintext channel, https:// TLS (the exporter's rule).
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self.tracer: Tracer = self.provider.get_tracer("embedserve", version)

    def shutdown(self) -> None:
        """Export what is still buffered (bounded by the exporter's timeout), then stop."""
        self.provider.shutdown()


class TracingMiddleware:
    """A SERVER span around every traced request; the handler runs inside it, so the
    service's phase spans become its children."""

    def __init__(self, app: ASGIApp, tracer: Tracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Probes, scrapes and the docs are not traced: they would flood the trace store.
        if scope["type"] != "http" or is_open(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        carrier = {key.decode("latin-1"): value.decode("latin-1")
                   for key, value in scope["headers"]}
        attributes = {"http.request.method": scope["method"], "url.path": scope["path"],
                      "http.route": scope["path"]}
        request_id = scope.get("state", {}).get("request_id")
        if request_id is not None:
            attributes["request_id"] = request_id
        with self.tracer.start_as_current_span(
            f"{scope['method']} {scope['path']}", context=_PROPAGATOR.extract(carrier),
            kind=SpanKind.SERVER, attributes=attributes,
        ) as span:
            context = span.get_span_context()
            log_span = logs.current_span.get()
            if log_span is not None:
                # NOTE: not reset here: the request's own access line, written by the
                # RequestIdMiddleware around us, carries the ids too; its reset ends them.
                logs.current_span.set(dataclasses.replace(
                    log_span, trace_id=f"{context.trace_id:032x}",
                    span_id=f"{context.span_id:016x}"))

            async def send_traced(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status = message["status"]
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:  # a client's mistake (4xx) is not the server's error
                        span.set_status(Status(StatusCode.ERROR))
                    for key, value in message.get("headers", ()):
                        name = _SPAN_HEADERS.get(key.decode("latin-1").lower())
                        if name is not None:
                            span.set_attribute(name, int(value))
                await send(message)

            await self.app(scope, receive, send_traced)


def rpc_start(tracer: Tracer, method: str, metadata: Iterable[tuple[str, Any]] | None) -> Span:
    """A SERVER span for one gRPC call (`method`: its path, /tei.v1.Embed/Embed), a child of
    the `traceparent` in its metadata, started but not made current: router.grpc.observed makes
    it current while the call's own code runs, so the service's phase spans become its children
    as over HTTP."""
    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
    # (Exceptions do not mark it: an abort with a client's error is one; `rpc_ended` does.)
    return tracer.start_span(
        method, context=_PROPAGATOR.extract(carrier), kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.method": method},
        record_exception=False, set_status_on_exception=False)


def current(span: Span) -> Any:
    """`span` current in a with block, not ended after it; exceptions do not mark it."""
    return use_span(span, end_on_exit=False, record_exception=False,
                    set_status_on_exception=False)


def rpc_ended(span: Span, code: Any) -> None:
    """The call's status (a grpc.StatusCode; None: OK) on its span, an error only where HTTP
    would answer 5xx, as TracingMiddleware marks them."""
    name = getattr(code, "name", "OK")
    span.set_attribute("rpc.grpc.status_code", name)
    if name in ("INTERNAL", "UNAVAILABLE", "UNKNOWN", "DATA_LOSS"):
        span.set_status(Status(StatusCode.ERROR))


def _epoch_ns() -> Callable[[float], int]:
    """perf_counter seconds -> epoch nanoseconds (what OpenTelemetry timestamps are)."""
    now_ns, now = time.time_ns(), time.perf_counter()
    return lambda t: now_ns - round((now - t) * 1e9)


def record_phases(tracer: Tracer, started: float, tokenized: float,
                  finished: Mapping[Entry, float],
                  here: tuple[float, Sequence[Any]] | None = None) -> None:
    """The tokenize, queue and inference spans of one answered request, as children of the
    current span (the request's): the queue span from the first input queued to the last one
    dispatched, and one inference span per batch with that batch's size and tokens. A request
    the router answered itself (no `finished` entries) has `here`: when it was done, and its
    encodings; its computation is one inference span, without a queue."""
    to_ns = _epoch_ns()

    def span(name: str, start: float, end: float, attributes: dict) -> None:
        tracer.start_span(name, start_time=to_ns(start), attributes=attributes).end(to_ns(end))

    if not finished and here is not None:
        done, encoded = here
        inputs, tokens = len(encoded), sum(len(enc.ids) for enc in encoded)
        span("tokenize", started, tokenized, {"inputs": inputs, "tokens": tokens})
        span("inference", tokenized, done, {"inputs": inputs, "worker": "router"})
        return
    inputs = len(finished)
    tokens = sum(e.length for e in finished)
    span("tokenize", started, tokenized, {"inputs": inputs, "tokens": tokens})
    span("queue", min(e.enqueued_at for e in finished), max(e.dispatched_at for e in finished),
         {"inputs": inputs})
    batches: dict[int, list[Entry]] = {}
    for entry in finished:
        assert entry.batch is not None, "an answered entry was dispatched"
        batches.setdefault(entry.batch.batch_id, []).append(entry)
    for entries in batches.values():
        batch = entries[0].batch
        assert batch is not None
        span("inference", entries[0].dispatched_at, finished[entries[0]], {
            "batch_size": batch.size, "batch_tokens": batch.tokens, "worker": batch.worker,
            "inputs": len(entries),
        })
