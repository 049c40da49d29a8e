"""The serving engine under load: several workers, overload, disconnects, hung and dead workers."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import httpx
import msgspec
import pytest

from tests.e2e.server import Server, wait_for
from tests.e2e.test_embed_parity import LONG

SLOW = {"inputs": [f"{i} {LONG}" for i in range(64)]}  # 64 x 256 tokens: seconds on CPU


@pytest.fixture
def start(minilm_dir, tmp_path):
    servers: list[Server] = []

    def run(*args: str) -> Server:
        srv = Server("--model-id", str(minilm_dir), "--max-batch-tokens", "4096",
                     "--max-client-batch-size", "64", *args,
                     log_path=tmp_path / f"server{len(servers)}.log")
        servers.append(srv)
        return srv.wait_healthy()

    yield run
    for srv in servers:
        assert srv.stop() == 0, srv.log()


async def fire(url: str, bodies: list[dict], timeout: float = 120) -> list[tuple[int, float]]:
    """POST every body at once; (status, seconds) per request, in order."""
    async with httpx.AsyncClient(base_url=url, timeout=timeout,
                                 limits=httpx.Limits(max_connections=len(bodies))) as client:
        async def one(body: dict) -> tuple[int, float]:
            started = time.monotonic()
            response = await client.post("/embed", json=body)
            return response.status_code, time.monotonic() - started

        return await asyncio.gather(*(one(b) for b in bodies))


def test_two_workers_share_the_load(start):
    srv = start("--workers-per-device", "2")
    info = srv.client.get("/info").json()
    assert [w["state"] for w in info["workers"]] == ["ready", "ready"]
    assert len({w["pid"] for w in info["workers"]}) == 2
    bodies = [{"inputs": [f"{i} {LONG}"] * 16} for i in range(8)]
    results = asyncio.run(fire(srv.url, bodies))
    assert [status for status, _ in results] == [200] * 8
    batches = [w["batches"] for w in srv.client.get("/info").json()["workers"]]
    assert all(b > 0 for b in batches), batches


async def reaches(srv: Server, name: str, value: float) -> None:
    """Until /metrics shows `name` at `value` or more."""
    async with asyncio.timeout(60):
        while (await asyncio.to_thread(srv.metrics))[name] < value:
            await asyncio.sleep(0.02)


def test_overload_answers_429_at_once_and_recovers(start):
    srv = start("--max-concurrent-requests", "64")

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as patient:
            busy = asyncio.ensure_future(patient.post("/embed", json=SLOW))  # all 64 permits
            await reaches(srv, "te_request_input_length_count", 64)
            results = await fire(srv.url, [{"inputs": [f"{i} {LONG}"] * 4} for i in range(40)])
            statuses = [status for status, _ in results]
            assert statuses == [429] * 40, statuses
            # "At once" as an order of events, not a time (a loaded machine takes a second to
            # answer 40 connections): every refusal came back while the permits were still
            # held, so none waited for them.
            assert not busy.done(), "the busy request ended first: make it longer"
            assert (await busy).status_code == 200

    asyncio.run(scenario())
    assert srv.client.get("/health").status_code == 200
    assert srv.client.post("/embed", json={"inputs": ["x"] * 8}).status_code == 200
    # Counted: a refused request costs no inference.
    assert srv.metrics()["te_batch_next_size_sum"] == 64 + 8


def test_a_client_that_disconnects_costs_no_inference(start):
    # Permits: 256 for the requests that keep the worker busy, 256 for the 4 that give up.
    srv = start("--max-concurrent-requests", "512")

    queued = "te_request_input_length_count"  # inputs tokenized and put in the queue
    dropped = 'te_request_failure{err="dropped"}'
    batched = "te_batch_next_size_sum"  # inputs sent to a worker

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120,
                                     limits=httpx.Limits(max_connections=8)) as patient:
            # 16 batches of 4,096 tokens (seconds on CPU), all in the queue before the requests
            # that give up: those wait behind them, so none of theirs is in a batch yet when
            # their clients leave, however fast this machine computes.
            busy = asyncio.gather(*(patient.post("/embed", json=SLOW) for _ in range(4)))
            await reaches(srv, queued, 256)
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as impatient:
                gone = [asyncio.ensure_future(impatient.post("/embed", json=SLOW))
                        for _ in range(4)]
                await reaches(srv, queued, 512)
                for request in gone:
                    request.cancel()
                await asyncio.gather(*gone, return_exceptions=True)
            # (leaving the block closed their connections)
            await reaches(srv, dropped, 4)
            assert not busy.done(), "the busy requests ended first: make them longer"
            # While the busy ones hold their 256 permits, this fits only if the 4 x 64 of the
            # requests that gave up came back.
            response = await patient.post("/embed", json={"inputs": ["after"] * 64})
            assert response.status_code == 200, response.text
            assert [r.status_code for r in await busy] == [200] * 4

    asyncio.run(scenario())
    # Counted, not timed: whatever this machine's speed, not one of the 256 abandoned inputs
    # went to the worker.
    assert srv.metrics()[batched] == 256 + 64


class H2Client:
    """HTTP/2 with prior knowledge (h2c, as hypercorn serves it on the same port) over one
    connection: streams sent, reset and answered at will, the socket read in the background."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.unsent: dict[int, bytes] = {}  # request bodies waiting for flow-control window
        self.status: dict[int, int] = {}
        self.body: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.closed: str | None = None  # why the connection ended, once it did
        self.pump = asyncio.ensure_future(self._read())

    def post(self, path: str, body: dict) -> int:
        stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream, [(":method", "POST"), (":path", path),
                                        (":scheme", "http"), (":authority", "embedserve"),
                                        ("content-type", "application/json")])
        self.unsent[stream], self.body[stream] = msgspec.json.encode(body), bytearray()
        self._send_bodies()
        return stream

    def reset(self, stream: int) -> None:
        self.conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
        self._flush()

    async def answer(self, stream: int) -> tuple[int, bytes]:
        async with asyncio.timeout(120):
            while stream not in self.ended:
                assert self.closed is None, self.closed
                await asyncio.sleep(0.02)
        return self.status[stream], bytes(self.body[stream])

    def _send_bodies(self) -> None:
        for stream, rest in list(self.unsent.items()):
            while rest and (size := min(len(rest), self.conn.local_flow_control_window(stream),
                                        self.conn.max_outbound_frame_size)):
                self.conn.send_data(stream, rest[:size])
                rest = rest[size:]
            self.unsent[stream] = rest
            if not rest:
                del self.unsent[stream]
                self.conn.end_stream(stream)
        self._flush()

    def _flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    async def _read(self) -> None:
        while data := await self.reader.read(1 << 16):
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    self.status[event.stream_id] = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    self.body[event.stream_id] += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                        event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    self.ended.add(event.stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    self.closed = f"stream {event.stream_id} reset by the server"
                elif isinstance(event, h2.events.ConnectionTerminated):
                    self.closed = f"connection terminated: {event}"
            self._send_bodies()
        self.closed = self.closed or "connection closed by the server"

    async def aclose(self) -> None:
        self.pump.cancel()
        self.writer.close()
        await asyncio.gather(self.pump, return_exceptions=True)


def test_an_http2_stream_reset_costs_no_inference_and_spares_its_connection(start):
    """Over HTTP/2 a client that gives up resets its stream (RST_STREAM) and keeps the
    connection, whose other streams go on: the reset request is cancelled as a disconnect over
    HTTP/1.1 is, and neither its neighbour nor the connection suffers from it."""
    srv = start("--max-concurrent-requests", "512")

    queued = "te_request_input_length_count"
    dropped = 'te_request_failure{err="dropped"}'
    batched = "te_batch_next_size_sum"
    alive = {"inputs": [f"alive {i} {LONG}" for i in range(16)]}

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120,
                                     limits=httpx.Limits(max_connections=8)) as patient:
            # 256 inputs of 256 tokens ahead of the streams: theirs wait behind them.
            busy = asyncio.gather(*(patient.post("/embed", json=SLOW) for _ in range(4)))
            await reaches(srv, queued, 256)
            client = H2Client(*await asyncio.open_connection("127.0.0.1", srv.port))
            try:
                gone = client.post("/embed", SLOW)
                kept = client.post("/embed", alive)
                await reaches(srv, queued, 256 + 64 + 16)
                assert kept not in client.status  # still waiting when its neighbour goes
                client.reset(gone)
                await reaches(srv, dropped, 1)
                assert not busy.done(), "the busy requests ended first: make them longer"
                status, body = await client.answer(kept)
                assert status == 200, body
                assert len(msgspec.json.decode(body)) == 16
                # The connection lives on: a new stream on it is answered.
                status, body = await client.answer(client.post("/embed", {"inputs": "after"}))
                assert status == 200, body
                assert client.closed is None, client.closed
            finally:
                await client.aclose()
            assert [r.status_code for r in await busy] == [200] * 4

    asyncio.run(scenario())
    # Counted, not timed: not one of the reset stream's 64 inputs went to the worker.
    assert srv.metrics()[batched] == 256 + 16 + 1
    assert srv.metrics()[dropped] == 1
    assert "Traceback" not in srv.log(), srv.log()


