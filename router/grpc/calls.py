"""How an answer becomes a gRPC call: the status of each error type (the gRPC counterpart of
router/errors.py), compute headers on unary replies, and streams answered in input order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

import grpc
from google.protobuf.message import DecodeError

from router.admission import patiently
from router.grpc.observed import observed
from shared.errors import EmbedServeError, ErrorType

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Reply = TypeVar("Reply")

# The one table of gRPC statuses (TEI's for its five types, the closest code for the rest; the
# ones a client sees are listed in the README's gRPC section).
STATUS: dict[ErrorType, grpc.StatusCode] = {
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

_NS_PER_MS = 1_000_000

# The handler factory of each (request streaming, response streaming) shape.
FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class Undecodable(NamedTuple):
    """What a unary request that does not parse as its message type arrives as. grpc answers a
    deserializer's exception UNKNOWN before any of our code runs; tonic (TEI) answers INTERNAL
    with the decoder's words, which `unary` does on seeing this."""

    reason: str


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return Undecodable(str(exc))

    return decode


def method_handlers(service: Any, servicer: Any,
                    messages: Any) -> dict[str, grpc.RpcMethodHandler]:
    """`service`'s (a ServiceDescriptor) methods answered by `servicer`'s methods of the same
    names, what the generated add_*Servicer_to_server registers but with unary requests decoded
    by `_lenient` (a stream's undecodable message already fails inside the servicer, where the
    stream is read). `messages`: the generated module holding the message classes."""
    handlers = {}
    for method in service.methods:
        parse = getattr(messages, method.input_type.name).FromString
        factory = FACTORIES[(method.client_streaming, method.server_streaming)]
        # (The tracer is None unless --otlp-endpoint.)
        behavior = observed(getattr(servicer, method.name), f"/{service.full_name}/{method.name}",
                            method.server_streaming, servicer.service.tracer)
        handlers[method.name] = factory(
            behavior,
            request_deserializer=parse if method.client_streaming else _lenient(parse),
            response_serializer=getattr(messages, method.output_type.name).SerializeToString)
    return handlers


def _as_error(exc: Exception, method: str) -> EmbedServeError:
    if isinstance(exc, EmbedServeError):
        return exc
    if isinstance(exc, DecodeError):
        # A request (or a stream's next message) that is not the message type: the client's
        # mistake, which tonic (TEI) answers INTERNAL with the decoder's words.
        log.warning("%s: undecodable request message: %s", method, exc)
        return EmbedServeError(ErrorType.INTERNAL, f"failed to decode the request: {exc}")
    log.error("unhandled error in %s", method, exc_info=exc)
    return EmbedServeError(ErrorType.INTERNAL, "internal server error")


def _compute_headers(reply: Any, compute_type: str) -> tuple[tuple[str, str], ...]:
    """The HTTP API's x-compute-* / x-*-time headers as response metadata, as TEI sends them
    (whole milliseconds), for replies that carry a `Metadata`."""
    if "metadata" not in type(reply).DESCRIPTOR.fields_by_name:
        return ()
    m = reply.metadata
    total = str(m.total_time_ns // _NS_PER_MS)
    return (("x-compute-type", compute_type), ("x-compute-time", total),
            ("x-total-time", total), ("x-compute-characters", str(m.compute_chars)),
            ("x-compute-tokens", str(m.compute_tokens)),
            ("x-tokenization-time", str(m.tokenization_time_ns // _NS_PER_MS)),
            ("x-queue-time", str(m.queue_time_ns // _NS_PER_MS)),
            ("x-inference-time", str(m.inference_time_ns // _NS_PER_MS)))


def unary(answer: Callable[[Any, Any], Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A servicer method answering one reply: to one request, or to a whole request stream
    (`answer` then gets the stream). The servicer has a `state` (router.routes.AppState)."""

    async def call(servicer: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, Undecodable):
                raise DecodeError(request.reason)
            reply = await answer(servicer, request)
        except Exception as exc:  # each becomes a status; bugs are logged first
            error = _as_error(exc, answer.__qualname__)
        else:
            await context.send_initial_metadata(
                _compute_headers(reply, servicer.state.compute_type))
            return reply
        await context.abort(STATUS[error.error_type], error.message)

    call.__name__ = call.__qualname__ = answer.__name__
    return call


def streaming(answer: Callable[[Any, Any], Awaitable[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """A servicer method answering each message of a request stream with one reply, in the
    order of the requests, while later requests are already being worked on; each message
    waits for its permits (`patiently`). The servicer has `stream_parallelism`: the most
    requests of one stream in flight at once."""

    async def call(servicer: Any, requests: AsyncIterator[Any],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        def patient(request: Any) -> Awaitable[Any]:
            return patiently(lambda: answer(servicer, request))

        try:
            async for reply in in_order(requests, patient, servicer.stream_parallelism):
                yield reply
        except Exception as exc:  # each becomes a status; bugs are logged first
            error = _as_error(exc, answer.__qualname__)
        else:
            return
        # The first failure ends the stream with its status (as TEI); later work is dropped.
        await context.abort(STATUS[error.error_type], error.message)

    call.__name__ = call.__qualname__ = f"{answer.__name__}_stream"
    return call


def _seen(work: asyncio.Future) -> None:
    """Read a dropped answer's failure, so that asyncio does not log it as never retrieved."""
    if not work.cancelled():
        work.exception()


async def in_order(requests: AsyncIterator[Request],
                   answer: Callable[[Request], Awaitable[Reply]],
                   parallelism: int) -> AsyncIterator[Reply]:
    """Start `answer` on each request as it arrives (at most `parallelism` unanswered at once,
    so a fast client cannot queue unbounded work); yield the replies in request order."""
    slots = asyncio.Semaphore(parallelism)
    started: asyncio.Queue[asyncio.Future[Reply] | None] = asyncio.Queue()

    async def feed() -> None:
        try:
            async for request in requests:
                await slots.acquire()
                started.put_nowait(asyncio.ensure_future(answer(request)))
        finally:
            started.put_nowait(None)  # the end of the requests (or of reading them)

    feeder = asyncio.ensure_future(feed())
    try:
        while (work := await started.get()) is not None:
            try:
                reply = await work
            finally:
                slots.release()
            yield reply
        await feeder  # a failure to read the request stream is the call's failure
    finally:
        feeder.cancel()
        while not started.empty():
            if (work := started.get_nowait()) is None:
                continue
            # A failure is the call's to ignore (a sibling's already ends it), also one that
            # comes after the cancel: Python 3.11's wait_for can swallow a cancel.
            work.add_done_callback(_seen)
            work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await feeder
