"""router/grpc/calls.py: stream replies in request order with bounded work in flight, and the
one table of gRPC statuses."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from types import SimpleNamespace

import grpc
import pytest

from router.grpc.calls import STATUS, in_order, streaming, unary
from router.grpc.protos import pb
from router.grpc.server import readiness
from shared.errors import EmbedServeError, ErrorType, validation


async def _requests(items: list[int]) -> AsyncIterator[int]:
    for item in items:
        yield item


def run(coro):
    return asyncio.run(coro)


def test_replies_come_in_request_order_when_later_ones_finish_first() -> None:
    finished: list[int] = []
    done = [asyncio.Event() for _ in range(5)]

    async def answer(n: int) -> int:
        # The last request is answered first, each one only once the next is: that ends only
        # if they run at once (events, not sleeps of 10 ms apart, which a loaded machine
        # reorders).
        if n < 4:
            await asyncio.wait_for(done[n + 1].wait(), timeout=10)
        finished.append(n)
        done[n].set()
        return n * 10

    async def main() -> list[int]:
        return [reply async for reply in in_order(_requests([0, 1, 2, 3, 4]), answer, 8)]

    assert run(main()) == [0, 10, 20, 30, 40]
    assert finished == [4, 3, 2, 1, 0]


def test_at_most_parallelism_requests_are_unanswered() -> None:
    busy = 0
    most = 0

    async def answer(n: int) -> int:
        nonlocal busy, most
        busy += 1
        most = max(most, busy)
        await asyncio.sleep(0.001)
        busy -= 1
        return n

    async def main() -> list[int]:
        return [reply async for reply in in_order(_requests(list(range(50))), answer, 3)]

    assert run(main()) == list(range(50))
    assert most == 3


def test_the_first_failure_ends_the_stream_and_cancels_the_rest() -> None:
    cancelled: list[int] = []

    async def answer(n: int) -> int:
        if n == 1:
            raise validation("bad request 1")
        try:
            await asyncio.sleep(0 if n == 0 else 10)
        except asyncio.CancelledError:
            cancelled.append(n)
            raise
        return n

    async def main() -> list[int]:
        got = []
        with pytest.raises(EmbedServeError, match="bad request 1"):
            async for reply in in_order(_requests([0, 1, 2, 3]), answer, 8):
                got.append(reply)
        await asyncio.sleep(0)
        return got

    assert run(main()) == [0]
    assert sorted(cancelled) == [2, 3]


def test_a_cancelled_answer_that_fails_later_is_not_logged_as_never_retrieved() -> None:
    """An answer may outlive its cancel (Python 3.11's wait_for can swallow one) and fail
    after the stream ended: nobody awaits it then, so asyncio would log "Task exception was
    never retrieved" for a failure the call already answered."""
    unretrieved: list[str] = []

    async def answer(n: int) -> int:
        if n == 0:
            await asyncio.sleep(0.01)  # (request 1 is under way by then)
            raise validation("bad request 0")
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.01)  # the cancel swallowed; the work goes on, then fails
            raise EmbedServeError(ErrorType.UNHEALTHY, "the worker died") from None
        return n

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda _, context: unretrieved.append(context["message"]))
        with pytest.raises(EmbedServeError, match="bad request 0"):
            async for _ in in_order(_requests([0, 1]), answer, 8):
                pass
        await asyncio.sleep(0.05)
        gc.collect()  # (asyncio logs an unretrieved failure when the task is collected)
        await asyncio.sleep(0)

    run(main())
    assert unretrieved == []


class Aborted(Exception):
    pass


class FakeContext:
    """What `unary` and `streaming` use of grpc.aio.ServicerContext."""

    def __init__(self) -> None:
        self.headers: tuple = ()

    async def send_initial_metadata(self, headers) -> None:
        self.headers = headers

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


