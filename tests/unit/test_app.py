"""router/app.py's assembly over the stand-in service of test_routes: the CORS TEI allows by
default, a client gone answered 499, the platform's health probe open under --api-key, the
request id seen by tracing, and the metrics port's 404 in JSON (mutation testing, round 8)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.testclient import TestClient

from router.app import build_app, metrics_app
from router.http import ClientGone
from router.metrics import Metrics
from router.routes import AppState
from shared.config import ServerConfig
from tests.unit.test_routes import Service, serve


def test_without_cors_allow_origin_any_origin_may_call_with_a_key() -> None:
    client, _ = serve()
    preflight = client.options("/embed", headers={
        "origin": "https://anywhere.example", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type, x-request-id"})
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert preflight.headers["access-control-allow-methods"] == "GET, POST, OPTIONS"
    answer = client.post("/embed", json={"inputs": "a"},
                         headers={"origin": "https://anywhere.example"})
    assert answer.headers["access-control-allow-origin"] == "*"
    assert answer.headers["access-control-expose-headers"] == (
        "x-request-id, x-compute-time, x-compute-tokens")


def test_a_client_gone_is_answered_499() -> None:
    client, service = serve()
    service.refusal = ClientGone()
    assert client.post("/embed", json={"inputs": "a"}).status_code == 499


def _client(config: ServerConfig, tracer: Any = None) -> TestClient:
    model = SimpleNamespace(kind="embedding", pooling="mean", sparse_vectors=None, prompts={})
    state = AppState(config, cast(Any, Service()),
                     cast(Any, SimpleNamespace(served_model_name="org/model")), cast(Any, model))
    return TestClient(build_app(state, tracer))


def test_the_platforms_health_probe_needs_no_key() -> None:
    client = _client(ServerConfig(api_key="s3cret", aip_health_route="/ping"))
    assert client.get("/ping").status_code == 200
    assert client.post("/embed", json={"inputs": "a"}).status_code == 401


def test_the_request_span_carries_the_request_id() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    client = _client(ServerConfig(), provider.get_tracer("test"))
    client.post("/embed", json={"inputs": "a"}, headers={"x-request-id": "r-7"})
    [span] = exporter.get_finished_spans()
    assert span.attributes is not None and span.attributes["request_id"] == "r-7"


def test_the_metrics_ports_404_is_json() -> None:
    answer = TestClient(metrics_app(Metrics(512))).get("/nope")
    assert answer.status_code == 404
    assert answer.headers["content-type"] == "application/json"
