"""The benchmark's method: what the baseline is given, and when a measured row may back a claim."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench import run, workloads
from bench.figures import gpu_verdict, incomplete
from bench.loadgen import LoadResult


def test_the_baseline_encodes_with_the_batch_the_table_names(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        spec, out = Path(cmd[-2]), Path(cmd[-1])
        seen.update(json.loads(spec.read_text()))
        out.write_text(json.dumps({"corpus_s": 1.0, "corpus_texts": 1, "corpus_tokens": 20,
                                   "query_latencies_s": [0.01], "torch_version": "t",
                                   "torch_threads": 1, "st_version": "s"}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(run.subprocess, "run", fake_run)
    corpus = workloads.Texts(texts=["a text"], tokens=[20])
    run.run_baseline("model", "cpu", "float32", corpus, ["q"], batch_size=64)
    assert seen["batch_size"] == 64  # the row says "SentenceTransformer.encode (batch 64)"


def _load(answered: int, errors: dict[str, int] | None = None) -> LoadResult:
    return LoadResult(latencies_s=[0.001] * answered, errors=dict(errors or {}), start=0.0,
                      end=1.0)


def test_a_row_with_errors_or_unsent_requests_is_named_under_the_table() -> None:
    assert incomplete("queries at 1 in flight", _load(100), 100, 60) is None
    errors = incomplete("queries at 1 in flight", _load(98, {"HTTP 503": 2}), 100, 60)
    assert errors is not None and "98 of 100" in errors and "2 HTTP 503" in errors
    cut = incomplete("the HTTP corpus", _load(40), 100, 60)
    assert cut is not None and "40 of 100" in cut and "60 s" in cut


def test_a_target_is_not_met_by_a_workload_that_had_errors_or_was_cut() -> None:
    ours: dict[str, tuple[float, ...]] = {"corpus": (2.0e6,), "queries 1": (1.0e-3, 900.0)}
    assert "NOT met" not in gpu_verdict(ours, 1.0e5)
    verdict = gpu_verdict(ours, 1.0e5, incomplete={"corpus", "queries 1"})
    assert "met)" not in verdict.replace("NOT met", "")
    assert verdict.count("NOT met") == 3


def test_the_baseline_computes_in_the_dtype_the_server_chooses(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from shared import dtypes
    from shared.resolve import default_model_dir

    model = str(default_model_dir())
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert run.baseline_dtype("cpu", model) == "bfloat16"
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset({"avx2"}))
    assert run.baseline_dtype("cpu", model) == "float32"
    assert run.baseline_dtype("cuda:0", model) == "float16"
    assert run.parse_args(["--device", "cpu"]).baseline_dtype is None  # decided with the model
    # A --dtype the server is given is the baseline's too.
    assert run.baseline_dtype("cuda:0", model, ["--dtype=bfloat16"]) == "bfloat16"
    assert run.baseline_dtype("cpu", model, ["--port", "1", "--dtype", "float16"]) == "float16"


def test_a_short_latency_is_shown_to_a_hundredth_of_a_millisecond() -> None:
    from bench.report import ms

    assert ms(0.00246) == "2.46"  # against a 2.5 ms target, "2.5" would say nothing
    assert ms(0.1467) == "146.7"


def test_the_client_cpu_is_also_given_per_request() -> None:
    from bench.figures import cpu_text

    assert cpu_text(0.11, 2.5, 1000) == "0.11 s = 4.40% of a core, 110 us/request"
    assert cpu_text(0.0, 1.0, 0) == "0.00 s = 0.00% of a core"
