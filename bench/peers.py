"""Other servers started, measured under the same load as embedserve, and stopped, where
installable.

Infinity (michaelfeil/infinity, `infinity_emb` on PyPI) is the one installable here: its pins
(numpy < 2, sentence-transformers < 4) clash with ours, so it lives in a venv of its own and the
harness is given its executable (`--infinity PATH`). TEI ships as a Rust binary or a container,
neither of which the development machine can fetch.

Infinity is run as its users run it: `infinity_emb v2` with its defaults (torch engine, dtype
auto: float32 on a CPU) on the same model directory, device and batch size, answering the
OpenAI-shaped `POST /embeddings` (bench.run) or the Cohere-shaped `POST /rerank` (bench.rerank)
that the workloads are rewritten into.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from bench.baseline import BaselineResult, RerankBaselineResult
from bench.figures import (
    cores,
    corpus_figures,
    cpu_text,
    errors_text,
    incomplete,
    query_figures,
    rerank_latency_figures,
    rerank_throughput_figures,
    versus_peer,
    versus_peer_rerank,
)
from bench.loadgen import LoadResult, Request, build_request, percentile, run_load
from bench.report import Row, ms, rate
from bench.server import ServerProcess, cpu_seconds, descendants, machine_busy_s

# The model name the workloads ask for (Infinity checks it against --served-model-name).
SERVED_NAME = "bench"


def openai_bodies(bodies: list[tuple[bytes, int, int]]) -> list[tuple[bytes, int, int]]:
    """TEI /embed bodies ({"inputs": [...]}) as OpenAI /embeddings bodies, same texts."""
    return [(json.dumps({"input": json.loads(body)["inputs"], "model": SERVED_NAME},
                        ensure_ascii=False).encode(), texts, tokens)
            for body, texts, tokens in bodies]


def rerank_bodies(bodies: list[tuple[bytes, int, int]]) -> list[tuple[bytes, int, int]]:
    """TEI /rerank bodies ({"query", "texts"}) as Infinity's (Cohere-shaped) /rerank bodies:
    the same query and documents, every document ranked, none returned."""
    def rewritten(body: bytes) -> bytes:
        tei = json.loads(body)
        return json.dumps({"query": tei["query"], "documents": tei["texts"],
                           "return_documents": False, "model": SERVED_NAME},
                          ensure_ascii=False).encode()

    return [(rewritten(body), texts, tokens) for body, texts, tokens in bodies]


class InfinityServer(ServerProcess):
    """`infinity_emb v2 --model-id M --device D --batch-size B` on a free loopback port."""

    name = "Infinity"
    path = "/embeddings"

    def __init__(self, executable: str, model_dir: str, device: str, batch_size: int) -> None:
        # No usage statistics from a benchmark run (the machine is offline anyway).
        super().__init__(
            lambda port: [executable, "v2", "--model-id", model_dir, "--served-model-name",
                          SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
                          "--device", device, "--batch-size", str(batch_size)],
            env={"INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"})

    def versions(self) -> str:
        """infinity_emb's and torch's versions, from the Python of its venv."""
        python = Path(self.args[0]).with_name("python")
        code = ("import importlib.metadata as m, torch; "
                "print(m.version('infinity_emb'), torch.__version__, torch.get_num_threads())")
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
        if out.returncode != 0:
            return "versions unknown"
        infinity, torch, threads = out.stdout.split()
        return f"infinity_emb {infinity}, torch {torch} ({threads} threads)"

    def cpu_s(self) -> float:
        """CPU seconds of the server and every process it started."""
        total = 0.0
        for pid in descendants(self.process.pid):
            with contextlib.suppress(OSError):  # exited while we looked
                total += cpu_seconds(pid)
        return total


def measured(name: str, measure: Callable[[], tuple[list[Row], list[str]]]
             ) -> tuple[list[Row], list[str]]:
    """`measure()`'s rows and notes of another server, or none and a note saying why it was not
    measured: embedserve's table is still worth printing and keeping."""
    try:
        return measure()
    except Exception as exc:
        said = " ".join(str(exc).split())  # one markdown line, its log tail included
        return [], [f"{name} not measured: {type(exc).__name__}: {said}"[:2000]]


def measure_infinity(model: str, corpus_bodies: list[tuple[bytes, int, int]],
                     query_bodies: list[tuple[bytes, int, int]], args: argparse.Namespace,
                     dim: int | None, base: BaselineResult,
                     ours: dict[str, tuple[float, ...]]) -> tuple[list[Row], list[str]]:
    """Infinity started, measured and stopped: its rows and notes, ratios to `ours` included."""
    peer = InfinityServer(args.infinity, model, args.device, args.batch)
    try:
        rows, facts, theirs = measure_peer(peer, corpus_bodies, query_bodies, args, dim, base)
    finally:
        peer.stop()
    return rows, [*facts, versus_peer(ours, theirs, peer.name)]


def _started(peer: InfinityServer) -> str:
    """Wait until `peer` is up; the fact naming it, how it was started and how long it took."""
    ready_s = peer.wait_healthy()
    print(f"{peer.name} up on :{peer.port} after {ready_s:.1f} s", flush=True)
    return (f"{peer.name}: {peer.versions()}, started as `{' '.join(peer.args[1:])}`; "
            f"ready after {ready_s:.1f} s")


