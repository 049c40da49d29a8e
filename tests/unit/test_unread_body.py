"""An answer given before the request body was read whole (413 past --payload-limit, 415, 401)
while the client still uploads: the connection must still be closed, on hypercorn as the router
serves it (router/http_server.py, UnreadBody)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading

import pytest

from tests.fixtures.hypercorn import served

# 300 chunks of 10 kB: far more than hypercorn's queue of 10 body messages to the app holds.
CHUNKS = [b"x" * 10_000] * 300
WIRE = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in CHUNKS) + b"0\r\n\r\n"


def early_answer(pieces_read: int):
    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        for _ in range(pieces_read):
            await receive()
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
