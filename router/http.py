"""HTTP plumbing shared by the routes: bounded JSON bodies, request ids, auth, timing headers."""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable
from typing import TypeVar

import msgspec
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.errors import error_response
from shared import logs
from shared.errors import EmbedServeError, ErrorType

T = TypeVar("T")
access_log = logging.getLogger("embedserve.access")
log = logging.getLogger(__name__)


# A high surrogate escape not followed by a low one, or a low one not preceded by a high one.
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")


# Seconds a request body may take to arrive: a 2 MB body over a slow (1 Mbit/s) link takes 16.
BODY_TIMEOUT_S = 60.0
# Seconds an answer may go without progress because its client does not read it: each piece of
# SEND_PIECE bytes must be taken within this (over a 1 Mbit/s link a piece takes 2 s); at the
# socket, data unacknowledged this long ends the connection (TCP_USER_TIMEOUT,
# router/http_server.py).
SEND_TIMEOUT_S = 60.0
SEND_PIECE = 256 * 1024
# Seconds between warnings of dropped answers: a client that reads nothing may send many requests.
DROP_REPORT_S = 60.0


async def read_json(request: Request, schema: type[T], limit: int) -> T:
    """Decode a JSON body into `schema`, refusing it past `limit` bytes without buffering it."""
    # TEI's rule (axum's Json): application/json, or a JSON-suffixed type (application/x+json).
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json" and not (
            content_type.startswith("application/") and content_type.endswith("+json")):
        raise EmbedServeError(ErrorType.UNSUPPORTED_MEDIA_TYPE,
                              "Expected request with `Content-Type: application/json`")
    refuse_content_coding(request.headers.get("content-encoding"))
    too_large = EmbedServeError(ErrorType.PAYLOAD_TOO_LARGE,
                                f"request body larger than the payload limit of {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        # hypercorn stops its keep-alive clock once the headers are in and has no read
        # timeout: a body that trickles in, or never ends, would hold its buffer (up to the
        # payload limit) and its connection for ever.
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_large
    except ClientDisconnect:
        raise ClientGone from None  # gone mid-upload: nobody to answer, nothing to log
    except TimeoutError:
        raise EmbedServeError(ErrorType.REQUEST_TIMEOUT, f"the request body did not arrive "
                              f"within {BODY_TIMEOUT_S:g} s") from None
    try:
        return msgspec.json.decode(body, type=schema)
    except msgspec.ValidationError as exc:
        raise EmbedServeError(
            ErrorType.VALIDATION,
            f"Failed to deserialize the JSON body into the target type: {exc}",
        ) from None
    except RecursionError:
        # msgspec's decoder recurses per nesting level: ~1,000 levels (2 KB of brackets) would
        # otherwise be a 500 with two tracebacks.
        raise EmbedServeError(ErrorType.BAD_REQUEST, "Failed to parse the request body as "
                              "JSON: nested too deeply") from None
    except msgspec.DecodeError as exc:
        # msgspec calls a lone UTF-16 surrogate escape ("\ud800") truncated input.
        reason = ("a \\u escape is a lone UTF-16 surrogate, which is no character"
                  if _LONE_SURROGATE.search(body) else str(exc))
        raise EmbedServeError(
            ErrorType.BAD_REQUEST, f"Failed to parse the request body as JSON: {reason}"
        ) from None


def refuse_content_coding(coding: str | None) -> None:
    """415 for a body in a content coding (gzip, br, ...): the server decodes none, and reading
    one as plain JSON would answer a compressed body "malformed JSON (byte 0)", or embed, as
    if uncompressed, a body whose header says otherwise (RFC 9110 8.4 names 415 for both)."""
    if coding is not None and coding.strip().lower() not in ("", "identity"):
        raise EmbedServeError(ErrorType.UNSUPPORTED_MEDIA_TYPE,
                              f"`Content-Encoding: {coding}` is not supported: send the "
                              "body uncompressed")


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it as soon as the client disconnects.

    Cancelling abandons the request's queue entries, which the batcher then drops unseen, and
    returns its permits: a client that gave up costs no inference.
    """
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.ensure_future(disconnected())
    try:
        # Awaited directly (not through asyncio.wait): the answer resumes this coroutine one
        # loop turn sooner. Cancelling us cancels `task` too.
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ClientGone from None  # the watcher cancelled the work, not our caller
        raise
    finally:
        watcher.cancel()


class SendTimeout:
    """Drop an answer its client stops taking: hypercorn has no write timeout, and a whole
    answer (a /tokenize answer can be 65 MB) would stay in memory for as long as the client
    keeps the connection open without reading, on HTTP/2 once per stream.

    The body goes to the server in pieces, each within SEND_TIMEOUT_S; past it the rest is
    dropped, so the app frees the answer and the server keeps at most a piece of it (on HTTP/1.1
    the socket's own timeout then ends the connection; on HTTP/2, where only the stream's flow
    control window is withheld, the connection lives on)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._dropped = 0
        self._reported = -math.inf
        self._pending: asyncio.TimerHandle | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        dropped = False
        # HTTP/2's: the client's disconnect. Once its connection is closed, hypercorn's sending
        # task has ended and a piece sent after would wait for SEND_TIMEOUT_S, held whole;
        # over HTTP/1.1 it is dropped at once. The app may have received it already (the 499
        # of work it cancelled); else it is watched for once the body goes (by then the upload
        # was read, or its time was up, as UnreadBody holds the head until then).
        left = asyncio.Event()
        watching: list[asyncio.Future] = []

        async def receiving() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                left.set()
            return message

        async def taken(piece: Message) -> bool:
            """Send `piece`; False where the client left first."""
            if scope.get("http_version") != "2":
                await send(piece)
                return True
            if not watching:
                watching.extend(asyncio.ensure_future(w) for w in (
                    _until_disconnect(receiving), left.wait()))
            sending = asyncio.ensure_future(send(piece))
            try:
                await asyncio.wait({sending, watching[1]}, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:  # (the timeout's cancellation)
                sending.cancel()
                raise
            if sending.done():
                sending.result()  # its failure, if any
                return True
            sending.cancel()
            return False

        async def send_in_pieces(message: Message) -> None:
            nonlocal dropped
            if dropped:
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            body = message.get("body", b"")
            more = message.get("more_body", False)
            # Cut as sent, not all at once: one answer is held once, plus a piece.
            for at in range(0, max(len(body), 1), SEND_PIECE):
                piece = message if len(body) <= SEND_PIECE else {
                    "type": "http.response.body", "body": body[at:at + SEND_PIECE],
                    "more_body": more or at + SEND_PIECE < len(body)}
                try:
                    async with asyncio.timeout(SEND_TIMEOUT_S):
                        if not await taken(piece):
                            dropped = True  # nobody to tell: the client left
                            return
                except TimeoutError:
                    dropped = True
                    self._report()
                    return

        try:
            await self.app(scope, receiving, send_in_pieces)
        finally:
            for watch in watching:
                watch.cancel()

    def _report(self) -> None:
        """Count a drop; warn now, or at the end of the quiet interval if a warning went out
        less than DROP_REPORT_S ago (so the last drops of a burst are told too)."""
        self._dropped += 1
        wait = self._reported + DROP_REPORT_S - time.monotonic()
        if wait <= 0:
            self._warn()
        elif self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(wait, self._warn)

    def _warn(self) -> None:
        self._pending = None
        log.warning("%d answer(s) dropped since the last such warning: their client took no "
                    "more of it for %g s", self._dropped, SEND_TIMEOUT_S)
        self._dropped, self._reported = 0, time.monotonic()


# Echoed and logged: a client's id is kept only when it is short visible ASCII (no control
# characters to forge log lines with, no 60 KB log lines).
_SAFE_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


def request_id_for(given: str) -> str:
    """A request's id: the client's (`x-request-id`, over HTTP or gRPC) when it is safe to echo
    and log, else a new one."""
    return given if _SAFE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


class RequestIdMiddleware:
    """Give every request an id (the client's `x-request-id`, else a new one), echo it, and
    put it on the log lines written for the request; at debug level, log each answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_for(Headers(scope=scope).get("x-request-id", ""))
        scope.setdefault("state", {})["request_id"] = request_id
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        token = logs.current_span.set(
            logs.LogSpan(f"{scope['method']} {scope['path']}", request_id))
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            access_log.debug("%s %s -> %d in %.1f ms", scope["method"], scope["path"], status,
                             (time.perf_counter() - started) * 1e3)
            logs.current_span.reset(token)


# Routes that answer without a key: probes, metrics and the API description.
OPEN_ROUTES = frozenset({"/health", "/ping", "/metrics", "/docs", "/openapi.json",
                         "/api-doc/openapi.json"})
# Swagger UI's static files: a browser loads them without the key, as it does /docs.
OPEN_PREFIX = "/docs/static/"


def is_open(method: str, path: str) -> bool:
    """Whether `method path` answers without an API key (the OpenAPI document uses this too)."""
    return (path in OPEN_ROUTES or path.startswith(OPEN_PREFIX)
            or (path == "/" and method in ("GET", "HEAD")))


def bearer_matches(given: bytes, key: bytes) -> bool:
    """Whether an `Authorization` value is `key` in the Bearer scheme. The scheme's name is
    case-insensitive and one or more spaces may follow it (RFC 9110 11.1, 11.4): "bearer KEY",
    as some clients send it, is the same credential as "Bearer KEY". The key itself is compared
    in constant time."""
    scheme, _, token = given.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.lstrip(b" "), key)


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on every route but the open ones (and `GET /`)."""

    def __init__(self, app: ASGIApp, api_key: str, open_probe: str | None = None) -> None:
        self.app = app
        self.key = api_key.encode()
        self.open_probe = open_probe  # a platform's own health route (Vertex AI's): GET only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and not is_open(scope["method"], scope["path"])
                and not (scope["method"] in ("GET", "HEAD") and scope["path"] == self.open_probe)):
            given = Headers(scope=scope).get("authorization", "").encode()
            if not bearer_matches(given, self.key):
                message = ("missing Authorization header" if not given
                           else "invalid API key in the Authorization header")
                response = error_response(EmbedServeError(ErrorType.UNAUTHORIZED, message),
                                          path=scope["path"], method=scope["method"])
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
