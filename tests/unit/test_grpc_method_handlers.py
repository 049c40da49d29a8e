"""router/grpc/calls.py: the handlers registered for each tei.v1 method (their shape, their
decoding, their spans), the statuses clients see, and how a call ends."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from types import SimpleNamespace

import grpc
import pytest
from google.protobuf.message import DecodeError

from router.grpc.calls import STATUS, Undecodable, in_order, method_handlers, streaming
from router.grpc.protos import pb
from router.grpc.services import EmbedServicer
from shared.errors import ErrorType

EMBED = pb.DESCRIPTOR.services_by_name["Embed"]
SHAPES = {(False, False): "unary_unary", (False, True): "unary_stream",
          (True, False): "stream_unary", (True, True): "stream_stream"}


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self) -> None:
        self.status: grpc.StatusCode | None = None

    async def send_initial_metadata(self, headers) -> None:
        pass

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = code
        raise _Aborted(code, details)

    def invocation_metadata(self) -> tuple:
        return ()

    def set_trailing_metadata(self, metadata: tuple) -> None:
        pass

    def code(self) -> grpc.StatusCode | None:
        return self.status


def _servicer(tracer: object = None) -> EmbedServicer:
    state = SimpleNamespace(
        service=SimpleNamespace(tracer=tracer, embed=None), model=SimpleNamespace(kind="embedding"),
        config=SimpleNamespace(max_concurrent_requests=8, grpc_max_parallel_stream_requests=None))
    return EmbedServicer(state)  # type: ignore[arg-type]


def test_the_statuses_a_client_sees_are_the_readmes() -> None:
    # README's gRPC section, and TEI's for its five types.
    assert STATUS == {
        ErrorType.VALIDATION: grpc.StatusCode.INVALID_ARGUMENT,
        ErrorType.EMPTY: grpc.StatusCode.INVALID_ARGUMENT,
        ErrorType.TOKENIZER: grpc.StatusCode.FAILED_PRECONDITION,
        ErrorType.BACKEND: grpc.StatusCode.FAILED_PRECONDITION,
        ErrorType.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
        ErrorType.UNHEALTHY: grpc.StatusCode.UNAVAILABLE,
        ErrorType.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
        ErrorType.UNAUTHORIZED: grpc.StatusCode.UNAUTHENTICATED,
        ErrorType.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
        ErrorType.METHOD_NOT_ALLOWED: grpc.StatusCode.UNIMPLEMENTED,
        ErrorType.PAYLOAD_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
        ErrorType.REQUEST_TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
        ErrorType.UNSUPPORTED_MEDIA_TYPE: grpc.StatusCode.INVALID_ARGUMENT,
        ErrorType.INTERNAL: grpc.StatusCode.INTERNAL,
    }


def test_each_method_has_a_handler_of_its_shape_and_messages() -> None:
    servicer = _servicer()
    handlers = method_handlers(EMBED, servicer, pb)
    assert set(handlers) == {m.name for m in EMBED.methods}
    for method in EMBED.methods:
        handler = handlers[method.name]
        shape = (method.client_streaming, method.server_streaming)
        assert (handler.request_streaming, handler.response_streaming) == shape, method.name
        # The servicer's own method, in the call's request id and log span (router.grpc.observed).
        behavior = getattr(handler, SHAPES[shape])
        assert inspect.isasyncgenfunction(behavior) is method.server_streaming, method.name
        request = pb.EmbedRequest(inputs="hi") if method.name.startswith("Embed") else None
        if method.name in ("Embed", "EmbedStream"):
            data = request.SerializeToString()  # type: ignore[union-attr]
            assert handler.request_deserializer(data) == request
        reply = pb.EmbedResponse(embeddings=[1.0])
        if method.name == "Embed":
            assert handler.response_serializer(reply) == reply.SerializeToString()


def test_an_undecodable_unary_request_is_kept_for_the_call_and_a_stream_s_raises() -> None:
    handlers = method_handlers(EMBED, _servicer(), pb)
    got = handlers["Embed"].request_deserializer(b"\xff\xff\xff")
    assert isinstance(got, Undecodable) and got.reason
    with pytest.raises(DecodeError):
        handlers["EmbedStream"].request_deserializer(b"\xff\xff\xff")
    # The call answers it INTERNAL with the decoder's words, as tonic (TEI) does.
    with pytest.raises(_Aborted) as info:
        asyncio.run(_servicer().Embed(got, _Context()))
    assert info.value.args == (grpc.StatusCode.INTERNAL,
                               f"failed to decode the request: {got.reason}")


def test_traced_handlers_keep_their_shape_and_mark_their_span_with_the_status() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    servicer = _servicer(provider.get_tracer("t"))
    handlers = method_handlers(EMBED, servicer, pb)
    for method in EMBED.methods:
        behavior = getattr(handlers[method.name], SHAPES[(method.client_streaming,
                                                          method.server_streaming)])
        assert inspect.isasyncgenfunction(behavior) is method.server_streaming, method.name

    async def invalid() -> AsyncIterator[pb.EmbedRequest]:
        for request in [pb.EmbedRequest(truncation_direction=7)]:
            yield request

    async def main() -> None:
        with pytest.raises(_Aborted):
            await handlers["Embed"].unary_unary(pb.EmbedRequest(truncation_direction=7),
                                                _Context())
        with pytest.raises(_Aborted):
            async for _ in handlers["EmbedStream"].stream_stream(invalid(), _Context()):
                pass

    asyncio.run(main())
    assert {span.name: span.attributes["rpc.grpc.status_code"]
            for span in exporter.get_finished_spans()} == {
        "/tei.v1.Embed/Embed": "INVALID_ARGUMENT", "/tei.v1.Embed/EmbedStream": "INVALID_ARGUMENT"}


def test_a_stream_answered_in_full_ends_without_a_status() -> None:
    async def answer(servicer, request: int) -> int:
        return request * 2

    method = streaming(answer)

    async def requests() -> AsyncIterator[int]:
        for n in (1, 2, 3):
            yield n

    async def main() -> list[int]:
        return [reply async for reply in method(SimpleNamespace(stream_parallelism=2),
                                                requests(), _Context())]

    assert asyncio.run(main()) == [2, 4, 6]


def test_a_request_stream_that_fails_to_read_fails_the_call_after_the_earlier_replies() -> None:
    async def requests() -> AsyncIterator[int]:
        yield 1
        yield 2
        raise DecodeError("truncated message")

    async def answer(n: int) -> int:
        return n

    async def main() -> list[int]:
        got = []
        with pytest.raises(DecodeError) as info:
            async for reply in in_order(requests(), answer, 4):
                got.append(reply)
        assert str(info.value) == "truncated message"
        return got

    assert asyncio.run(main()) == [1, 2]

