"""router/grpc/auth.py: which calls need the API key, and how a refused call is answered."""

from __future__ import annotations

import asyncio
import inspect
import logging
from types import SimpleNamespace

import grpc
import pytest

from router.grpc.auth import ApiKeyInterceptor


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self) -> None:
        self.status: grpc.StatusCode | None = None
        self.trailing: tuple = ()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = code
        raise _Aborted(code, details)

    def invocation_metadata(self) -> tuple:
        return (("x-request-id", "r-9"),)

    def set_trailing_metadata(self, metadata: tuple) -> None:
        self.trailing = metadata

    def code(self) -> grpc.StatusCode | None:
        return self.status


def _answer(behavior, context: _Context) -> None:
    """Run a refusal's behavior, unary or streaming, to its end."""
    async def run() -> None:
        if inspect.isasyncgenfunction(behavior):
            async for _ in behavior(None, context):
                pass
        else:
            await behavior(None, context)

    asyncio.run(run())


async def _handle(request, context) -> str:
    return "answered"


def _chosen(method: str, metadata: tuple = (), handler: object = None) -> object:
    handler = handler or grpc.unary_unary_rpc_method_handler(_handle)

    async def continuation(details) -> object:
        return handler

    details = SimpleNamespace(method=method, invocation_metadata=metadata)
    return asyncio.run(ApiKeyInterceptor("s3cret").intercept_service(continuation, details))


@pytest.mark.parametrize("method", [
    "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"])
def test_health_and_both_reflections_need_no_key(method: str) -> None:
    handler = grpc.unary_unary_rpc_method_handler(_handle)
    assert _chosen(method, handler=handler) is handler


def test_an_unknown_method_stays_unknown_without_a_key() -> None:
    async def continuation(details) -> None:
        return None  # grpc then answers UNIMPLEMENTED

    details = SimpleNamespace(method="/tei.v1.Embed/Nope", invocation_metadata=())
    assert asyncio.run(ApiKeyInterceptor("s3cret").intercept_service(continuation,
                                                                     details)) is None


@pytest.mark.parametrize(("metadata", "message"), [
    ((), "missing authorization metadata"),
    ((("authorization", ""),), "missing authorization metadata"),
    ((("x-other", "Bearer s3cret"),), "missing authorization metadata"),
    ((("authorization", "Bearer wrong"),), "invalid API key in the authorization metadata"),
    ((("authorization", b"Bearer wrong"),), "invalid API key in the authorization metadata"),
])
def test_a_refusal_says_whether_the_key_was_missing_or_wrong(metadata: tuple,
                                                             message: str) -> None:
    refusal = _chosen("/tei.v1.Embed/Embed", metadata)
    with pytest.raises(_Aborted) as info:
        _answer(refusal.unary_unary, _Context())  # type: ignore[attr-defined]
    assert info.value.args == (grpc.StatusCode.UNAUTHENTICATED, message)


def test_a_key_sent_as_bytes_passes() -> None:
    handler = grpc.unary_unary_rpc_method_handler(_handle)
    assert _chosen("/tei.v1.Embed/Embed", (("authorization", b"Bearer s3cret"),),
                   handler) is handler


@pytest.mark.parametrize(("factory", "attribute"), [
    (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (grpc.stream_stream_rpc_method_handler, "stream_stream")])
def test_a_refusal_has_the_shape_and_codecs_of_the_refused_method(factory,
                                                                  attribute: str) -> None:
    def decode(data: bytes) -> bytes:
        return data

    def encode(reply: bytes) -> bytes:
        return reply

    handler = factory(_handle, request_deserializer=decode, response_serializer=encode)
    refusal = _chosen("/tei.v1.Embed/EmbedStream", (), handler)
    assert (refusal.request_streaming, refusal.response_streaming) == (  # type: ignore[union-attr]
        handler.request_streaming, handler.response_streaming)
    assert refusal.request_deserializer is decode  # type: ignore[union-attr]
    assert refusal.response_serializer is encode  # type: ignore[union-attr]
    context = _Context()
    with pytest.raises(_Aborted) as info:
        _answer(getattr(refusal, attribute), context)
    assert info.value.args[0] == grpc.StatusCode.UNAUTHENTICATED
    assert context.trailing == (("x-request-id", "r-9"),)  # as any call's


def test_a_refusal_has_an_access_line_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    refusal = _chosen("/tei.v1.Embed/Embed")
    with caplog.at_level(logging.DEBUG, logger="embedserve.access"), pytest.raises(_Aborted):
        _answer(refusal.unary_unary, _Context())  # type: ignore[attr-defined]
    assert [m.rsplit(" in ", 1)[0] for m in caplog.messages] == [
        "/tei.v1.Embed/Embed -> UNAUTHENTICATED"]
