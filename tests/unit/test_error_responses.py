"""The HTTP face of the error taxonomy as the external contract (API.md, Errors and Routes)
states it: each type's status, both body shapes, the headers a refusal carries, and which
routes answer without an API key."""

from __future__ import annotations

import json

import pytest

from router.errors import error_response
from router.http import is_open
from shared.errors import EmbedServeError, ErrorType

CONTRACT = [
    (ErrorType.VALIDATION, 422, "Validation"),
    (ErrorType.TOKENIZER, 422, "Tokenizer"),
    (ErrorType.EMPTY, 400, "Empty"),
    (ErrorType.BACKEND, 424, "Backend"),
    (ErrorType.OVERLOADED, 429, "Overloaded"),
    (ErrorType.UNHEALTHY, 503, "Unhealthy"),
    (ErrorType.UNAUTHORIZED, 401, "Unauthorized"),
    (ErrorType.NOT_FOUND, 404, "NotFound"),
    (ErrorType.METHOD_NOT_ALLOWED, 405, "MethodNotAllowed"),
    (ErrorType.PAYLOAD_TOO_LARGE, 413, "PayloadTooLarge"),
    (ErrorType.UNSUPPORTED_MEDIA_TYPE, 415, "UnsupportedMediaType"),
    (ErrorType.BAD_REQUEST, 400, "BadRequest"),
]


@pytest.mark.parametrize(("error_type", "status", "name"), CONTRACT)
def test_each_type_has_its_status_and_tei_body(error_type, status, name) -> None:
    response = error_response(EmbedServeError(error_type, "why"), path="/embed", method="POST")
    assert response.status_code == status
    assert response.media_type == "application/json"
    assert json.loads(response.body) == {"error": "why", "error_type": name}


@pytest.mark.parametrize(("error_type", "status", "name"), CONTRACT)
def test_openai_routes_wrap_message_code_and_type(error_type, status, name) -> None:
    for path in ("/v1/embeddings", "/embeddings"):
        response = error_response(EmbedServeError(error_type, "why"), path=path, method="POST")
        assert response.status_code == status
        assert json.loads(response.body) == {
            "error": {"message": "why", "type": name, "code": status}}


@pytest.mark.parametrize("path", ["/embed", "/v1/embeddings", "/v2/rerank"])
def test_overloaded_says_when_to_retry(path) -> None:
    # API.md: "fix: also a `Retry-After` header" (TEI's 429 has none).
    response = error_response(EmbedServeError(ErrorType.OVERLOADED, "Model is overloaded"),
                              path=path, method="POST")
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) > 0
    other = error_response(EmbedServeError(ErrorType.VALIDATION, "no"), path=path,
                           method="POST")
    assert "retry-after" not in other.headers


def test_unauthorized_names_the_bearer_scheme() -> None:
    response = error_response(EmbedServeError(ErrorType.UNAUTHORIZED, "missing"),
                              path="/info", method="GET")
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/health"), ("GET", "/"), ("GET", "/ping"), ("GET", "/metrics"), ("GET", "/docs"),
    ("GET", "/openapi.json"), ("GET", "/api-doc/openapi.json"),
])
def test_routes_open_without_a_key(method, path) -> None:
    assert is_open(method, path)


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/info"), ("POST", "/"), ("POST", "/invocations"), ("POST", "/vertex"),
    ("POST", "/embed"), ("POST", "/tokenize"), ("POST", "/decode"), ("POST", "/v1/embeddings"),
    ("GET", "/v1/models"), ("POST", "/v1/rerank"), ("POST", "/v2/embed"),
])
def test_every_other_route_needs_the_key(method, path) -> None:
    assert not is_open(method, path)


@pytest.mark.parametrize(("origin", "method", "asked_headers", "refused"), [
    ("https://evil.example", "POST", None, "Disallowed CORS origin"),
    ("https://app.example", "PUT", None, "Disallowed CORS method"),
    ("https://app.example", "POST", "x-evil", "Disallowed CORS headers"),
])
def test_a_refused_cors_preflight_is_a_json_400(origin, method, asked_headers, refused) -> None:
    # Starlette answers these text/plain; the contract's errors are all JSON, the refusal of a
    # preflight too, still with the CORS headers that tell the browser what is allowed.
    from typing import Any, cast

    from starlette.testclient import TestClient

    from router.app import build_app
    from router.openapi import _Unserved
    from router.routes import AppState
    from shared.config import ServerConfig

    unserved = cast(Any, _Unserved())
    config = ServerConfig(cors_allow_origin=("https://app.example",), api_key="key")
    client = TestClient(build_app(AppState(config, unserved, unserved, unserved)))
    asked = {"origin": origin, "access-control-request-method": method}
    if asked_headers:
        asked["access-control-request-headers"] = asked_headers
    for path, body in (("/embed", {"error": refused, "error_type": "BadRequest"}),
                       ("/v1/embeddings", {"error": {"message": refused, "type": "BadRequest",
                                                     "code": 400}})):
        answer = client.options(path, headers=asked)
        assert answer.status_code == 400
        assert answer.headers["content-type"] == "application/json"
        assert answer.json() == body
        assert "POST" in answer.headers["access-control-allow-methods"]
        assert "Origin" in answer.headers["vary"]
    allowed = client.options("/embed", headers={"origin": "https://app.example",
                                                "access-control-request-method": "POST"})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"


@pytest.mark.parametrize(("authorization", "status"), [
    ("Bearer s3cret", 200), ("bearer s3cret", 200), ("BEARER s3cret", 200),
    ("Bearer   s3cret", 200),
    ("", 401), ("s3cret", 401), ("Bearer", 401), ("Bearer ", 401), ("Basic s3cret", 401),
    ("Bearers3cret", 401), ("Bearer s3cre", 401), ("Bearer s3crett", 401),
    ("Bearer s3cret x", 401),
])
def test_the_bearer_schemes_name_is_case_insensitive(authorization: str, status: int) -> None:
    # RFC 9110 11.1: "bearer KEY" (as some clients write it) is the same credential; the key
    # itself must match exactly.
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from router.http import ApiKeyMiddleware

    async def answer(request) -> Response:
        return Response("ok")

    app = ApiKeyMiddleware(Starlette(routes=[Route("/embed", answer, methods=["POST"])]),
                           api_key="s3cret")
    headers = {"authorization": authorization} if authorization else {}
    assert TestClient(app).post("/embed", headers=headers).status_code == status


def test_the_app_runs_the_lifespan_hypercorn_drives() -> None:
    # hypercorn sends a lifespan scope (no headers, no method) before serving: a middleware that
    # reads a request's fields from it fails the lifespan, which hypercorn logs as a warning at
    # every start ("continuing without Lifespan support").
    import asyncio
    from typing import Any, cast

    from router.app import build_app
    from router.openapi import _Unserved
    from router.routes import AppState
    from shared.config import ServerConfig

    unserved = cast(Any, _Unserved())
    app = build_app(AppState(ServerConfig(cors_allow_origin=("https://app.example",),
                                          api_key="key"), unserved, unserved, unserved))
    sent: list[str] = []

    async def lifespan() -> None:
        events = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

        async def receive() -> dict:
            return next(events)

        async def send(message) -> None:
            sent.append(message["type"])

        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)

    asyncio.run(asyncio.wait_for(lifespan(), 5))
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
