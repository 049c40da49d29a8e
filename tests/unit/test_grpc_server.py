"""router/grpc/server.py: the server's options (a busy port, the payload limit) and the health
it reports from the start to the end of `serve`."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from router.grpc import server as grpc_server
from router.grpc.protos import pb

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _state(port: int = 0, payload_limit: int = 2_000_000) -> SimpleNamespace:
    service = SimpleNamespace(tracer=None, started=False, ready=False, draining=False,
                              admission=SimpleNamespace(deadline=None))
    return SimpleNamespace(
        service=service, model=SimpleNamespace(kind="embedding"),
        config=SimpleNamespace(api_key=None, payload_limit=payload_limit, hostname="127.0.0.1",
                               port=port, shutdown_grace=0.2, max_concurrent_requests=8,
                               grpc_max_parallel_stream_requests=None))


@pytest.mark.parametrize(("kind", "answered"), [
    ("embedding", {"tei.v1.Embed"}), ("classifier", {"tei.v1.Predict"}),
    ("reranker", {"tei.v1.Predict", "tei.v1.Rerank"})])
def test_the_services_each_kind_of_model_answers(kind: str, answered: set[str]) -> None:
    # TEI's rule; the others stay NOT_SERVING.
    state = SimpleNamespace(model=SimpleNamespace(kind=kind))
    assert grpc_server.model_services(state) == answered  # type: ignore[arg-type]


def test_a_second_server_cannot_take_a_busy_port() -> None:
    # grpc lets two servers share a port by default (SO_REUSEPORT): the second must fail.
    async def main() -> None:
        state = _state()
        first = grpc_server.build_server(state, health.aio.HealthServicer())  # type: ignore[arg-type]
        port = first.add_insecure_port("127.0.0.1:0")
        second = grpc_server.build_server(state, health.aio.HealthServicer())  # type: ignore[arg-type]
        with pytest.raises(RuntimeError):
            second.add_insecure_port(f"127.0.0.1:{port}")

    asyncio.run(main())


def test_a_message_past_the_payload_limit_is_refused() -> None:
    async def main() -> tuple[grpc.StatusCode, grpc.StatusCode]:
        state = _state(payload_limit=1_000)
        server = grpc_server.build_server(state, health.aio.HealthServicer())  # type: ignore[arg-type]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        codes = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                decode = channel.unary_unary("/tei.v1.Tokenize/Decode",
                                             response_deserializer=pb.DecodeResponse.FromString)
                for ids in (range(2_000), range(3)):
                    data = pb.DecodeRequest(ids=list(ids)).SerializeToString()
                    try:
                        await decode(data, timeout=10)
                    except grpc.aio.AioRpcError as exc:
                        codes.append(exc.code())
        finally:
            await server.stop(None)
        return codes[0], codes[1]

    # The small one reaches the servicer (whose stand-in service has no tokenizer: INTERNAL).
    assert asyncio.run(main()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL)


@pytest.mark.parametrize("reflection", ["v1alpha", "v1"])
def test_reflection_finds_the_file_of_a_method(reflection: str) -> None:
    """`grpcurl describe tei.v1.Embed.EmbedStream` asks for the file containing the method, as
    TEI's (tonic's) reflection answers; grpcio-reflection's pool finds services and messages
    only (grpc/grpc#34743). Unknown methods stay NOT_FOUND."""
    async def main() -> list[str | int]:
        server = grpc_server.build_server(_state(), health.aio.HealthServicer())  # type: ignore[arg-type]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                info = channel.stream_stream(
                    f"/grpc.reflection.{reflection}.ServerReflection/ServerReflectionInfo",
                    request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                    response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
                symbols = ["tei.v1.Embed.EmbedStream", "tei.v1.Rerank.RerankStream",
                           "grpc.health.v1.Health.Check", "tei.v1.Embed.Nope", "tei.v1.Nope.Embed"]
                answers = [answer async for answer in info(iter(
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
                    for symbol in symbols), timeout=10)]
        finally:
            await server.stop(None)
        return [descriptor_pb2.FileDescriptorProto.FromString(
                    answer.file_descriptor_response.file_descriptor_proto[0]).name
                if answer.HasField("file_descriptor_response")
                else answer.error_response.error_code for answer in answers]

    not_found = grpc.StatusCode.NOT_FOUND.value[0]
    assert asyncio.run(main()) == ["tei.proto", "tei.proto", "grpc_health/v1/health.proto",
                                   not_found, not_found]


def test_health_from_the_start_to_the_shutdown() -> None:
    """Info answers from the start, the model's services and "" once ready; the shutdown
    makes every name NOT_SERVING (Info too), and the follower ends with `serve`."""
    port = _free_port()
    state = _state(port)

    async def main() -> None:
        stop = asyncio.Event()
        serving = asyncio.ensure_future(grpc_server.serve(state, stop.wait))  # type: ignore[arg-type]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def status(name: str) -> int:
                request = health_pb2.HealthCheckRequest(service=name)
                return (await stub.Check(request, wait_for_ready=True, timeout=10)).status

            await asyncio.sleep(0.1)
            assert [await status(name) for name in ("tei.v1.Info", "", "tei.v1.Embed")] == [
                SERVING, NOT_SERVING, NOT_SERVING]
            state.service.started = state.service.ready = True
            await asyncio.sleep(2 * grpc_server.HEALTH_INTERVAL_SECONDS)
            assert [await status(name) for name in ("", "tei.v1.Embed")] == [SERVING] * 2
            watch = stub.Watch(health_pb2.HealthCheckRequest(service="tei.v1.Info"))
            assert (await watch.read()).status == SERVING
            stop.set()
            assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
            await serving
        left = [t for t in asyncio.all_tasks() if t.get_name() == "the gRPC health follower"]
        await asyncio.sleep(0)
        assert [t for t in left if not t.done()] == []

    asyncio.run(asyncio.wait_for(main(), 30))


def test_an_ipv6_hostname_is_bracketed_in_the_address() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    state = _state(port)
    state.config.hostname = "::1"

    async def main() -> None:
        stop = asyncio.Event()
        serving = asyncio.ensure_future(grpc_server.serve(state, stop.wait))  # type: ignore[arg-type]
        async with grpc.aio.insecure_channel(f"[::1]:{port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            reply = await check(health_pb2.HealthCheckRequest(service="tei.v1.Info"),
                                wait_for_ready=True, timeout=10)
            assert reply.status == SERVING
        stop.set()
        await serving

    asyncio.run(asyncio.wait_for(main(), 30))