def test_sigkill_of_one_of_two_workers_under_load(start):
    srv = start("--workers-per-device", "2")
    [first, _] = srv.client.get("/info").json()["workers"]
    victim = first["pid"]
    computing = f'te_worker_in_flight{{worker="{first["id"]}"}}'

    def busy() -> bool:
        return srv.metrics()[computing] > 0

    async def scenario() -> list[tuple[int, float]]:
        load = asyncio.ensure_future(fire(srv.url, [{"inputs": [f"{i} {LONG}"] * 16}
                                                    for i in range(12)]))
        # Killed with batches in it (a fixed sleep may kill it idle on a loaded machine).
        async with asyncio.timeout(60):
            while not await asyncio.to_thread(busy):
                await asyncio.sleep(0.02)
        os.kill(victim, signal.SIGKILL)
        return await load

    statuses = [status for status, _ in asyncio.run(scenario())]
    assert set(statuses) <= {200, 424, 503}, statuses
    assert 200 in statuses
    wait_for(lambda: srv.client.get("/health").status_code == 200, timeout=60)
    info = srv.client.get("/info").json()
    assert victim not in [w["pid"] for w in info["workers"]]
    assert sum(w["restarts"] for w in info["workers"]) == 1
    assert srv.client.post("/embed", json={"inputs": "back"}).status_code == 200


