"""What a tei.v1 call leaves behind, as an HTTP request does (router.http, router.tracing): a
request id, HTTP's `x-request-id`, on its log lines and batch entries and back to the client;
with --otlp-endpoint a SERVER span that ends with the call's status; at debug, one access line.

The id is the client's `x-request-id` metadata when it is safe to echo, else a new one; it comes
back in the trailing metadata, whatever the status. A stream is one call: its messages share
the id (a failed batch's log line names it, router.workers)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

from router.http import access_log, request_id_for
from router.tracing import current, rpc_ended, rpc_start
from shared import logs

HEADER = "x-request-id"

# A call cancelled this close to its deadline was cancelled by it. The client's grpc cancels
# (RST_STREAM) when its own timer fires, which the server's copy of the deadline (arrival plus
# grpc-timeout) trails by the one-way latency the cancel then takes: it arrives at about the
# server's deadline whatever the latency, often first (up to 7 ms before on localhost, 2 cores).
_DEADLINE_SLACK_S = 0.1


def _abandoned(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status of a call cancelled under its handler: grpc.aio cancels it when the client
    cancels or its deadline passes, and sends nothing, so `context.code()` is still None (which
    would read as OK). Which of the two it was, by the deadline (None: none)."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= _DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class _Call:
    """One call's id, log span and (traced) span, from its arrival to its status."""

    def __init__(self, path: str, context: grpc.aio.ServicerContext, tracer: Any) -> None:
        self.path = path
        self.started = time.perf_counter()
        metadata = context.invocation_metadata() or ()
        given = next((v for k, v in metadata if k == HEADER and isinstance(v, str)), "")
        self.log_span = logs.LogSpan(path, request_id_for(given))
        # Set before the first reply and before any abort, which sends it with the status.
        context.set_trailing_metadata(((HEADER, self.log_span.request_id),))
        self.span = None if tracer is None else rpc_start(tracer, path, metadata)
        if self.span is not None:
            self.span.set_attribute("request_id", self.log_span.request_id)
            ids = self.span.get_span_context()
            self.log_span = dataclasses.replace(self.log_span, trace_id=f"{ids.trace_id:032x}",
                                                span_id=f"{ids.span_id:016x}")

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """The call's log span (and trace span) current while its own code runs. Not across a
        stream's yield: grpc.aio leaves the generator of a call the client cancelled to the
        garbage collector, which closes it in another Context, where resetting fails. The tasks
        the code starts (a stream's messages) copy both."""
        token = logs.current_span.set(self.log_span)
        try:
            with current(self.span) if self.span is not None else contextlib.nullcontext():
                yield
        finally:
            logs.current_span.reset(token)

    def ended(self, code: grpc.StatusCode | None) -> None:
        if self.span is not None:
            rpc_ended(self.span, code)
            self.span.end()
        token = logs.current_span.set(self.log_span)
        try:
            access_log.debug("%s -> %s in %.1f ms", self.path, getattr(code, "name", "OK"),
                             (time.perf_counter() - self.started) * 1e3)
        finally:
            logs.current_span.reset(token)


def observed(behavior: Callable[..., Any], path: str, streams: bool, tracer: Any) -> Any:
    """`behavior` (a servicer method; `path` its /tei.v1.Service/Method) as a call that leaves
    the above behind; `tracer` None: no span (no --otlp-endpoint)."""
    if streams:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = _Call(path, context, tracer)
            replies = behavior(request, context).__aiter__()
            code = None
            try:
                while True:
                    with call.running():
                        try:
                            reply = await anext(replies)
                        except StopAsyncIteration:
                            break
                    yield reply
            except (asyncio.CancelledError, GeneratorExit):
                # Cancelled while working, or closed while waiting for the client to read
                # (the garbage collector's aclose): the client went away.
                code = _abandoned(context)
                raise
            finally:
                call.ended(code or context.code())

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _Call(path, context, tracer)
        code = None
        try:
            with call.running():
                return await behavior(request, context)
        except asyncio.CancelledError:
            code = _abandoned(context)
            raise
        finally:
            call.ended(code or context.code())

    return unary
