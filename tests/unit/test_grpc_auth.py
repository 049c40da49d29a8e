"""router/grpc/auth.py: which calls need the API key, and how a refused call is answered."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from router.grpc.auth import ApiKeyInterceptor


class _Aborted(Exception):
    pass


class _Context:
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


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
        asyncio.run(refusal.unary_unary(None, _Context()))  # type: ignore[attr-defined]
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
    with pytest.raises(_Aborted) as info:
        asyncio.run(getattr(refusal, attribute)(None, _Context()))
    assert info.value.args[0] == grpc.StatusCode.UNAUTHENTICATED
