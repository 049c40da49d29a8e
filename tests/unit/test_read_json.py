"""read_json's bounds on a body: one that never finishes arriving is answered 408 in time."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from router import http
from router.schemas import EmbedRequest
from shared.errors import EmbedServeError, ErrorType


def request_with(chunks: list[bytes], then_hang: bool) -> Request:
    queue = list(chunks)

    async def receive() -> dict:
        if queue:
            return {"type": "http.request", "body": queue.pop(0),
                    "more_body": then_hang or bool(queue)}
        await asyncio.Event().wait()  # the client sends nothing more, and stays
        raise AssertionError("unreachable")

    scope = {"type": "http", "method": "POST", "path": "/embed", "query_string": b"",
             "headers": [(b"content-type", b"application/json")]}
    return Request(scope, receive)


def test_a_body_that_stops_arriving_is_a_408(monkeypatch) -> None:
    monkeypatch.setattr(http, "BODY_TIMEOUT_S", 0.2)
    trickle = request_with([b'{"inputs": "hel'], then_hang=True)
    with pytest.raises(EmbedServeError) as refused:
        asyncio.run(http.read_json(trickle, EmbedRequest, 1000))
    assert refused.value.error_type is ErrorType.REQUEST_TIMEOUT
    assert "did not arrive within 0.2 s" in refused.value.message


def test_a_whole_body_is_read(monkeypatch) -> None:
    monkeypatch.setattr(http, "BODY_TIMEOUT_S", 0.2)
    whole = request_with([b'{"inputs": ', b'"hello"}'], then_hang=False)
    assert asyncio.run(http.read_json(whole, EmbedRequest, 1000)).inputs == "hello"
