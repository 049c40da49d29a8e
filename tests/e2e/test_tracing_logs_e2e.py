"""Traces and logs of the real `embedserve`: the four spans of a request reach an OTLP/gRPC
collector (a small in-process one here) as children of the caller's `traceparent`, and with
--json-output every line that the router and the workers write is one JSON object."""

from __future__ import annotations

import json
import threading
import time
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.e2e.server import serving
from tests.fixtures.tiny import make_tiny_bert

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
SERVICE_NAME = "embedserve-under-test"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list = []
        self.service_names: set[str] = set()
        self.lock = threading.Lock()

    def Export(self, request, context):  # the generated service's method name
        with self.lock:
            for resource_spans in request.resource_spans:
                for attribute in resource_spans.resource.attributes:
                    if attribute.key == "service.name":
                        self.service_names.add(attribute.value.string_value)
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> list:
        with self.lock:
            return [s for s in self.spans if s.trace_id.hex() == trace_id]


@pytest.fixture(scope="module")
def collector():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    received = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(received, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield received, port
    server.stop(grace=None)


@pytest.fixture(scope="module")
def traced(collector, tmp_path_factory):
    """A tiny model traced to the collector, logging JSON at debug level."""
    received, port = collector
    model = make_tiny_bert(tmp_path_factory.mktemp("tiny") / "model", max_seq_length=64)
    log = tmp_path_factory.mktemp("logs") / "traced.log"
    with serving("--model-id", str(model), "--device", "cpu", "--json-output",
                 "--otlp-endpoint", f"http://127.0.0.1:{port}",
                 "--otlp-service-name", SERVICE_NAME, log_path=log,
                 # Export within 0.1 s instead of the SDK's 5 s batching delay.
                 env={"LOG_LEVEL": "debug", "OTEL_BSP_SCHEDULE_DELAY": "100"}) as srv:
        answer = srv.client.post("/embed", json={"inputs": "hello traced world"}, headers={
            "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "x-request-id": "traced-1"})
        assert answer.status_code == 200, answer.text
        yield srv, received, answer


def spans_of_the_request(received: Collector) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        spans = received.of_trace(TRACE_ID)
        if len(spans) >= 4:
            break
        time.sleep(0.1)
    named = {span.name: span for span in spans}
    assert sorted(named) == ["POST /embed", "inference", "queue", "tokenize"], named
    return named


def attributes(span) -> dict[str, object]:
    values = {}
    for attribute in span.attributes:
        value = attribute.value
        values[attribute.key] = getattr(value, value.WhichOneof("value"))
    return values


def test_the_four_spans_continue_the_callers_trace(traced) -> None:
    _, received, answer = traced
    spans = spans_of_the_request(received)
    request = spans["POST /embed"]
    assert request.parent_span_id.hex() == PARENT_ID
    for name in ("tokenize", "queue", "inference"):
        assert spans[name].parent_span_id == request.span_id, name
        assert request.start_time_unix_nano <= spans[name].start_time_unix_nano
        assert spans[name].end_time_unix_nano <= request.end_time_unix_nano
    assert received.service_names == {SERVICE_NAME}
    tokens = int(answer.headers["x-compute-tokens"])
    request_attributes = attributes(request)
    assert request_attributes["http.response.status_code"] == 200
    assert request_attributes["request_id"] == "traced-1"
    assert request_attributes["compute_tokens"] == tokens
    inference = attributes(spans["inference"])
    assert inference["batch_size"] == 1 and inference["batch_tokens"] == tokens
    assert inference["worker"] == "0"


def test_every_log_line_is_a_json_object(traced) -> None:
    srv, _, _ = traced
    lines = srv.log().splitlines()
    entries = [json.loads(line) for line in lines]  # raises on any line that is not JSON
    assert all(isinstance(e, dict) for e in entries)
    for entry in entries:
        assert {"timestamp", "level", "target", "message", "process"} <= entry.keys(), entry
    processes = {e["process"] for e in entries}
    assert {"router", "worker-0"} <= processes
    assert any(e["level"] == "DEBUG" for e in entries)  # LOG_LEVEL=debug reached the router
    [answered] = [e for e in entries if e.get("request_id") == "traced-1"]
    assert answered["target"] == "embedserve.access"
    assert answered["message"].startswith("POST /embed -> 200 in ")
    assert answered["span"]["name"] == "POST /embed"
    assert answered["span"]["trace_id"] == TRACE_ID


def test_a_grpc_call_is_one_trace_continuing_the_callers(collector, tmp_path) -> None:
    """A unary call over --grpc: one SERVER span continuing the `traceparent` metadata, its
    tokenize / queue / inference spans its children (they were roots of traces of their own)."""
    from router.grpc.protos import pb, services
    from tests.e2e.grpc_server import grpc_serving

    received, port = collector
    trace_id, parent_id = "1af7651916cd43dd8448eb211c80319d", "c7ad6b7169203332"
    model = make_tiny_bert(tmp_path / "model", max_seq_length=64)
    with grpc_serving("--model-id", str(model), "--device", "cpu",
                      "--otlp-endpoint", f"http://127.0.0.1:{port}", log_path=tmp_path / "log",
                      env={"OTEL_BSP_SCHEDULE_DELAY": "100"}) as rpc:
        services.EmbedStub(rpc.channel).Embed(
            pb.EmbedRequest(inputs="hello traced rpc"), timeout=30,
            metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),))
        streamed = "2af7651916cd43dd8448eb211c80319e"
        replies = services.EmbedStub(rpc.channel).EmbedStream(
            iter([pb.EmbedRequest(inputs="one"), pb.EmbedRequest(inputs="two")]), timeout=30,
            metadata=(("traceparent", f"00-{streamed}-{parent_id}-01"),))
        assert len(list(replies)) == 2
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (len(received.of_trace(trace_id)) < 4
                                               or len(received.of_trace(streamed)) < 7):
            time.sleep(0.1)
    stream_spans = received.of_trace(streamed)
    [stream] = [s for s in stream_spans if s.name == "/tei.v1.Embed/EmbedStream"]
    assert stream.parent_span_id.hex() == parent_id
    assert sorted(s.name for s in stream_spans if s.parent_span_id == stream.span_id) == \
        ["inference", "inference", "queue", "queue", "tokenize", "tokenize"]
    named = {span.name: span for span in received.of_trace(trace_id)}
    assert sorted(named) == ["/tei.v1.Embed/Embed", "inference", "queue", "tokenize"], named
    call = named["/tei.v1.Embed/Embed"]
    assert call.parent_span_id.hex() == parent_id
    for name in ("tokenize", "queue", "inference"):
        assert named[name].parent_span_id == call.span_id, name
