"""An answer given before the request body was read whole (413 past --payload-limit, 415, 401)
while the client still uploads: the connection must still be closed, on hypercorn as the router
serves it (router/http_server.py, UnreadBody)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import h2.config
import h2.connection
import h2.events
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from router import http, http_server
from router.errors import handle_embedserve_error
from shared.errors import EmbedServeError
from tests.fixtures.hypercorn import served

# 300 chunks of 10 kB: far more than hypercorn's queue of 10 body messages to the app holds.
CHUNKS = [b"x" * 10_000] * 300
WIRE = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in CHUNKS) + b"0\r\n\r\n"


def json_reader(limit: int) -> Starlette:
    """POST /embed reading its JSON body (at most `limit` bytes) as the routes do, answering
    `{}`; refusals in the router's JSON error shape."""
    async def embed(request: Request) -> Response:
        await http.read_json(request, dict, limit)
        return Response(b"{}", media_type="application/json")

    return Starlette(routes=[Route("/embed", embed, methods=["POST"])],
                     exception_handlers={EmbedServeError: handle_embedserve_error})


def early_answer(pieces_read: int):
    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        for _ in range(pieces_read):
            if not (await receive()).get("more_body"):
                break
        # A slow answer: meanwhile hypercorn reads ahead and fills the app's queue.
        await asyncio.sleep(0.3)
        body = b'{"error":"too large"}'
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    return app


@pytest.mark.parametrize("pieces_read", [0, 2])
def test_an_answer_before_the_body_was_read_still_closes_the_connection(pieces_read) -> None:
    seen: dict[str, object] = {}

    def client(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /embed HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                         b"\r\ntransfer-encoding: chunked\r\n\r\n")
            uploading = threading.Thread(target=upload, args=(sock,), daemon=True)
            uploading.start()
            sock.settimeout(10)
            answer = b""
            try:
                while chunk := sock.recv(1 << 16):
                    answer += chunk
                seen["closed"] = True  # the server ended the connection
            except TimeoutError:
                seen["closed"] = False
            except ConnectionResetError:
                seen["closed"] = True  # (ended with the rest of the upload unread)
            seen["status"] = answer.split(b"\r\n", 1)[0]

    def upload(sock: socket.socket) -> None:
        # The server may close the connection with the body half read: expected.
        with contextlib.suppress(OSError):
            sock.sendall(WIRE)

    asyncio.run(served(early_answer(pieces_read), client))
    assert seen["status"] == b"HTTP/1.1 413 "
    assert seen["closed"], "the connection stayed open after the answer"


