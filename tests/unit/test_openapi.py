"""The OpenAPI document: every Endpoint with its errors and headers, deterministic, and the
description routes (in-process, with a stub state: nothing here touches a service)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import schemathesis
from starlette.testclient import TestClient

from router.app import build_app
from router.errors import STATUS, openai_shaped
from router.http import is_open
from router.openapi import (
    BODY_ERRORS,
    TIMING_HEADERS,
    _Unserved,
    document,
    render,
    unserved_endpoints,
)
from router.results import Timings
from router.routes import AppState, timing_headers
from shared.config import ServerConfig
from shared.errors import ErrorType


def test_every_endpoint_is_documented_with_its_error_statuses() -> None:
    endpoints = unserved_endpoints()
    doc = document(endpoints)
    assert sum(len(methods) for methods in doc["paths"].values()) == len(endpoints)
    for endpoint in endpoints:
        operation = doc["paths"][endpoint.doc_path][endpoint.method.lower()]
        assert operation["summary"] == endpoint.summary
        assert operation["tags"] == [endpoint.tag]
        expected = {STATUS[error] for error in endpoint.errors}
        if endpoint.request is not None:
            expected |= {STATUS[error] for error in BODY_ERRORS}
            assert operation["requestBody"]["required"] is True
        else:
            assert "requestBody" not in operation
        if not is_open(endpoint.method, endpoint.path):
            expected.add(401)
        assert set(operation["responses"]) == {"200", *map(str, expected)}, endpoint.path
        error_ref = ("OpenAIErrorBody" if openai_shaped(endpoint.doc_path, endpoint.method)
                     else "ErrorBody")
        for status, response in operation["responses"].items():
            assert "x-request-id" in response["headers"]
            if status != "200":
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": f"#/components/schemas/{error_ref}"}
        ok = operation["responses"]["200"]
        assert ("content" in ok) == (endpoint.response is not None)
        assert (TIMING_HEADERS.keys() <= ok["headers"].keys()) == endpoint.inference


def test_open_routes_need_no_key_and_others_do() -> None:
    doc = document(unserved_endpoints())
    assert doc["paths"]["/health"]["get"]["security"] == []
    assert doc["paths"]["/"]["get"]["security"] == []
    assert doc["paths"]["/"]["post"]["security"] == [{"bearerAuth": []}]
    assert "401" in doc["paths"]["/embed"]["post"]["responses"]
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


def test_schemas_carry_fields_types_and_defaults() -> None:
    schemas = document(unserved_endpoints())["components"]["schemas"]
    embed = schemas["EmbedRequest"]
    assert embed["required"] == ["inputs"]
    assert embed["properties"]["normalize"] == {"type": "boolean", "default": True}
    assert embed["properties"]["truncation_direction"]["default"] == "Right"
    assert list(schemas) == sorted(schemas)


def test_timing_headers_are_those_the_routes_send() -> None:
    sent = timing_headers(Timings(1, 1, 0.0, 0.0, 0.0, 0.0), time.perf_counter(), "cpu")
    assert list(sent) == list(TIMING_HEADERS)


def test_document_is_deterministic_and_the_module_prints_it() -> None:
    first = render(document(unserved_endpoints()))
    assert render(document(list(reversed(unserved_endpoints())))) == first
    printed = subprocess.run([sys.executable, "-m", "router.openapi"], capture_output=True,
                             text=True, check=True, timeout=60).stdout
    assert printed == first


def test_the_module_prints_the_stored_copy() -> None:
    """What `python -m router.openapi` writes (routes built on a stand-in model, every attribute
    of it truthy) is the stored copy an embedding model's server serves: `/` answered as /embed,
    not as a SPLADE or CSR model's /embed_sparse (root.target_path compares the model's
    attributes, never tests their truth)."""
    stored = Path(__file__).parents[1] / "openapi" / "openapi.json"
    assert render(document(unserved_endpoints())) == stored.read_text()


def test_schemathesis_loads_the_document() -> None:
    schema = schemathesis.openapi.from_dict(document(unserved_endpoints()))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} == {
        (e.method, e.doc_path) for e in unserved_endpoints()}


def _client(**config: Any) -> TestClient:
    unserved = cast(Any, _Unserved())
    state = AppState(ServerConfig(**config), unserved, unserved, unserved)
    return TestClient(build_app(state))


def test_description_routes_serve_the_document_and_local_swagger_ui() -> None:
    client = _client()
    served = client.get("/openapi.json")
    assert served.status_code == 200 and served.headers["content-type"] == "application/json"
    assert served.json() == json.loads(render(document(unserved_endpoints())))
    assert client.get("/api-doc/openapi.json").content == served.content
    page = client.get("/docs")
    assert page.status_code == 200 and "docs/static/swagger-ui-bundle.js" in page.text
    # Relative URLs only: the page also works behind a proxy that serves us under a prefix.
    assert 'url: "openapi.json"' in page.text and '="/' not in page.text
    script = client.get("/docs/static/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 100_000
    missing = client.get("/docs/static/nope.js")
    assert missing.status_code == 404 and missing.json()["error_type"] == "NotFound"


def test_description_routes_are_open_with_an_api_key() -> None:
    client = _client(api_key="secret")
    for path in ("/openapi.json", "/api-doc/openapi.json", "/docs",
                 "/docs/static/swagger-ui.css"):
        assert client.get(path).status_code == 200, path
    refused = client.post("/embed", json={"inputs": "a"})
    assert refused.status_code == 401
    assert refused.json()["error_type"] == ErrorType.UNAUTHORIZED.value
