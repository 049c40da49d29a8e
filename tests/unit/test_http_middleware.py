"""router/http.py's and router/cors.py's request plumbing on its own: the request id each
answer carries, which requests ApiKeyMiddleware lets through without the key (a platform's
health route included), which OPTIONS requests are preflights, and work given up once its
client leaves."""

from __future__ import annotations

import re

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from router.http import ApiKeyMiddleware, RequestIdMiddleware, is_open


async def state_id(request: Request) -> Response:
    return Response(request.state.request_id)


def id_client() -> TestClient:
    return TestClient(RequestIdMiddleware(Starlette(routes=[Route("/embed", state_id)])))


@pytest.mark.parametrize("given", ["r-1", "!" * 128, "~id~"])
def test_a_short_visible_client_id_is_kept_and_echoed(given: str) -> None:
    answer = id_client().get("/embed", headers={"x-request-id": given})
    assert answer.headers["x-request-id"] == given and answer.text == given


@pytest.mark.parametrize("given", [None, "", "a" * 129, "two words", "r-1\x7f", "r-1\t"])
def test_any_other_id_is_replaced_by_a_new_one(given: str | None) -> None:
    answer = id_client().get("/embed", headers={} if given is None else {"x-request-id": given})
    made = answer.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made) and answer.text == made


def key_client(open_probe: str | None = None) -> TestClient:
    async def ok(request: Request) -> Response:
        return Response("ok")

    app = Starlette(routes=[Route(path, ok, methods=["GET", "HEAD", "POST"]) for path in (
        "/", "/embed", "/docs/static/swagger-ui.css", "/ping", "/metrics", "/probe")])
    return TestClient(ApiKeyMiddleware(app, api_key="s3cret", open_probe=open_probe))


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/"), ("HEAD", "/"), ("GET", "/docs/static/swagger-ui.css"), ("HEAD", "/ping"),
    ("GET", "/metrics")])
def test_open_requests_need_no_key(method: str, path: str) -> None:
    assert is_open(method, path)
    assert key_client().request(method, path).status_code == 200


def test_a_platforms_probe_is_open_to_get_and_head_alone() -> None:
    client = key_client(open_probe="/probe")
    assert client.get("/probe").status_code == 200
    assert client.head("/probe").status_code == 200
    assert client.post("/probe").status_code == 401
    assert key_client().get("/probe").status_code == 401


def test_a_refusal_says_whether_the_key_was_missing_or_wrong() -> None:
    client = key_client()
    assert client.post("/embed").json() == {"error": "missing Authorization header",
                                            "error_type": "Unauthorized"}
    assert client.post("/embed", headers={"authorization": "Bearer nope"}).json() == {
        "error": "invalid API key in the Authorization header", "error_type": "Unauthorized"}


def test_an_options_request_that_asks_no_method_is_no_preflight() -> None:
    # Starlette's test: without Access-Control-Request-Method an OPTIONS is a plain request,
    # which the app answers (with the origin allowed), not a preflight to refuse or allow.
    from router.cors import JsonCORSMiddleware

    async def answered(scope, receive, send) -> None:
        await Response(status_code=204)(scope, receive, send)

    client = TestClient(JsonCORSMiddleware(answered, allow_origins=["https://app.example"],
                                           allow_methods=["POST"]))
    plain = client.options("/embed", headers={"origin": "https://app.example"})
    assert plain.status_code == 204
    assert plain.headers["access-control-allow-origin"] == "https://app.example"
    refused = client.options("/embed", headers={"origin": "https://app.example",
                                                "access-control-request-method": "PUT"})
    assert refused.status_code == 400
    assert refused.json() == {"error": "Disallowed CORS method", "error_type": "BadRequest"}


def test_work_is_awaited_while_its_client_stays_and_cancelled_once_it_leaves() -> None:
    import asyncio

    from router.http import ClientGone, unless_disconnected

    def request(*messages: str) -> Request:
        pending = list(messages)

        async def receive() -> dict:
            if pending:
                return {"type": pending.pop(0), "body": b"", "more_body": False}
            await asyncio.Event().wait()  # the client stays, silent
            raise AssertionError("unreachable")

        return Request({"type": "http", "method": "POST", "path": "/embed",
                        "query_string": b"", "headers": []}, receive)

    async def work() -> str:
        await asyncio.sleep(0.05)
        return "answer"

    staying = request("http.request")
    assert asyncio.run(unless_disconnected(staying, work())) == "answer"
    with pytest.raises(ClientGone):
        asyncio.run(unless_disconnected(request("http.request", "http.disconnect"), work()))
