"""Clients that never read their answers: the answer is dropped and the connection ended after
SEND_TIMEOUT_S (here shortened), over HTTP/1.1 and HTTP/2, on hypercorn as the router runs it."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import time

import h2.config
import h2.connection
import pytest

from router import cli, http

ANSWER = 20_000_000
TIMEOUT_S = 1.0


def answered_app(finished: list[float]):
    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(ANSWER).encode())]})
        await send({"type": "http.response.body", "body": b"x" * ANSWER})
        finished.append(time.monotonic())
    return app


async def serving(client, finished: list[float]) -> None:
    """Serve the app as the router does, run the blocking `client` against it, then stop."""
    hyper = cli._hypercorn(cli.parse_config(["--hostname", "127.0.0.1", "--port", "0"]), 0)
    sockets = cli._bind(hyper, "--port")
    port = sockets.insecure_sockets[0].getsockname()[1]
    stop = asyncio.Event()
    server = asyncio.ensure_future(cli._http_server(
        http.SendTimeout(answered_app(finished)), hyper, sockets, stop.wait))
    try:
        for _ in range(100):  # the socket listens once hypercorn's lifespan has started
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except ConnectionRefusedError:
                await asyncio.sleep(0.05)
            else:
                writer.close()
                break
        await asyncio.to_thread(client, port)
    finally:
        stop.set()
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)


@pytest.fixture(autouse=True)
def short_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "SEND_TIMEOUT_S", TIMEOUT_S)
    monkeypatch.setattr(cli, "SEND_TIMEOUT_S", TIMEOUT_S)


def unread_connection(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # fills up at once
    sock.connect(("127.0.0.1", port))
    return sock


def test_http1_connection_of_a_client_that_does_not_read_is_ended() -> None:
    finished: list[float] = []
    received = 0

    def client(port: int) -> None:
        nonlocal received
        with unread_connection(port) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            time.sleep(TIMEOUT_S * 6)  # reads nothing: the kernel's zero-window probes go on
            sock.settimeout(5)
            try:
                while chunk := sock.recv(1 << 20):
                    received += len(chunk)
            except (ConnectionResetError, TimeoutError):
                pass

    asyncio.run(serving(client, finished))
    # What the kernels buffered came through; the rest was dropped with the connection.
    assert received < ANSWER / 2


def test_http2_stream_of_a_client_that_does_not_read_is_dropped() -> None:
    finished: list[float] = []
    started = 0.0

    def client(port: int) -> None:
        nonlocal started
        with socket.create_connection(("127.0.0.1", port)) as sock:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            conn.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "http"),
                                  (":authority", "x")], end_stream=True)
            sock.sendall(conn.data_to_send())
            started = time.monotonic()
            sock.settimeout(0.2)
            # The socket is read, but no flow-control window is granted: the answer can only
            # wait on the server.
            while time.monotonic() - started < TIMEOUT_S * 5 and not finished:
                with contextlib.suppress(TimeoutError):
                    conn.receive_data(sock.recv(1 << 16))
                if out := conn.data_to_send():
                    sock.sendall(out)

    asyncio.run(serving(client, finished))
    # The app was let go (its answer freed) once the stream made no progress for the timeout.
    assert finished and finished[0] - started < TIMEOUT_S * 4


def test_the_open_files_soft_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 64:
        pytest.skip("needs a finite hard limit")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard // 2, hard))
    try:
        cli.raise_open_files_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
