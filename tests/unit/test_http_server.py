"""router/http_server.py's pieces on their own: hypercorn's configuration, the close budget and
closed_within's wait, the handler of errors after a forced close, a port that cannot be bound,
the open-files limit, and UnreadBody's other scopes (mutation testing, round 8)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket

import pytest

from router import cli, http_server
from shared.errors import ConfigError


def _config(*args: str):
    return cli.parse_config(["--port", "0", *args])


def test_hypercorn_is_configured_as_tei_serves() -> None:
    hyper = http_server.hypercorn_config(_config("--hostname", "::1"), 8080)
    assert hyper.bind == ["[::1]:8080"]
    assert hyper.accesslog is None
    assert hyper.keep_alive_max_requests == 2**31
    assert hyper.include_server_header is False
    assert http_server.hypercorn_config(_config("--hostname", "0.0.0.0"), 80).bind == [
        "0.0.0.0:80"]


@pytest.mark.parametrize(("grace", "timeout"), [("0.2", 1.0), ("30", 30.0)])
def test_hypercorns_own_wait_is_never_shorter_than_the_close_budget(
        grace: str, timeout: float) -> None:
    hyper = http_server.hypercorn_config(_config("--shutdown-grace", grace), 80)
    assert hyper.graceful_timeout == timeout


def test_the_close_budget_is_what_the_drain_left_and_at_least_close_min_s() -> None:
    async def main() -> tuple[float, float, float]:
        now = asyncio.get_running_loop().time()
        return (http_server.close_budget(None, 7.0), http_server.close_budget(now + 60.0, 7.0),
                http_server.close_budget(now - 5.0, 7.0))

    undrained, left, past = asyncio.run(main())
    assert undrained == 7.0
    assert 55.0 < left <= 60.0
    assert past == http_server.CLOSE_MIN_S == 1.0


class _Loop:
    def __init__(self) -> None:
        self.defaulted: list[dict] = []

    def default_exception_handler(self, context: dict) -> None:
        self.defaulted.append(context)


@pytest.mark.parametrize(("exc", "defaulted"), [
    (asyncio.CancelledError(), False), (asyncio.InvalidStateError(), False),
    (http_server.LifespanFailureError("shutdown", "x"), False), (RuntimeError("bug"), True)])
def test_after_a_forced_close_only_the_expected_errors_are_quiet(
        exc: BaseException, defaulted: bool) -> None:
    loop = _Loop()
    http_server._after_forced_close(loop, {"message": "m", "exception": exc})  # type: ignore[arg-type]
    assert bool(loop.defaulted) is defaulted


async def _closed(serving_coro, drain_after: float, budget: float) -> tuple[asyncio.Task, object]:
    serving = asyncio.ensure_future(serving_coro)
    drained = asyncio.Event()
    asyncio.get_running_loop().call_later(drain_after, drained.set)
    await http_server.closed_within(serving, drained, lambda: budget)
    return serving, asyncio.get_running_loop().get_exception_handler()


def test_a_server_closing_within_the_budget_is_waited_for() -> None:
    async def serving() -> str:
        await asyncio.sleep(0.3)
        return "closed"

    task, handler = asyncio.run(_closed(serving(), 0.0, 30.0))
    assert (task.result(), handler) == ("closed", None)


def test_a_server_past_the_budget_is_cancelled_however_often_it_absorbs_a_cancel() -> None:
    async def serving() -> None:
        for _ in range(2):  # (as hypercorn's task group absorbs a first cancel)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(60)
        await asyncio.sleep(60)

    task, handler = asyncio.run(asyncio.wait_for(_closed(serving(), 0.0, 0.1), 10))
    assert task.cancelled()
    assert handler is http_server._after_forced_close


def test_the_servers_own_failure_is_raised() -> None:
    async def serving() -> None:
        raise OSError("hypercorn failed")

    with pytest.raises(OSError) as raised:
        asyncio.run(_closed(serving(), 60.0, 1.0))
    assert str(raised.value) == "hypercorn failed"


def test_a_cancelled_wait_cancels_the_server() -> None:
    async def main() -> bool:
        serving = asyncio.ensure_future(asyncio.sleep(60))
        waiting = asyncio.ensure_future(
            http_server.closed_within(serving, asyncio.Event(), lambda: 1.0))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.sleep(0)
        return serving.cancelled()

    assert asyncio.run(main())


def test_a_port_taken_fails_the_start_naming_the_flag() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        hyper = http_server.hypercorn_config(_config("--hostname", "127.0.0.1"), port)
        with pytest.raises(ConfigError) as raised:
            http_server.bind(hyper, "--port")
    assert str(raised.value) == f"--port 127.0.0.1:{port}: Address already in use"


def test_a_hostname_nothing_resolves_fails_the_start_naming_that_flag() -> None:
    hyper = http_server.hypercorn_config(_config("--hostname", "no-such-host.invalid"), 3000)
    with pytest.raises(ConfigError, match=r"^--hostname no-such-host\.invalid:3000: "):
        http_server.bind(hyper, "--port")


@pytest.mark.parametrize(("limits", "raised_to"), [
    ((1024, 4096), (4096, 4096)), ((resource.RLIM_INFINITY, 4096), None),
    ((4096, 4096), None)])
def test_the_open_files_soft_limit_rises_to_a_higher_hard_one_only(
        monkeypatch: pytest.MonkeyPatch, limits: tuple[int, int],
        raised_to: tuple[int, int] | None) -> None:
    set_to: list[tuple[int, int]] = []
    monkeypatch.setattr(http_server.resource, "getrlimit", lambda which: limits)
    monkeypatch.setattr(http_server.resource, "setrlimit",
                        lambda which, to: set_to.append(to))
    http_server.raise_open_files_limit()
    assert set_to == ([raised_to] if raised_to else [])


def test_unread_body_passes_other_scopes_through() -> None:
    seen: list = []

    async def app(scope, receive, send) -> None:
        seen.append((receive, send))

    async def receive() -> dict:
        return {"type": "lifespan.startup"}

    async def send(message) -> None:
        pass

    asyncio.run(http_server.UnreadBody(app)({"type": "lifespan"}, receive, send))
    assert seen == [(receive, send)]


def test_a_forced_close_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    async def serving() -> None:
        await asyncio.sleep(60)

    with caplog.at_level(logging.WARNING, "embedserve"):
        asyncio.run(asyncio.wait_for(_closed(serving(), 0.0, 0.1), 10))
    assert [r.getMessage() for r in caplog.records] == [
        "connections still open 0.1 s after the drain: closing them"]


@pytest.mark.parametrize(("http_version", "pieces", "drops"), [
    ("1.1", 1, 1), ("2", 1, 0), ("1.1", 2, 1)])
def test_an_upload_unread_past_its_deadline_is_dropped_until_disconnect_on_http1_only(
        monkeypatch: pytest.MonkeyPatch, http_version: str, pieces: int, drops: int) -> None:
    """The answer's last piece goes once the upload's deadline passed; over HTTP/1.1 one task
    of its own (held by UnreadBody) reads on until the client's disconnect, over HTTP/2 none
    does."""
    monkeypatch.setattr(http_server, "BODY_TIMEOUT_S", 0.1)
    sent: list[str] = []
    disconnected = asyncio.Event()

    async def app(scope, receive, send) -> None:
        await receive()  # a first piece of the upload, then an early answer
        await send({"type": "http.response.start", "status": 413, "headers": []})
        for more in range(pieces - 1, -1, -1):
            await send({"type": "http.response.body", "body": b"{}", "more_body": bool(more)})

    async def receive() -> dict:
        if disconnected.is_set():
            return {"type": "http.disconnect"}
        await asyncio.sleep(0.01)
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def send(message) -> None:
        sent.append(message["type"])

    async def main() -> tuple[int, int]:
        unread = http_server.UnreadBody(app)
        await unread({"type": "http", "http_version": http_version}, receive, send)
        dropping = len(unread._draining)
        disconnected.set()
        await asyncio.sleep(0.05)
        return dropping, len(unread._draining)

    assert asyncio.run(asyncio.wait_for(main(), 10)) == (drops, 0)
    assert sent == ["http.response.start"] + ["http.response.body"] * pieces
