"""What a measured workload becomes in the results table: the cells of its row (throughput,
CPU, the server's stage times, errors) and the judgements written under the table (against a
peer server, against issue 6's GPU targets)."""

from __future__ import annotations

from bench.baseline import BaselineResult, RerankBaselineResult
from bench.loadgen import LoadResult, percentile
from bench.report import rate
from bench.server import CpuSnapshot, StageSnapshot


def cpu_text(seconds: float, wall: float, requests: int) -> str:
    """The client's CPU, also per answered request: at 1 in flight, the most of a request's
    latency that was the client's own work."""
    per = f", {1e6 * seconds / requests:.0f} us/request" if requests else ""
    return f"{seconds:.2f} s = {100 * seconds / wall:.2f}% of a core{per}"


def cpu_split(cpu: CpuSnapshot, wall: float) -> str:
    parts = (cpu.router_s, cpu.tokenizers_s, cpu.workers_s)
    return " / ".join(f"{max(s, 0.0) / wall:.2f}" for s in parts) + " cores"


def stages_text(stages: StageSnapshot) -> str:
    """Where a request's time went inside the server, from its /metrics (means, ms)."""
    def mean(stage: str) -> str:
        value = stages.mean_ms(stage)
        return "n/a" if value is None else f"{value:.2f}"

    return (f"{mean('total')}: {mean('tokenize')} / {mean('queue')} / {mean('trip')}; "
            f"{mean('compute')}")


def errors_text(result: LoadResult) -> str:
    text = ", ".join(f"{n} {kind}" for kind, n in sorted(result.errors.items())) or "0"
    if result.reconnects:
        text += f" ({result.reconnects} server-closed keep-alive)"
    return text


def corpus_figures(res: LoadResult, base: BaselineResult) -> tuple[float, str, str]:
    """A corpus row's tokens/s, its throughput cell and its vs-baseline cell."""
    tps = res.tokens / res.wall_s
    return (tps, f"{rate(tps, 'tok/s')} ({rate(res.texts / res.wall_s, 'texts/s')})",
            f"{tps / base.tokens_per_s:.2f}x encode tok/s")


def query_figures(res: LoadResult, base: BaselineResult) -> tuple[float, float, str]:
    """A queries row's p50 (s), its requests/s and its vs-baseline cell."""
    p50, qps = percentile(res.latencies_s, 50), len(res.latencies_s) / res.wall_s
    return p50, qps, (f"p50 {p50 / base.query_p50_s:.2f}x, "
                      f"req/s {qps / base.queries_per_s:.2f}x encode")


def rerank_throughput_figures(res: LoadResult, base: RerankBaselineResult
                              ) -> tuple[float, str, str]:
    """A rerank throughput row's pairs/s, its throughput cell and its vs-baseline cell (pairs/s;
    the tokens are the same pairs', so the tokens/s ratio is the same number)."""
    pps = res.texts / res.wall_s
    return (pps, f"{rate(res.tokens / res.wall_s, 'tok/s')} ({rate(pps, 'pairs/s')})",
            f"{pps / base.pairs_per_s:.2f}x predict pairs/s")


def rerank_latency_figures(res: LoadResult, base: RerankBaselineResult
                           ) -> tuple[float, float, str]:
    """A one-rerank-at-a-time row's p50 (s), its requests/s and its vs-baseline cell."""
    p50, qps = percentile(res.latencies_s, 50), len(res.latencies_s) / res.wall_s
    return p50, qps, (f"p50 {p50 / base.query_p50_s:.2f}x, "
                      f"req/s {qps / base.queries_per_s:.2f}x predict")


def versus_peer(ours: dict[str, tuple[float, ...]], theirs: dict[str, tuple[float, ...]],
                name: str) -> str:
    """embedserve against another server, workload by workload, as ratios."""
    parts = []
    if "corpus" in ours and "corpus" in theirs:
        parts.append(f"corpus {ours['corpus'][0] / theirs['corpus'][0]:.2f}x the tokens/s")
    for key in ours:
        if key.startswith("queries ") and key in theirs:
            (p50, qps), (their_p50, their_qps) = ours[key], theirs[key]
            parts.append(f"queries at {key.split()[1]} in flight {qps / their_qps:.2f}x the "
                         f"req/s, p50 {p50 / their_p50:.2f}x")
    return f"embedserve against {name} under the same load: " + "; ".join(parts)


def versus_peer_rerank(ours: dict[str, float], theirs: dict[str, float], name: str,
                       conc: int) -> str:
    """embedserve's /rerank against another server's, as ratios."""
    return (f"embedserve against {name} under the same load: at {conc} in flight "
            f"{ours['throughput'] / theirs['throughput']:.2f}x the pairs/s; at 1 in flight "
            f"p50 {ours['p50'] / theirs['p50']:.2f}x, req/s {ours['req/s'] / theirs['req/s']:.2f}x")


# Issue 6's bar on one H100 (bge-base shape, U[16,512] corpus): HTTP corpus throughput, its
# ratio to SentenceTransformer.encode in the same run, one short query's p50 at 1 in flight.
GPU_TARGETS = {"corpus_tokens_per_s": 1.2e6, "corpus_vs_encode": 8.0, "query_p50_s": 2.5e-3}


def incomplete(what: str, res: LoadResult, sent: int, time_limit_s: float) -> str | None:
    """A note when a workload's figures are not those of the whole workload: some requests
    failed (a refused or dropped request is cheap or missing, and its latency is not in the
    percentiles) or the time limit stopped the sending; None when every request was answered."""
    answered = len(res.latencies_s)
    if answered >= sent and not res.errors:
        return None
    why = f"errors: {errors_text(res)}" if res.errors else f"stopped after {time_limit_s:.0f} s"
    return (f"{what}: only {answered} of {sent} requests answered 200 within {time_limit_s:.0f} s"
            f" ({why}): its figures are not a whole run and back no claim")


def gpu_verdict(ours: dict[str, tuple[float, ...]], base_tokens_per_s: float,
                incomplete: frozenset[str] | set[str] = frozenset()) -> str:
    """One line: each GPU target, the number measured and whether it is met; a workload in
    `incomplete` (errors, or cut by the time limit) meets none."""
    def judged(what: str, value: str, met: bool, key: str) -> str:
        if key in incomplete:
            return f"{what} {value} (NOT met: the run was incomplete)"
        return f"{what} {value} ({'met' if met else 'NOT met'})"

    parts = []
    if "corpus" in ours:
        tps = ours["corpus"][0]
        parts.append(judged("corpus", f"{tps / 1e6:.2f}M tok/s >= 1.2M",
                            tps >= GPU_TARGETS["corpus_tokens_per_s"], "corpus"))
        parts.append(judged("vs encode", f"{tps / base_tokens_per_s:.1f}x >= 8x",
                            tps / base_tokens_per_s >= GPU_TARGETS["corpus_vs_encode"],
                            "corpus"))
    if "queries 1" in ours:
        p50 = ours["queries 1"][0]
        parts.append(judged("one query p50", f"{p50 * 1e3:.2f} ms <= 2.5 ms",
                            p50 <= GPU_TARGETS["query_p50_s"], "queries 1"))
    return "issue 6 targets (they are set for one H100): " + "; ".join(parts)


def cores(value: float) -> str:
    return f"{max(value, 0.0):.2f} cores"
