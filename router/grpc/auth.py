"""`authorization: Bearer <key>` metadata on every tei.v1 call when --api-key is set.

Health and reflection stay open, as TEI leaves them (and as HTTP leaves /health): probes and
tools must not need the key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from router.grpc.calls import FACTORIES
from router.grpc.observed import observed
from router.http import bearer_matches

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")


def _refusal(handler: grpc.RpcMethodHandler, message: str,
             path: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED at once, with a
    request id and an access line as any call has (HTTP's 401s have them too)."""

    async def refuse(request, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # (never reached: the abort ends the call)

    streams = handler.response_streaming
    factory = FACTORIES[(handler.request_streaming, streams)]
    return factory(observed(refuse_stream if streams else refuse, path, streams, None),
                   request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str) -> None:
        self.key = api_key.encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails],
                               Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler  # None: an unknown method, which grpc answers UNIMPLEMENTED
        given = next((value for key, value in details.invocation_metadata or ()
                      if key == "authorization"), "")
        if isinstance(given, str):
            given = given.encode()
        if bearer_matches(given, self.key):
            return handler
        return _refusal(handler, "missing authorization metadata" if not given
                        else "invalid API key in the authorization metadata", details.method)
