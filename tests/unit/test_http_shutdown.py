"""router/cli.py's HTTP shutdown: the drain and hypercorn's close share one --shutdown-grace, as
gRPC's do (tests/unit/test_grpc_shutdown.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from types import SimpleNamespace

import pytest

from router import cli, http_server
from router.admission import Admission

ANSWER = 20_000_000  # far more than the kernels buffer


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def big_answer(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(ANSWER).encode())]})
    await send({"type": "http.response.body", "body": b"x" * ANSWER})


def test_an_unread_answer_and_a_request_past_the_grace_stop_within_one_grace(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A request that outlasts the grace takes all of it in the drain; a client that never
    reads its answer must not then hold the port for a second grace."""
    grace = 2.0
    monkeypatch.setattr(http_server, "CLOSE_MIN_S", 0.1)
    monkeypatch.setattr(cli, "build_app", lambda state, tracer: big_answer)
    port = _free_port()
    config = cli.parse_config(["--hostname", "127.0.0.1", "--port", str(port),
                               "--shutdown-grace", str(grace)])
    admission = Admission(1)

    async def nothing(*args: object) -> None:
        pass

    service = SimpleNamespace(admission=admission, start=nothing, stop=nothing)
    state = SimpleNamespace(config=config, service=service)

    async def main() -> float:
        computing = asyncio.Event()

        async def in_flight() -> None:  # outlasts the grace: answered 503 by the drain
            async with admission.admitted(1):
                computing.set()
                await asyncio.sleep(3600)

        serving = asyncio.ensure_future(cli._serve(state, None))  # type: ignore[arg-type]
        request = asyncio.ensure_future(in_flight())
        await computing.wait()
        for _ in range(100):  # the port listens once hypercorn's lifespan has started
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, limit=1024)
                break
            except ConnectionRefusedError:
                await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")  # answering; the rest is never read
        reader._transport.pause_reading()  # type: ignore[attr-defined]
        await asyncio.sleep(0.2)  # the server's send is stuck on the full window
        os.kill(os.getpid(), signal.SIGTERM)  # handled by _serve: the drain starts
        began = time.monotonic()
        await serving
        elapsed = time.monotonic() - began
        writer.close()
        with pytest.raises(Exception, match="--shutdown-grace"):
            await request
        return elapsed

    with caplog.at_level(logging.WARNING, logger="embedserve"):
        elapsed = asyncio.run(asyncio.wait_for(main(), 30))
    assert "closing them" in caplog.text  # closed by force, with the warning
    # The drain's grace, and CLOSE_MIN_S, not a second grace (slack for a loaded machine).
    assert grace <= elapsed < grace + 1.0, elapsed


def serving_state(start) -> SimpleNamespace:
    config = cli.parse_config(["--hostname", "127.0.0.1", "--port", str(_free_port()),
                               "--shutdown-grace", "1"])

    async def nothing(*args: object) -> None:
        pass

    service = SimpleNamespace(admission=Admission(1), start=start, stop=nothing)
    return SimpleNamespace(config=config, service=service)


def test_a_failed_start_closes_the_port_and_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "build_app", lambda state, tracer: big_answer)

    async def failing(timeout: float) -> None:
        raise cli.ConfigError("the model cannot be served")

    with pytest.raises(cli.ConfigError) as failed:
        asyncio.run(asyncio.wait_for(cli._serve(serving_state(failing), None), 30))
    assert str(failed.value) == "the model cannot be served"


def test_a_closed_terminal_stops_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    # SIGHUP, whose default action would end the process without the drain.
    monkeypatch.setattr(cli, "build_app", lambda state, tracer: big_answer)
    started = asyncio.Event()

    async def start(timeout: float) -> None:
        started.set()

    async def main() -> None:
        serving = asyncio.ensure_future(cli._serve(serving_state(start), None))
        await started.wait()
        await asyncio.sleep(0.1)
        os.kill(os.getpid(), signal.SIGHUP)
        await serving

    # Were SIGHUP not the server's, this no-op would take it: the test times out, and the
    # signal's default action does not end pytest itself.
    unhandled = signal.signal(signal.SIGHUP, lambda signum, frame: None)
    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        signal.signal(signal.SIGHUP, unhandled)
