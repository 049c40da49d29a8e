"""Fuzz every operation of the served /openapi.json with schemathesis: generated requests (valid
and invalid) never get a 5xx or hang, every response conforms to the document (status, content
type, headers, schema), every error has the JSON error shape, oversized and malformed bodies
are refused in that shape, and the server is still healthy afterwards."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from router.errors import openai_shaped
from router.openapi import unserved_endpoints
from tests.e2e.server import Server
from tests.fixtures.heads import LABELS, make_tiny_classifier

# Seconds one request may take: the largest valid batch (32 inputs) of the built-in MiniLM on
# a CPU answers in well under this.
LIMIT_S = 10.0
# Per operation, valid and invalid cases mixed; raise it for a deeper run.
EXAMPLES = int(os.environ.get("EMBEDSERVE_FUZZ_EXAMPLES", "25"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


# The kinds fuzzed: the built-in MiniLM, and a tiny classifier and re-ranker, whose servers
# document `/`, `/invocations` and `/vertex` with /predict's and /rerank's schemas and answer
# 424 on the embedding routes. Each: a request a healthy server answers, and what its answer
# holds.
KINDS: dict[str, tuple[str, dict[str, object], Callable[[Any], bool]]] = {
    "embedding": ("/embed", {"inputs": "still here"}, lambda answer: len(answer[0]) == 384),
    "classifier": ("/predict", {"inputs": "still here"},
                   lambda answer: {p["label"] for p in answer} == set(LABELS)),
    "reranker": ("/rerank", {"query": "still", "texts": ["here", "there"]},
                 lambda answer: {r["index"] for r in answer} == {0, 1}),
}


@pytest.fixture(scope="module", params=list(KINDS))
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def fuzz_server(kind, tmp_path_factory):
    """A server of `kind` with the default client limits (batch size 32, 2 MB bodies)."""
    root = tmp_path_factory.mktemp(f"fuzz-{kind}")
    model: tuple[str, ...] = ()
    if kind != "embedding":
        labels = LABELS if kind == "classifier" else ["score"]
        model = ("--model-id", str(make_tiny_classifier(root / "model", labels)))
    srv = Server(*model, "--max-batch-tokens", "2048",
                 log_path=root / "server.log").wait_healthy()
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def api(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


# NOTE: schemathesis' own pytest integration (`from_fixture(...).parametrize()`) relies on a
# pytest internal that pytest 9 removed, so each operation is a plain hypothesis test over the
# operation's strategies. The ids come from the route table; the cases from the served document.
OPERATIONS = sorted({(e.method, e.doc_path) for e in unserved_endpoints()},
                    key=lambda o: o[::-1])


# Headers that frame the message, which the HTTP client owns: a generated `Content-Length:
# +NS"X` makes a malformed message, which hypercorn refuses with its own empty 400 before any
# route (as TEI's hyper does; README), not a request of the documented API.
FRAMING = {"content-length", "transfer-encoding", "host", "connection", "upgrade", "expect"}


def assert_error_shape(method: str, path: str, body: object) -> None:
    if openai_shaped(path, method):
        assert isinstance(body, dict) and set(body) == {"error"}, body
        detail = body["error"]
        assert isinstance(detail, dict) and set(detail) == {"message", "type", "code"}, body
    else:
        assert isinstance(body, dict) and set(body) == {"error", "error_type"}, body
        assert isinstance(body["error"], str) and isinstance(body["error_type"], str), body


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_generated_requests(api, fuzz_server, method, path):
    operation = api[path][method]
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                      operation.as_strategy(GenerationMode.NEGATIVE))

    @given(case=cases)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        if case.headers:
            for name in [n for n in case.headers if n.lower() in FRAMING]:
                del case.headers[name]
        request = case.as_curl_command()
        started = time.monotonic()
        try:
            response = case.call(timeout=LIMIT_S)
        except requests.Timeout:
            pytest.fail(f"no answer in {LIMIT_S} s to {request}")
        elapsed = time.monotonic() - started
        assert response.status_code < 500, f"{response.status_code} for {request}: {response.text}"
        assert elapsed < LIMIT_S, f"{elapsed:.1f} s for {request}"
        case.validate_response(response, checks=CHECKS)
        if response.status_code >= 400:
            assert_error_shape(method, path, response.json())

    check()


BODY_OPERATIONS = [path for method, path in OPERATIONS if method == "POST"]
PAYLOAD_LIMIT = 2_000_000  # --payload-limit's default


OVERSIZED = b'{"inputs": "' + b"a" * PAYLOAD_LIMIT + b'"}'


@pytest.mark.parametrize("path", BODY_OPERATIONS)
def test_oversized_malformed_and_non_json_bodies(fuzz_server, path):
    json_type = {"content-type": "application/json"}
    for content, headers, status in [
        (OVERSIZED, json_type, 413),
        (b'{"inputs": ', json_type, 400),
        (b'{"inputs": "a"}', {"content-type": "text/plain"}, 415),
    ]:
        # A connection of its own per request: see the test below.
        with httpx.Client(base_url=fuzz_server.url, timeout=LIMIT_S) as client:
            response = client.post(path, content=content, headers=headers)
        assert response.status_code == status, (path, content[:20], response.text)
        assert_error_shape("POST", path, response.json())


def test_connection_stays_usable_after_a_413(fuzz_server, kind):
    # The server does not read an oversized body, so it must close the connection and say so
    # (`Connection: close`); a keep-alive client then reconnects instead of failing.
    path, body, _ = KINDS[kind]
    with httpx.Client(base_url=fuzz_server.url, timeout=LIMIT_S) as client:
        for _ in range(30):
            refused = client.post(path, content=OVERSIZED,
                                  headers={"content-type": "application/json"})
            assert refused.status_code == 413
            assert refused.headers["connection"] == "close"
            assert client.post(path, json=body).status_code == 200


def test_server_survives_the_fuzzing(fuzz_server, kind):
    assert fuzz_server.process.poll() is None, fuzz_server.log()
    assert fuzz_server.client.get("/health").status_code == 200
    path, body, holds = KINDS[kind]
    answered = fuzz_server.client.post(path, json=body)
    assert answered.status_code == 200 and holds(answered.json()), answered.text
