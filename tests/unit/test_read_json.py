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


def read(body: bytes, limit: int = 1000, **headers: str) -> EmbedRequest:
    request = request_with([body], then_hang=False)
    request.scope["headers"] = [(name.replace("_", "-").encode(), value.encode())
                                for name, value in {"content_type": "application/json",
                                                    **headers}.items()]
    return asyncio.run(http.read_json(request, EmbedRequest, limit))


def refusal(body: bytes, limit: int = 1000, **headers: str) -> EmbedServeError:
    with pytest.raises(EmbedServeError) as refused:
        read(body, limit, **headers)
    return refused.value


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8",
                                          "Application/JSON", " application/json ;charset=UTF-8",
                                          "application/vnd.api+json", "application/merge+JSON"])
def test_a_json_content_type_is_read_with_parameters_and_in_any_case(content_type: str) -> None:
    # As TEI's axum reads them: JSON-suffixed types (RFC 6839) too.
    assert read(b'{"inputs": "hello"}', content_type=content_type).inputs == "hello"


@pytest.mark.parametrize("content_type", ["text/plain", "application/jsonl", "charset=utf-8",
                                          "text/vnd.x+json", "application/json+xml"])
def test_another_content_type_is_a_415(content_type: str) -> None:
    refused = refusal(b'{"inputs": "hello"}', content_type=content_type)
    assert refused.error_type is ErrorType.UNSUPPORTED_MEDIA_TYPE
    assert refused.message == "Expected request with `Content-Type: application/json`"


@pytest.mark.parametrize("declared", [True, False])
def test_a_body_of_the_limit_is_read_and_one_byte_more_is_a_413(declared: bool) -> None:
    body = b'{"inputs": "hello"}'
    length = {"content_length": str(len(body))} if declared else {}
    assert read(body, limit=len(body), **length).inputs == "hello"
    longer = {"content_length": str(len(body) + 1)} if declared else {}
    refused = refusal(body + b" ", limit=len(body), **longer)
    assert refused.error_type is ErrorType.PAYLOAD_TOO_LARGE
    assert refused.message == f"request body larger than the payload limit of {len(body)} bytes"


def test_a_declared_length_past_the_limit_is_refused_before_the_body_is_read() -> None:
    async def receive() -> dict:
        raise AssertionError("the body was read")

    scope = {"type": "http", "method": "POST", "path": "/embed", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"1001")]}
    with pytest.raises(EmbedServeError) as refused:
        asyncio.run(http.read_json(Request(scope, receive), EmbedRequest, 1000))
    assert refused.value.error_type is ErrorType.PAYLOAD_TOO_LARGE


def test_a_client_gone_mid_upload_is_client_gone() -> None:
    pieces = [{"type": "http.request", "body": b'{"inputs": ', "more_body": True},
              {"type": "http.disconnect"}]

    async def receive() -> dict:
        return pieces.pop(0)

    scope = {"type": "http", "method": "POST", "path": "/embed", "query_string": b"",
             "headers": [(b"content-type", b"application/json")]}
    with pytest.raises(http.ClientGone):
        asyncio.run(http.read_json(Request(scope, receive), EmbedRequest, 1000))


@pytest.mark.parametrize(("body", "error_type", "message"), [
    (b'{"inputs": 5}', ErrorType.VALIDATION,
     "Failed to deserialize the JSON body into the target type: Expected `str | array`, got "
     "`int` - at `$.inputs`"),
    (b'{"inputs": "x", "extra": ' + b"[" * 5000 + b"]" * 5000 + b"}", ErrorType.BAD_REQUEST,
     "Failed to parse the request body as JSON: nested too deeply"),
    (b'{"inputs": "a\\uDBFFb"}', ErrorType.BAD_REQUEST,
     "Failed to parse the request body as JSON: a \\u escape is a lone UTF-16 surrogate, which "
     "is no character"),
    (b'{"inputs": "a\\udc00b"}', ErrorType.BAD_REQUEST,
     "Failed to parse the request body as JSON: a \\u escape is a lone UTF-16 surrogate, which "
     "is no character"),
    (b'{"inputs": "a"', ErrorType.BAD_REQUEST,
     "Failed to parse the request body as JSON: Input data was truncated"),
])
def test_a_body_that_is_no_request_is_refused_by_its_fault(
        body: bytes, error_type: ErrorType, message: str) -> None:
    refused = refusal(body, limit=len(body))
    assert (refused.error_type, refused.message) == (error_type, message)


@pytest.mark.parametrize("coding", ["", "IDENTITY", " identity "])
def test_an_empty_or_identity_content_coding_in_any_form_is_read(coding: str) -> None:
    assert read(b'{"inputs": "hello"}', content_encoding=coding).inputs == "hello"