def _load(peer: InfinityServer, requests: list[Request], conc: int, args: argparse.Namespace,
          dim: int | None = None, check_all: bool = False) -> tuple[LoadResult, float, float]:
    """One workload against `peer`: the load's result, the cores the peer used (all its
    processes) and the cores other processes used meanwhile."""
    cpu0, busy0 = peer.cpu_s(), machine_busy_s()
    res = run_load(peer.port, requests, conc, args.time_limit, dim, args.client_processes,
                   check_all)
    cpu, busy = peer.cpu_s() - cpu0, machine_busy_s() - busy0
    return res, cpu / res.wall_s, (busy - cpu - res.client_cpu_s) / res.wall_s


def _row(what: str, conc: int, res: LoadResult, throughput: str, versus: str, cpu: float,
         other: float) -> Row:
    return Row(what, str(conc), str(len(res.latencies_s)), errors_text(res), throughput,
               ms(percentile(res.latencies_s, 50)), ms(percentile(res.latencies_s, 99)), versus,
               cpu_text(res.client_cpu_s, res.wall_s, len(res.latencies_s)),
               f"{cpu:.2f} cores (all its processes)", "", cores(other))


def measure_peer(peer: InfinityServer, corpus_bodies: list[tuple[bytes, int, int]],
                 query_bodies: list[tuple[bytes, int, int]], args: argparse.Namespace,
                 dim: int | None, base: BaselineResult
                 ) -> tuple[list[Row], list[str], dict[str, tuple[float, ...]]]:
    """The HTTP workloads against another server: rows beside embedserve's, facts, and the
    numbers by workload (as `main` keeps embedserve's)."""
    started = _started(peer)
    corpus_reqs = [build_request(peer.port, peer.path, body, n, tok)
                   for body, n, tok in openai_bodies(corpus_bodies)]
    query_reqs = [build_request(peer.port, peer.path, body, n, tok)
                  for body, n, tok in openai_bodies(query_bodies)]
    run_load(peer.port, corpus_reqs[:2] + query_reqs[:20], 2, 60, dim)  # warm-up
    rows: list[Row] = []
    facts = [started]
    numbers: dict[str, tuple[float, ...]] = {}
    loads = [(f"{peer.name} corpus ({args.batch} texts/request)", corpus_reqs, args.concurrency),
             *((f"{peer.name} queries (1 text/request)", query_reqs, conc)
               for conc in args.query_concurrency)]
    for what, requests, conc in loads:
        print(f"{what}, {conc} in flight ...", flush=True)
        res, cpu, other = _load(peer, requests, conc, args, dim)
        problem = incomplete(f"{what} at {conc} in flight", res, len(requests),
                             args.time_limit)
        if problem is not None:
            facts.append(problem)
        if requests is corpus_reqs:
            tps, throughput, versus = corpus_figures(res, base)
            numbers["corpus"] = (tps,)
        else:
            p50, qps, versus = query_figures(res, base)
            numbers[f"queries {conc}"] = (p50, qps)
            throughput = rate(qps, "req/s")
        rows.append(_row(what, conc, res, throughput, versus, cpu, other))
    return rows, facts, numbers


def measure_infinity_rerank(model: str, bodies: list[tuple[bytes, int, int]],
                            args: argparse.Namespace, base: RerankBaselineResult,
                            ours: dict[str, float]) -> tuple[list[Row], list[str]]:
    """Infinity's /rerank under the two loads embedserve had: its rows, and notes with the
    ratios to `ours` (pairs/s "throughput"; one at a time, "p50" and "req/s")."""
    peer = InfinityServer(args.infinity, model, args.device, args.batch)
    try:
        started = _started(peer)
        requests = [build_request(peer.port, "/rerank", body, n, tok)
                    for body, n, tok in rerank_bodies(bodies)]
        run_load(peer.port, requests[:4], 2, 120, check_all=True)  # warm-up, not measured
        rows: list[Row] = []
        facts = [started]
        numbers: dict[str, float] = {}
        for reqs, conc in ((requests, args.concurrency), (requests[:args.latency_requests], 1)):
            print(f"{peer.name} rerank: {len(reqs)} requests, {conc} in flight ...", flush=True)
            res, cpu, other = _load(peer, reqs, conc, args, check_all=True)
            if conc == 1:
                numbers["p50"], numbers["req/s"], versus = rerank_latency_figures(res, base)
                throughput = rate(numbers["req/s"], "req/s")
            else:
                numbers["throughput"], throughput, versus = rerank_throughput_figures(res, base)
            problem = incomplete(f"{peer.name} /rerank at {conc} in flight", res, len(reqs),
                                 args.time_limit)
            if problem is not None:
                facts.append(problem)
            rows.append(_row(f"{peer.name} /rerank ({args.k} docs/request)", conc, res,
                             throughput, versus, cpu, other))
    finally:
        peer.stop()
    return rows, [*facts, versus_peer_rerank(ours, numbers, peer.name, args.concurrency)]