def test_a_hung_worker_is_detected_killed_and_replaced(start):
    # A small batch budget keeps the warm-up short, so the silence limit (the largest of
    # --worker-timeout, 10x the warm-up batch and two heartbeats) stays far below the default
    # 30 s.
    srv = start("--worker-timeout", "1.5", "--max-batch-tokens", "512")
    [warmup_ms] = map(float, re.findall(r"warm-up with 512 tokens took (\d+) ms", srv.log()))
    limit = max(1.5, 10 * warmup_ms / 1e3, 2.0)
    [pid] = srv.worker_pids()
    os.kill(pid, signal.SIGSTOP)  # alive but silent: only the heartbeat can tell
    started = time.monotonic()
    response = srv.client.post("/embed", json={"inputs": "anyone there?"})
    assert response.status_code == 424, response.text
    assert "hung" in response.json()["error"]
    # Killed once silent past the limit (the router checks 4x a second; the second of margin
    # is for a busy machine), not at some later time-out.
    assert time.monotonic() - started < limit + 2, limit
    wait_for(lambda: srv.client.get("/health").status_code == 200, timeout=60)
    assert srv.worker_pids() != [pid]
    assert srv.client.post("/embed", json={"inputs": "better"}).status_code == 200


def test_vertex_over_the_permits_is_429_and_costs_nothing_after(start):
    srv = start("--max-concurrent-requests", "64")
    instances = [{"inputs": [f"{i} {LONG}"] * 32} for i in range(3)]  # 96 inputs > 64 permits
    started = time.monotonic()
    refused = srv.client.post("/vertex", json={"instances": instances})
    assert refused.status_code == 429 and time.monotonic() - started < 1.0
    # The instances that did get permits were cancelled with the request: the worker saw at
    # most the two batches it may hold (16 inputs of 256 tokens each), then only this one.
    # Counted, not timed: two batches on a busy machine take seconds.
    assert srv.client.post("/embed", json={"inputs": ["x"] * 64}).status_code == 200
    batched = srv.metrics()["te_batch_next_size_sum"]
    assert batched <= 2 * 16 + 64, batched
