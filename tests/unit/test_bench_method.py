"""The benchmark's method: what the baseline is given, and when a measured row may back a claim."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench import run, workloads


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
