"""A bounded HTTP/1.1 keep-alive load generator that stays cheap next to the server it measures.

Raw asyncio streams (uvloop when installed) and request bytes encoded before the clock starts:
per request the client only writes bytes, reads a status line, headers and a body of known
length. Bodies are not JSON-decoded on the hot path; the first response of each connection is
checked for shape. Each process reports its own CPU time so a table can show the client was not
the bottleneck. Several processes split the connections when one core is not enough.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import time
from dataclasses import dataclass, field

# A request that takes this long counts as a timeout error; the run goes on.
REQUEST_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Request:
    """One pre-encoded HTTP request plus what it carries (for throughput accounting)."""

    raw: bytes
    texts: int
    tokens: int


@dataclass
class LoadResult:
    """What one or more client processes saw."""

    latencies_s: list[float] = field(default_factory=list)
    texts: int = 0
    tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0  # connections the server closed with `Connection: close`
    start: float = float("inf")  # time.monotonic(): one clock for every process on Linux
    end: float = 0.0
    client_cpu_s: float = 0.0

    @property
    def wall_s(self) -> float:
        return max(self.end - self.start, 1e-9)

    def merge(self, other: LoadResult) -> None:
        self.latencies_s += other.latencies_s
        self.texts += other.texts
        self.tokens += other.tokens
        self.reconnects += other.reconnects
        for key, n in other.errors.items():
            self.errors[key] = self.errors.get(key, 0) + n
        self.start = min(self.start, other.start)
        self.end = max(self.end, other.end)
        self.client_cpu_s += other.client_cpu_s


def build_request(port: int, path: str, body: bytes, texts: int, tokens: int) -> Request:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return Request(head.encode() + body, texts, tokens)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Status, body, and whether the server will close the connection after it."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = None
    chunked = close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"connection" and b"close" in value.lower():
            close = True
    if length is not None:
        return status, await reader.readexactly(length), close
    if not chunked:
        raise ValueError("response has neither Content-Length nor chunked encoding")
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, bytes(body), close
        body += chunk[:-2]


def _check_shape(body: bytes, texts: int, dim: int | None) -> str | None:
    vectors = json.loads(body)
    if isinstance(vectors, dict) and isinstance(vectors.get("data"), list):  # OpenAI's shape
        vectors = [item.get("embedding") for item in vectors["data"]]
    if isinstance(vectors, dict) and isinstance(vectors.get("results"), list):  # Cohere's ranks
        vectors = vectors["results"]
    if not isinstance(vectors, list) or len(vectors) != texts:
        return "wrong number of vectors"
    if vectors and isinstance(vectors[0], dict) and "index" in vectors[0]:  # /rerank's ranks
        if sorted(rank.get("index") for rank in vectors) != list(range(texts)):
            return "wrong rerank indices"
        return None
    if dim is not None and any(len(v) != dim for v in vectors):
        return "wrong dimension"
    return None


async def _connection(port: int, requests: list[Request], next_index: list[int],
                      deadline: float, dim: int | None, result: LoadResult,
                      check_all: bool) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    checked = False
    try:
        while next_index[0] < len(requests) and time.monotonic() < deadline:
            req = requests[next_index[0]]
            next_index[0] += 1
            t0 = time.perf_counter()
            try:
                writer.write(req.raw)
                status, body, close = await asyncio.wait_for(_read_response(reader),
                                                             REQUEST_TIMEOUT_S)
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
                # NOTE: after a timeout the connection still owes a late response, and a
                # dropped one is gone: count the error and go on over a fresh connection.
                key = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
                result.errors[key] = result.errors.get(key, 0) + 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            elapsed = time.perf_counter() - t0
            if close:
                # HTTP/1.1 lets a server end keep-alive after any response (hypercorn does
                # after 1000 requests on a connection); reconnecting is what clients do.
                result.reconnects += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if status != 200:
                key = f"HTTP {status}"
                result.errors[key] = result.errors.get(key, 0) + 1
                continue
            if check_all or not checked:
                checked = True
                problem = _check_shape(body, req.texts, dim)
                if problem:
                    result.errors[problem] = result.errors.get(problem, 0) + 1
                    continue
            result.latencies_s.append(elapsed)
            result.texts += req.texts
            result.tokens += req.tokens
    finally:
        writer.close()


async def _run(port: int, requests: list[Request], concurrency: int, time_limit_s: float,
               dim: int | None, check_all: bool = False) -> LoadResult:
    result = LoadResult()
    next_index = [0]  # shared by the tasks of this process; one event loop, no lock needed
    cpu0 = time.process_time()
    result.start = time.monotonic()
    deadline = result.start + time_limit_s
    tasks = [_connection(port, requests, next_index, deadline, dim, result, check_all)
             for _ in range(concurrency)]
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    result.end = time.monotonic()
    result.client_cpu_s = time.process_time() - cpu0
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            key = f"connection: {type(outcome).__name__}"
            result.errors[key] = result.errors.get(key, 0) + 1
    return result


def _run_in_process(args: tuple[int, list[Request], int, float, int | None, bool]
                    ) -> LoadResult:
    try:
        import uvloop  # the server's dependency; a cheaper event loop for the client too

        return uvloop.run(_run(*args))
    except ImportError:
        return asyncio.run(_run(*args))


def run_load(port: int, requests: list[Request], concurrency: int, time_limit_s: float,
             dim: int | None = None, processes: int = 1, check_all: bool = False) -> LoadResult:
    """Send `requests` over `concurrency` keep-alive connections; stop when all are answered
    or `time_limit_s` has passed (requests in flight then are still awaited). The first answer
    of each connection is checked for shape, or every answer with `check_all` (a JSON decode
    per answer: cheap next to a rerank of many pairs, not next to one short query)."""
    processes = max(1, min(processes, concurrency))
    if processes == 1:
        return _run_in_process((port, requests, concurrency, time_limit_s, dim, check_all))
    # Process i takes every processes-th request and its share of the connections.
    jobs = [(port, requests[i::processes], concurrency // processes
             + (1 if i < concurrency % processes else 0), time_limit_s, dim, check_all)
            for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        parts = pool.map(_run_in_process, jobs)
    merged = LoadResult()
    for part in parts:
        merged.merge(part)
    return merged


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]
