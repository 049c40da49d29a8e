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


@pytest.mark.parametrize("coding", ["gzip", "GZIP", "br", "deflate, gzip"])
def test_a_body_in_a_content_coding_is_a_415(coding: str) -> None:
    # The server decodes no coding: a gzip body read as JSON would be "malformed (byte 0)",
    # and a plain body labelled gzip would be embedded as if the label were not there.
    labelled = request_with([b'{"inputs": "hello"}'], then_hang=False)
    labelled.scope["headers"].append((b"content-encoding", coding.encode()))
    with pytest.raises(EmbedServeError) as refused:
        asyncio.run(http.read_json(labelled, EmbedRequest, 1000))
    assert refused.value.error_type is ErrorType.UNSUPPORTED_MEDIA_TYPE
    assert f"`Content-Encoding: {coding}` is not supported" in refused.value.message


def test_an_identity_content_coding_is_read() -> None:
    plain = request_with([b'{"inputs": "hello"}'], then_hang=False)
    plain.scope["headers"].append((b"content-encoding", b"identity"))
    assert asyncio.run(http.read_json(plain, EmbedRequest, 1000)).inputs == "hello"