def _servicer(error: Exception | None):
    async def answer(servicer, request):
        if error is not None:
            raise error
        return pb.EmbedResponse(embeddings=[1.0], metadata=pb.Metadata(
            compute_chars=11, compute_tokens=3, total_time_ns=7_900_000,
            tokenization_time_ns=1_200_000, queue_time_ns=2_999_999, inference_time_ns=4_000_000))

    return SimpleNamespace(state=SimpleNamespace(compute_type="cpu"), stream_parallelism=2,
                           unary=unary(answer), streaming=streaming(answer))


@pytest.mark.parametrize("error_type", list(ErrorType))
def test_every_error_type_has_its_status(error_type: ErrorType) -> None:
    servicer = _servicer(EmbedServeError(error_type, "why"))
    with pytest.raises(Aborted) as info:
        run(servicer.unary(servicer, None, FakeContext()))
    assert info.value.args == (STATUS[error_type], "why")


def test_statuses_of_tei_and_api_md() -> None:
    assert STATUS[ErrorType.UNHEALTHY] == grpc.StatusCode.UNAVAILABLE
    assert STATUS[ErrorType.BACKEND] == STATUS[ErrorType.TOKENIZER] == \
        grpc.StatusCode.FAILED_PRECONDITION
    assert STATUS[ErrorType.OVERLOADED] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert STATUS[ErrorType.VALIDATION] == STATUS[ErrorType.EMPTY] == \
        grpc.StatusCode.INVALID_ARGUMENT


def test_a_bug_is_internal_without_its_details() -> None:
    servicer = _servicer(KeyError("secret internals"))
    with pytest.raises(Aborted) as info:
        run(servicer.unary(servicer, None, FakeContext()))
    assert info.value.args == (grpc.StatusCode.INTERNAL, "internal server error")


def test_unary_replies_carry_the_compute_headers() -> None:
    servicer, context = _servicer(None), FakeContext()
    reply = run(servicer.unary(servicer, None, context))
    assert list(reply.embeddings) == [1.0]
    # As TEI sends them: whole milliseconds, x-compute-time the total time.
    assert dict(context.headers) == {
        "x-compute-type": "cpu", "x-compute-time": "7", "x-total-time": "7",
        "x-compute-characters": "11", "x-compute-tokens": "3", "x-tokenization-time": "1",
        "x-queue-time": "2", "x-inference-time": "4"}


def test_a_stream_failure_becomes_the_status_after_the_earlier_replies() -> None:
    calls = 0

    async def answer(servicer, request: int):
        nonlocal calls
        calls += 1
        if request == 2:
            raise EmbedServeError(ErrorType.TOKENIZER, "cannot tokenize")
        return request

    servicer = SimpleNamespace(stream_parallelism=1)
    method = streaming(answer)

    async def main() -> list[int]:
        got = []
        with pytest.raises(Aborted) as info:
            async for reply in method(servicer, _requests([0, 1, 2, 3]), FakeContext()):
                got.append(reply)
        assert info.value.args == (grpc.StatusCode.FAILED_PRECONDITION, "cannot tokenize")
        return got

    assert run(main()) == [0, 1]


@pytest.mark.parametrize(("started", "ready", "draining", "server_up", "model_up"), [
    (False, False, False, False, False),  # loading (TEI does not listen yet)
    (True, True, False, True, True),
    (True, False, False, True, False),  # a worker restarting: "" stays up, as TEI's does
    (True, False, True, False, False),  # draining: everything refuses
])
def test_health_follows_what_each_service_needs(started: bool, ready: bool, draining: bool,
                                                server_up: bool, model_up: bool) -> None:
    state = SimpleNamespace(
        service=SimpleNamespace(started=started, ready=ready, draining=draining),
        model=SimpleNamespace(kind="reranker"))
    checks = readiness(state)
    assert set(checks) == {"", "tei.v1.Predict", "tei.v1.Rerank", "tei.v1.Tokenize"}
    assert checks[""]() is server_up
    assert [checks[name]() for name in ("tei.v1.Predict", "tei.v1.Rerank")] == [model_up] * 2
    assert checks["tei.v1.Tokenize"]() is not draining  # before the workers, and through


