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

from router import cli, http, http_server
from tests.fixtures.hypercorn import served

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


@pytest.fixture(autouse=True)
def short_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "SEND_TIMEOUT_S", TIMEOUT_S)
    monkeypatch.setattr(http_server, "SEND_TIMEOUT_S", TIMEOUT_S)


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

    asyncio.run(served(answered_app(finished), client))
    # What the kernels buffered came through; the rest was dropped with the connection.
    assert received < ANSWER / 2


def _h2_get(sock: socket.socket) -> h2.connection.H2Connection:
    """An HTTP/2 connection on `sock` that has sent one `GET /` (stream 1)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "http"),
                          (":authority", "x")], end_stream=True)
    sock.sendall(conn.data_to_send())
    return conn


def test_http2_stream_of_a_client_that_does_not_read_is_dropped() -> None:
    finished: list[float] = []
    started = 0.0

    def client(port: int) -> None:
        nonlocal started
        with socket.create_connection(("127.0.0.1", port)) as sock:
            conn = _h2_get(sock)
            started = time.monotonic()
            sock.settimeout(0.2)
            # The socket is read, but no flow-control window is granted: the answer can only
            # wait on the server.
            while time.monotonic() - started < TIMEOUT_S * 5 and not finished:
                with contextlib.suppress(TimeoutError):
                    conn.receive_data(sock.recv(1 << 16))
                if out := conn.data_to_send():
                    sock.sendall(out)

    asyncio.run(served(answered_app(finished), client))
    # The app was let go (its answer freed) once the stream made no progress for the timeout.
    assert finished and finished[0] - started < TIMEOUT_S * 4



@pytest.mark.parametrize("seen", [True, False])
def test_http2_answer_of_a_client_gone_is_dropped_at_once(
        caplog: pytest.LogCaptureFixture, seen: bool) -> None:
    """Once an HTTP/2 connection is closed, hypercorn's sending task has ended: an answer sent
    after that (the 499 of work cancelled on the disconnect, which the app has `seen`; an
    answer ready just after it) waited for SEND_TIMEOUT_S, held whole, and was then warned of
    as not taken. Over HTTP/1.1 it is dropped at once."""
    took: list[float] = []

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        if seen:  # as unless_disconnected, or read_json mid-upload
            while (await receive())["type"] != "http.disconnect":
                pass
        else:
            await asyncio.sleep(0.3)  # the client is gone meanwhile
        started = time.monotonic()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * ANSWER})
        took.append(time.monotonic() - started)

    def client(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            _h2_get(sock)
        time.sleep(TIMEOUT_S * 2)

    with caplog.at_level("WARNING", logger="router.http"):
        asyncio.run(served(app, client))
    assert took and took[0] < TIMEOUT_S / 2, took
    assert not caplog.records


def test_the_open_files_soft_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 64:
        pytest.skip("needs a finite hard limit")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard // 2, hard))
    try:
        http_server.raise_open_files_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_main_raises_the_open_files_limit_before_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []

    async def serve(config) -> None:
        order.append("serve")

    monkeypatch.setattr(cli, "raise_open_files_limit", lambda: order.append("limit"))
    monkeypatch.setattr(cli, "run", serve)
    monkeypatch.setattr(cli, "setup_logging", lambda *args, **kwargs: None)
    assert cli.main(["--model-id", "unused", "--port", "0"]) == 0
    assert order == ["limit", "serve"]


def test_after_a_timed_out_piece_nothing_more_is_sent() -> None:
    sent: list[dict] = []

    async def stuck(message) -> None:
        if message["type"] == "http.response.body" and message["body"]:
            await asyncio.sleep(TIMEOUT_S * 10)  # the client takes nothing
        sent.append(message)

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * 10, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    asyncio.run(http.SendTimeout(app)({"type": "http"}, None, stuck))  # type: ignore[arg-type]
    assert [m["type"] for m in sent] == ["http.response.start"]


def test_an_answer_goes_to_the_server_in_pieces() -> None:
    """One answer is held once plus a piece: a large body is cut, the pieces are whole and in
    order, and the last one ends the answer only if the app's message did."""
    sent: list[dict] = []

    async def recorded(message) -> None:
        sent.append(message)

    body = bytes(range(256)) * (http.SEND_PIECE // 64)  # 4 pieces
    messages = [{"type": "http.response.start", "status": 200, "headers": []},
                {"type": "http.response.body", "body": body, "more_body": True},
                {"type": "http.response.body", "body": b""}]

    async def app(scope, receive, send) -> None:
        for message in messages:
            await send(message)

    asyncio.run(http.SendTimeout(app)({"type": "http"}, None, recorded))  # type: ignore[arg-type]
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert max(len(m["body"]) for m in bodies) <= http.SEND_PIECE
    assert len(bodies) == 4 + 1
    assert b"".join(m["body"] for m in bodies) == body
    assert [m.get("more_body", False) for m in bodies] == [True] * 4 + [False]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_listening_sockets_carry_the_send_timeout(host: str) -> None:
    """Connections accepted inherit TCP_USER_TIMEOUT from the listening socket, IPv6 too."""
    if not hasattr(socket, "TCP_USER_TIMEOUT"):
        pytest.skip("no TCP_USER_TIMEOUT on this system")
    if ":" in host and not socket.has_ipv6:
        pytest.skip("no IPv6")
    hyper = http_server.hypercorn_config(cli.parse_config(["--hostname", host, "--port", "0"]), 0)
    try:
        sockets = http_server.bind(hyper, "--port")
    except cli.ConfigError as exc:
        pytest.skip(f"{host}: {exc}")
    for sock in sockets.insecure_sockets:
        with sock:
            timeout = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
            assert timeout == int(TIMEOUT_S * 1000)


def test_drops_are_warned_at_most_once_an_interval_and_none_goes_untold(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(http, "DROP_REPORT_S", 0.3)

    async def drops() -> tuple[list[str], http.SendTimeout]:
        timeout = http.SendTimeout(answered_app([]))
        for _ in range(3):  # a burst: the first is told at once, the other two at the end of it
            timeout._report()
        told = [r.getMessage() for r in caplog.records]
        # Waited for, not slept on: a loaded machine can stall a sleep past the interval.
        async with asyncio.timeout(10):
            while len(caplog.records) < 2:
                await asyncio.sleep(0.01)
        return told, timeout

    with caplog.at_level("WARNING", logger="router.http"):
        told_during_the_burst, timeout = asyncio.run(drops())
    told = [r.getMessage() for r in caplog.records]
    assert [m.split(" ")[0] for m in told_during_the_burst] == ["1"]
    assert [m.split(" ")[0] for m in told] == ["1", "2"]
    first, second = caplog.records
    # (call_later may fire up to the loop's clock resolution early)
    assert second.created - first.created >= http.DROP_REPORT_S - 0.01
    assert timeout._pending is None  # nothing more to tell after the burst


@pytest.mark.parametrize(("size", "more", "flags"), [
    (2 * http.SEND_PIECE, False, [True, False]), (2 * http.SEND_PIECE + 1, False,
                                                  [True, True, False]),
    (2 * http.SEND_PIECE, True, [True, True])])
def test_only_the_last_piece_of_an_answers_end_ends_it(
        size: int, more: bool, flags: list[bool]) -> None:
    sent: list[dict] = []

    async def recorded(message) -> None:
        sent.append(message)

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * size, "more_body": more})

    asyncio.run(http.SendTimeout(app)({"type": "http"}, None, recorded))  # type: ignore[arg-type]
    assert [m.get("more_body", False) for m in sent[1:]] == flags

