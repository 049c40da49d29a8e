"""The gRPC server of `embedserve --grpc`: the tei.v1 services, grpc.health.v1 and reflection on
the main port, with the HTTP server's lifecycle (router/cli.py): the port opens at once, the
model's services report NOT_SERVING until the workers are ready, SIGTERM drains."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from router.grpc.auth import ApiKeyInterceptor
from router.grpc.calls import method_handlers
from router.grpc.protos import pb
from router.grpc.services import SERVICE_NAMES, servicers
from router.http_server import close_budget
from router.routes import AppState
from router.tasks import start_supervised
from shared.errors import ConfigError

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# How often health follows the service's readiness, which changes at start-up, when a worker
# dies or returns, and on drain.
HEALTH_INTERVAL_SECONDS = 0.2
# Reflection's current name, which grpcurl, grpcui and Postman ask first; grpcio-reflection
# serves only v1alpha, whose messages v1 kept unchanged under the new package name.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


class _MethodsFound:
    """The descriptor pool that reflection answers from, also finding the file of a method
    (`tei.v1.Embed.EmbedStream`), as tonic's reflection (TEI's) does and `grpcurl describe
    <method>` asks: the pool alone finds services, messages, fields and enums only
    (grpc/grpc#34743), so grpcio-reflection answered NOT_FOUND."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> Any:  # (the pool's name)
        service, _, method = symbol.rpartition(".")
        try:
            if method in self.pool.FindServiceByName(service).methods_by_name:
                symbol = service
        except KeyError:
            pass  # not a method: the pool's own answer (KeyError: NOT_FOUND)
        return self.pool.FindFileContainingSymbol(symbol)


def model_services(state: AppState) -> set[str]:
    """The services the served model answers (TEI's rule); the others stay NOT_SERVING, a hint
    that they would only answer FAILED_PRECONDITION."""
    kind = state.model.kind
    if kind == "classifier":
        return {"tei.v1.Predict"}
    if kind == "reranker":
        return {"tei.v1.Predict", "tei.v1.Rerank"}
    return {"tei.v1.Embed"}


def build_server(state: AppState, health_servicer: health.aio.HealthServicer) -> grpc.aio.Server:
    config = state.config
    server = grpc.aio.server(
        interceptors=[ApiKeyInterceptor(config.api_key)] if config.api_key else [],
        options=[
            # grpc lets a second server bind a busy port by default: fail as HTTP does.
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", config.payload_limit),
            # Clients that ping to keep idle streams and connections alive (a 30 s keepalive is
            # common) are served, as TEI's tonic server serves them; grpc-core's default ends
            # their connection with GOAWAY "too many pings" after a few pings without data.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 1_000),
            ("grpc.http2.max_ping_strikes", 0),
        ],
    )
    named = servicers(state)
    for name, servicer in named.items():
        handlers = method_handlers(pb.DESCRIPTOR.services_by_name[name.removeprefix("tei.v1.")],
                                   servicer, pb)
        # Both, as the generated add_*Servicer_to_server does: the registered ones are looked
        # up without the generic handlers' per-call search.
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
        server.add_registered_method_handlers(name, handlers)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    listed = [*named, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
              reflection.SERVICE_NAME]
    reflector = reflection.aio.ReflectionServicer(
        listed, pool=_MethodsFound(descriptor_pool.Default()))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflector, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        reflector.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1}),))
    return server


def readiness(state: AppState) -> dict[str, Callable[[], bool]]:
    """When each followed name is SERVING: the model's services while the workers are ready
    and not draining; Tokenize (the tokenizer pool alone, which answers before the workers and
    while they restart) from the start until the drain; the server ("") from the end of
    start-up until the drain, whatever the workers do meanwhile. TEI reports these: its ""
    is SERVING all the time it listens, which is from the end of its start-up, so a liveness
    probe on "" must not fail while a worker restarts (the restart heals; killing the pod
    would not)."""
    service = state.service
    checks: dict[str, Callable[[], bool]] = {
        name: lambda: service.ready for name in model_services(state)}
    checks[""] = lambda: service.started and not service.draining
    checks["tei.v1.Tokenize"] = lambda: not service.draining
    return checks


async def follow_readiness(health_servicer: health.aio.HealthServicer,
                           checks: dict[str, Callable[[], bool]]) -> None:
    """Keep each name's health status what its check says."""
    reported: dict[str, int] = {}
    while True:
        for name, check in checks.items():
            status = SERVING if check() else NOT_SERVING
            if reported.get(name) != status:
                await health_servicer.set(name, status)
                reported[name] = status
        await asyncio.sleep(HEALTH_INTERVAL_SECONDS)


async def serve(state: AppState, until_stopped: Callable[[], Awaitable[None]]) -> None:
    """Serve until `until_stopped` returns (after draining, or when start-up failed)."""
    config = state.config
    health_servicer = health.aio.HealthServicer()
    for name in SERVICE_NAMES:
        # Info answers from the start; the follower below sets the rest (some never fit the
        # model and stay NOT_SERVING).
        await health_servicer.set(name, SERVING if name == "tei.v1.Info" else NOT_SERVING)
    await health_servicer.set("", NOT_SERVING)
    server = build_server(state, health_servicer)
    host = f"[{config.hostname}]" if ":" in config.hostname else config.hostname
    address = f"{host}:{config.port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen for gRPC on {address}: {exc}") from None
    await server.start()
    log.info("gRPC API on %s", address)
    follower = start_supervised(follow_readiness(health_servicer, readiness(state)),
                                "the gRPC health follower")
    try:
        await until_stopped()
    finally:
        follower.cancel()
        await health_servicer.enter_graceful_shutdown()
        # In-flight inference is drained by now; this bounds what is left (open streams) by
        # what the drain left of the grace, not by a second grace (but at least CLOSE_MIN_S
        # to send the last answers).
        await server.stop(close_budget(state.service.admission.deadline,
                                       config.shutdown_grace))