def test_a_stream_not_read_keeps_at_most_its_window_of_answers() -> None:
    """Answers wait in the stream until the client reads them: the servicer's window
    (--grpc-max-parallel-stream-requests, else --max-concurrent-requests) bounds them."""
    from router.grpc.services import _Servicer
    from shared.config import parse_config

    def window(*argv: str) -> int:
        state = SimpleNamespace(config=parse_config(list(argv), {}), service=None, model=None)
        return _Servicer(state).stream_parallelism  # type: ignore[arg-type]

    assert window() == 512
    assert window("--grpc-max-parallel-stream-requests", "16") == 16
    assert window("--grpc-max-parallel-stream-requests", "4096") == 512
    assert window("--max-concurrent-requests", "8") == 8

    answered = 0

    async def answer(n: int) -> int:
        nonlocal answered
        answered += 1
        return n

    async def main() -> None:
        replies = in_order(_requests(list(range(100))), answer, 16)
        await replies.__anext__()  # the client reads one answer, then nothing
        await asyncio.sleep(0.1)
        await replies.aclose()

    run(main())
    assert answered <= 16 + 1


def test_a_traced_stream_dropped_after_a_reply_ends_its_span_without_a_detach_error(
        caplog) -> None:
    """grpc.aio leaves the reply generator of a call the client cancelled to the garbage
    collector, whose aclose runs in another Context: a span kept current across a `yield` then
    failed to detach ("Failed to detach context", logged as an error)."""
    import contextvars

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from router.grpc.observed import observed

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def replies(request: object, context: object) -> AsyncIterator[int]:
        for n in range(3):
            yield n

    context = SimpleNamespace(invocation_metadata=lambda: (), code=lambda: None,
                              time_remaining=lambda: None, set_trailing_metadata=lambda m: None)
    stream = observed(replies, "/tei.v1.Embed/EmbedStream", True, provider.get_tracer("t"))

    async def call() -> None:
        gen = stream(None, context)
        assert await contextvars.copy_context().run(asyncio.ensure_future, gen.__anext__()) == 0
        # (as the garbage collector's finalizer closes it: in a fresh Context)
        await contextvars.Context().run(asyncio.ensure_future, gen.aclose())

    with caplog.at_level(logging.ERROR):
        run(call())  # (the log span too: resetting it there would raise ValueError)
    assert not [r for r in caplog.records if "detach" in r.getMessage()]
    [span] = exporter.get_finished_spans()
    assert span.name == "/tei.v1.Embed/EmbedStream"
    # Closed before its end: the client went away (not OK, though no status was set).
    assert (span.attributes or {})["rpc.grpc.status_code"] == "CANCELLED"


@pytest.mark.parametrize(("authorization", "passes"), [
    ("Bearer s3cret", True), ("bearer s3cret", True), ("BEARER  s3cret", True),
    (None, False), ("s3cret", False), ("Basic s3cret", False), ("Bearer s3cre", False),
])
def test_the_api_key_metadata_takes_the_bearer_scheme_in_any_case(
        authorization: str | None, passes: bool) -> None:
    # As over HTTP: the scheme's name is case-insensitive (RFC 9110 11.1), the key is not.
    from router.grpc.auth import ApiKeyInterceptor

    async def handle(request, context) -> str:
        return "answered"

    handler = grpc.unary_unary_rpc_method_handler(handle)

    async def continuation(details) -> grpc.RpcMethodHandler:
        return handler

    metadata = (("authorization", authorization),) if authorization is not None else ()
    details = SimpleNamespace(method="/tei.v1.Embed/Embed", invocation_metadata=metadata)
    chosen = run(ApiKeyInterceptor("s3cret").intercept_service(continuation, details))
    assert (chosen is handler) is passes
