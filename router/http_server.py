"""hypercorn as the router runs it: its configuration, the listening sockets bound up front,
an app served on them, and the close that follows the drain. Also the open-files limit, which
bounds how many clients the sockets can take."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
from collections.abc import Awaitable, Callable

import h2.errors
import h2.events
import h2.exceptions
import hypercorn.protocol
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.utils import LifespanFailureError, wrap_app
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.http import BODY_TIMEOUT_S, SEND_TIMEOUT_S, SendTimeout
from shared.config import ServerConfig
from shared.errors import ConfigError

log = logging.getLogger("embedserve")


def hypercorn_config(config: ServerConfig, port: int) -> HypercornConfig:
    hyper = HypercornConfig()
    host = f"[{config.hostname}]" if ":" in config.hostname else config.hostname
    hyper.bind = [f"{host}:{port}"]
    hyper.accesslog = None
    hyper.errorlog = logging.getLogger("hypercorn.error")  # our handlers, not a second one
    # hypercorn's own wait for connections to close, from the drain's end: never shorter than
    # what closed_within gives them (close_budget), so closed_within, which warns and closes
    # by force, is what bounds the stop (hypercorn, after its wait, would return leaving them
    # open).
    hyper.graceful_timeout = max(config.shutdown_grace, CLOSE_MIN_S)
    # hypercorn closes a keep-alive connection after 1,000 requests by default; TEI does not,
    # and clients that reuse connections would see it as a dropped connection.
    hyper.keep_alive_max_requests = 2**31
    # TEI sends no `server` header: nothing to tell a scanner, one header less to write.
    hyper.include_server_header = False
    return hyper


class _H2Protocol(H2Protocol):
    """hypercorn's HTTP/2, but DATA for a stream already answered, which hypercorn forgets
    once answered, is dropped and the stream reset (NO_ERROR: stop sending, the answer is
    whole; RFC 9113 8.1), where hypercorn's reading raised a KeyError that ended the
    connection, with every other stream on it (behind a proxy, other clients' requests).
    UnreadBody reads an upload to its end before the answer, but only until its deadline: a
    stalled upload answered 408 that then resumed ended its connection so."""

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        for event in events:  # one by one: a stream is known once its headers are handled
            if (isinstance(event, h2.events.DataReceived)
                    and event.stream_id not in self.streams):
                # Its flow control given back, or the connection's window would shrink.
                self.connection.acknowledge_received_data(event.flow_controlled_length,
                                                          event.stream_id)
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self.connection.reset_stream(event.stream_id, h2.errors.ErrorCodes.NO_ERROR)
            else:
                await super()._handle_events([event])
        await self._flush()


# hypercorn makes its connections' protocol by this name (hypercorn.protocol.ProtocolWrapper).
hypercorn.protocol.H2Protocol = _H2Protocol  # type: ignore[misc]


async def serve_app(app: ASGIApp, hyper: HypercornConfig, sockets: Sockets,
                       shutdown_trigger: Callable[[], Awaitable[object]]) -> None:
    """hypercorn's `serve`, on sockets bound by `bind`, of `app` with bounded sends
    (SendTimeout) and unread bodies dropped (UnreadBody). In that order: UnreadBody's wait for
    an upload must not count against the answer's send timeout."""
    served = SendTimeout(UnreadBody(app))
    # hypercorn types ASGI scopes and events as TypedDicts, Starlette as plain mappings: the
    # same protocol, which the type checker cannot see.
    await worker_serve(wrap_app(served, hyper.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
                       hyper, sockets=sockets, shutdown_trigger=shutdown_trigger)


class UnreadBody:
    """Read, and drop, what is left of a request body the app answered without reading whole.

    hypercorn hands the body to the app through a queue of max_app_queue_size (10) messages,
    and puts the end of the request (`http.disconnect`) on that same queue from within the
    send of the answer's last piece. An answer given early (413 past --payload-limit, 415,
    401, 404) while the client still uploads leaves that queue full: the send waits for room
    that nobody makes, so the connection is never closed, its task and the queued body stay
    for ever, and a shutdown waits --shutdown-grace for it. Whether the queue is full by then
    depends on how far hypercorn's reading ran ahead of the app: a race, lost under load. On
    HTTP/2 that reading is the whole connection's: its other streams would stall as well."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._draining: set[asyncio.Task] = set()  # (a task needs a reference until it ends)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        read_whole = False
        deadline: float | None = None

        def body_deadline() -> float:
            # The upload's: BODY_TIMEOUT_S from the start of its reading, shared with the app's
            # own (read_json), whose 408 must not wait that long a second time.
            nonlocal deadline
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + BODY_TIMEOUT_S
            return deadline

        async def noting() -> Message:
            nonlocal read_whole
            body_deadline()
            message = await receive()
            read_whole = read_whole or message["type"] == "http.disconnect" or not message.get(
                "more_body", False)
            return message

        async def draining_first(message: Message) -> None:
            last = message["type"] == "http.response.body" and not message.get("more_body")
            # The head waits too: a head saying `connection: close` (413, 408) has h11 expect
            # nothing more from the client once the upload ends, so a next request already
            # sent behind it (pipelined, or sent before reading) is a protocol error, and
            # hypercorn ends the connection without the answer's body.
            if (last or message["type"] == "http.response.start") and not read_whole:
                # The upload is read to its end first. On HTTP/2 hypercorn forgets a stream
                # once it is answered, and a DATA frame for it after that ends the whole
                # connection (a KeyError in its reading), with every other stream on it. On
                # HTTP/1.1 hypercorn closes the connection once answered: with the upload
                # unread, the kernel resets it, and a client still sending (as clients do,
                # reading the answer after) loses the answer to ECONNRESET.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(body_deadline()):
                        while not read_whole:
                            await noting()
            if last and not read_whole and scope.get("http_version") != "2":
                # Until the end of the request: hypercorn's own reading may be queued behind
                # the disconnect, so the drain must outlive this send.
                task = asyncio.ensure_future(_drop_until_disconnect(receive))
                self._draining.add(task)
                task.add_done_callback(self._draining.discard)
            await send(message)

        await self.app(scope, noting, draining_first)


async def _drop_until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# After the drain, hypercorn gets at least this long to write the last answers and close.
CLOSE_MIN_S = 1.0


def close_budget(deadline: float | None, grace: float) -> float:
    """How long connections get to close once drained: what the drain left of the grace
    (`deadline`, the loop's time when it ends; all of it where nothing drained), not a second
    grace, but at least CLOSE_MIN_S to write the last answers."""
    left = grace if deadline is None else deadline - asyncio.get_running_loop().time()
    return max(left, CLOSE_MIN_S)


def _after_forced_close(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """Once connections were closed by force, their tasks and hypercorn's end cancelled (or in
    the InvalidStateError of a gather hypercorn no longer awaits, or its lifespan's failure to
    shut down): expected, not errors."""
    expected = (asyncio.CancelledError, asyncio.InvalidStateError, LifespanFailureError)
    if isinstance(context.get("exception"), expected):
        log.debug("after closing connections: %s", context.get("message"))
        return
    loop.default_exception_handler(context)


async def closed_within(serving: asyncio.Task, drained: asyncio.Event,
                        budget: Callable[[], float]) -> None:
    """Await the HTTP server; once drained, give it `budget()` seconds (close_budget) to close
    its connections, then cancel it. hypercorn waits for every open connection to close, so a
    client that never reads its answer (a write that never completes) would otherwise keep the
    process alive."""
    waiter = asyncio.ensure_future(drained.wait())
    try:
        await asyncio.wait({serving, waiter}, return_when=asyncio.FIRST_COMPLETED)
        seconds = budget()
        if not serving.done():
            await asyncio.wait({serving}, timeout=seconds)
        if not serving.done():
            log.warning("connections still open %g s after the drain: closing them", seconds)
            asyncio.get_running_loop().set_exception_handler(_after_forced_close)
            while not serving.done():  # hypercorn absorbs a first cancel in its task group
                serving.cancel()
                await asyncio.wait({serving}, timeout=0.1)
            return
    except BaseException:
        serving.cancel()
        raise
    finally:
        waiter.cancel()
    serving.result()  # hypercorn's own failure, if any


def bind(hyper: HypercornConfig, flag: str) -> Sockets:
    """The listening sockets, bound now: start-up fails at once, naming the flag, when the
    address cannot be bound (e.g. the port is taken; hypercorn itself finds out only after
    starting its lifespan task, which then outlives the failure and ends in a traceback at exit).

    Where the system has TCP_USER_TIMEOUT (Linux), connections inherit it: one whose client
    leaves sent data unacknowledged, or its receive window shut (it does not read), for
    SEND_TIMEOUT_S is ended by the kernel, and hypercorn's buffered answer with it. hypercorn has
    no write timeout: such a connection would otherwise hold its answer for ever."""
    try:
        sockets = hyper.create_sockets()
    except socket.gaierror as exc:  # the address is a name nothing resolves
        raise ConfigError(f"--hostname {hyper.bind[0]}: {exc.strerror or exc}") from None
    except OSError as exc:
        raise ConfigError(f"{flag} {hyper.bind[0]}: {exc.strerror or exc}") from None
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        for sock in sockets.insecure_sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                int(SEND_TIMEOUT_S * 1000))
    return sockets


def raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard one (as Go programs do; Rust's and
    Python's do not): every connection is a file, and past the soft limit (1024 under systemd)
    new clients are dropped at accept, with nothing logged."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # e.g. a hard limit of infinity the kernel refuses
        log.debug("open files: soft limit %d kept (%s)", soft, exc)
        return
    log.debug("open files: soft limit raised from %d to %d", soft, hard)