def test_a_client_that_uploads_its_whole_body_first_gets_the_early_answer() -> None:
    """As HTTP/1.1 clients do (httpx, requests): send the whole body, then read. Closing the
    connection with the upload unread made the kernel reset it: the client's send failed
    (EPIPE / ECONNRESET) and the 413 was lost."""
    seen: dict[str, object] = {}

    def client(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(10)
            chunks = CHUNKS * 10  # 30 MB: more than the sockets' buffers hold
            sock.sendall(b"POST /embed HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                         b"\r\ncontent-length: %d\r\n\r\n" % sum(map(len, chunks)))
            try:
                for chunk in chunks:
                    sock.sendall(chunk)
                seen["answer"] = sock.recv(1 << 16)
            except OSError as exc:
                seen["answer"] = repr(exc)

    asyncio.run(served(early_answer(0), client))
    assert str(seen["answer"]).startswith("b'HTTP/1.1 413 "), seen["answer"]


def test_over_http2_the_connection_goes_on_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """On HTTP/2 the queue that filled was the stream's, but the reading it stopped was the
    connection's: no other stream on it would be answered. And a client that uploads its
    whole body, as clients do, must not have its DATA end the connection once answered; nor
    may the wait for that upload count against the answer's send timeout (shortened here far
    below the upload's time), which would drop the answer."""
    monkeypatch.setattr(http, "SEND_TIMEOUT_S", 0.01)
    statuses: list[str] = []

    def client(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(10)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            headers = [(":method", "POST"), (":path", "/embed"), (":scheme", "http"),
                       (":authority", "x"), ("content-type", "application/json")]
            first = conn.get_next_available_stream_id()
            conn.send_headers(first, headers)
            sock.sendall(conn.data_to_send())
            body, ended, second = b"".join(CHUNKS) * 10, set(), None
            while second is None or second not in ended:
                # Upload as far as flow control lets us; a window that stays shut is fine.
                while body and (size := min(len(body), conn.local_flow_control_window(first),
                                            conn.max_outbound_frame_size)):
                    conn.send_data(first, body[:size], end_stream=size == len(body))
                    body = body[size:]
                sock.sendall(conn.data_to_send())
                try:
                    data = sock.recv(1 << 16)
                except TimeoutError:
                    statuses.append("timed out")
                    return
                if not data:
                    statuses.append("connection closed")
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        statuses.append(dict(event.headers)[b":status"].decode())
                    elif isinstance(event, h2.events.StreamEnded):
                        ended.add(event.stream_id)
                    elif isinstance(event, h2.events.StreamReset) and event.stream_id == first:
                        ended.add(first)
                if first in ended and not body and second is None:  # now another stream
                    second = conn.get_next_available_stream_id()
                    conn.send_headers(second, headers, end_stream=True)
                sock.sendall(conn.data_to_send())

    asyncio.run(served(early_answer(2), client))
    assert statuses == ["413", "413"]


def test_a_body_that_timed_out_is_answered_without_a_second_wait(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A body that stops arriving is a 408 once BODY_TIMEOUT_S has passed since its reading
    began (read_json): the wait for the rest of the upload before that answer must not start a
    second BODY_TIMEOUT_S (in production, the 408 came after 120 s)."""
    timeout = 1.0
    monkeypatch.setattr(http, "BODY_TIMEOUT_S", timeout)
    monkeypatch.setattr(http_server, "BODY_TIMEOUT_S", timeout)

    app = json_reader(1000)
    seen: dict[str, object] = {}

    def client(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(10)
            start = time.monotonic()
            sock.sendall(b"POST /embed HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                         b"\r\ncontent-length: 100\r\n\r\n{\"inputs\":")  # and no more
            answer = b""
            while not answer.endswith(b"}") and (chunk := sock.recv(1 << 16)):
                answer += chunk  # (its head goes out at once: the wait is before the body)
            seen["answer"], seen["after"] = answer, time.monotonic() - start

    asyncio.run(served(app, client))
    assert str(seen["answer"]).startswith("b'HTTP/1.1 408 "), seen["answer"]
    assert seen["after"] < 1.6 * timeout, seen["after"]


def test_a_refused_upload_followed_by_the_next_request_gets_its_whole_answer() -> None:
    """A 413 says `connection: close`. Its head, sent before the upload was read to its end,
    had h11 expect nothing more from the client once that upload ended: the next request
    already sent behind it (a pipelining client's; a keep-alive client's sent before reading)
    was a protocol error that ended the connection, and the 413's body with it."""
    app = json_reader(1000)
    seen: dict[str, bytes] = {}

    def client(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(10)
            body = b"x" * 5_000_000  # more than one read of the socket: answered mid-way
            sock.sendall(b"POST /embed HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                         b"\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
                         + b"GET /embed HTTP/1.1\r\nhost: x\r\n\r\n")
            answer = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(1 << 16):
                    answer += chunk
            seen["answer"] = answer

    asyncio.run(served(app, client))
    head, _, body = seen["answer"].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), seen["answer"]
    assert b"connection: close" in head
    assert body.startswith(b'{"error":"request body larger than the payload limit'), seen["answer"]


def test_over_http2_an_upload_resumed_past_its_deadline_leaves_the_connection_serving(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """UnreadBody reads an upload to its end before the answer, but only until the body's
    deadline: a stalled upload is answered 408, and hypercorn forgets the stream. DATA for it
    after that, the upload resuming, was a KeyError in hypercorn's reading that ended the
    connection, with every other stream on it (behind a proxy, other clients' requests)."""
    timeout = 0.5
    monkeypatch.setattr(http, "BODY_TIMEOUT_S", timeout)
    monkeypatch.setattr(http_server, "BODY_TIMEOUT_S", timeout)

    app = json_reader(100_000)
    statuses: dict[int, str] = {}

    def client(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(0.2)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            headers = [(":method", "POST"), (":path", "/embed"), (":scheme", "http"),
                       (":authority", "x"), ("content-type", "application/json")]

            def exchange(seconds: float) -> None:
                sock.sendall(conn.data_to_send())
                until = time.monotonic() + seconds
                while time.monotonic() < until and 3 not in statuses:
                    try:
                        data = sock.recv(1 << 16)
                    except TimeoutError:
                        continue
                    if not data:
                        statuses[0] = "connection closed"
                        return
                    for event in conn.receive_data(data):
                        if isinstance(event, h2.events.ResponseReceived):
                            statuses[event.stream_id] = dict(event.headers)[b":status"].decode()
                    sock.sendall(conn.data_to_send())

            conn.send_headers(1, headers)
            conn.send_data(1, b'{"inputs":')  # and then nothing, for longer than the deadline
            exchange(timeout * 3)
            conn.send_data(1, b'"a"}', end_stream=True)  # the upload resumes
            conn.send_headers(3, headers)  # and another request on the connection
            conn.send_data(3, b"{}", end_stream=True)
            exchange(5)

    asyncio.run(served(app, client))
    assert statuses == {1: "408", 3: "200"}
