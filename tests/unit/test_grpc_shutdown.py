"""router/grpc/server.py's shutdown: the drain and the server's stop share one --shutdown-grace."""

from __future__ import annotations

import asyncio
import socket
import time
from types import SimpleNamespace

import grpc
import pytest

from router import http_server
from router.admission import Admission
from router.grpc import server as grpc_server


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_open_stream_and_a_request_past_the_grace_stop_within_one_grace(monkeypatch) -> None:
    """A request that outlasts the grace takes all of it in the drain; a stream the client
    keeps open must not then hold the port for a second grace."""
    grace = 1.0
    monkeypatch.setattr(http_server, "CLOSE_MIN_S", 0.1)

    def idle_stream_server(state, health_servicer) -> grpc.aio.Server:
        server = grpc.aio.server()

        async def idle(requests, context) -> None:
            async for _ in requests:  # the client sends nothing and never ends it
                pass

        handler = grpc.stream_stream_rpc_method_handler(idle)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Idle", {"Stream": handler}),))
        return server

    monkeypatch.setattr(grpc_server, "build_server", idle_stream_server)

    async def main() -> float:
        admission = Admission(1)
        service = SimpleNamespace(admission=admission, started=True, ready=True,
                                  draining=False)
        port = _free_port()
        state = SimpleNamespace(
            config=SimpleNamespace(hostname="127.0.0.1", port=port, shutdown_grace=grace),
            service=service, model=SimpleNamespace(kind="embedding"))
        stop, computing = asyncio.Event(), asyncio.Event()

        async def in_flight() -> None:  # outlasts the grace: answered 503 by the drain
            async with admission.admitted(1):
                computing.set()
                await asyncio.sleep(3600)

        async def until_stopped() -> None:
            await stop.wait()
            await admission.drain(grace)

        serving = asyncio.ensure_future(grpc_server.serve(state, until_stopped))  # type: ignore[arg-type]
        request = asyncio.ensure_future(in_flight())
        await computing.wait()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream("/test.Idle/Stream")()
            await call.wait_for_connection()
            await asyncio.sleep(0.1)  # the server has the stream
            stop.set()
            began = time.monotonic()
            await serving
            elapsed = time.monotonic() - began
            call.cancel()
        with pytest.raises(Exception, match="--shutdown-grace"):
            await request
        return elapsed

    elapsed = asyncio.run(asyncio.wait_for(main(), 30))
    assert grace <= elapsed < grace + 0.5, elapsed
