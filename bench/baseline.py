"""The baseline: `SentenceTransformer.encode` in-process on the same model, device and texts, or
for the re-rank benchmark (bench/rerank.py) `CrossEncoder.predict` on the same pairs.

Run as its own process (`python -m bench.baseline IN.json OUT.json`) by bench/run.py, before the
server starts: the two never share the cores, and the harness process never imports torch, so
no model, CUDA context or idle thread pool of the baseline lingers while the server is measured.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.loadgen import percentile


@dataclass(frozen=True, kw_only=True)
class _Timed:
    """What both baselines time one query at a time, and what they ran on."""

    query_latencies_s: list[float]
    torch_version: str
    torch_threads: int
    st_version: str

    @property
    def query_p50_s(self) -> float:
        return percentile(self.query_latencies_s, 50)

    @property
    def queries_per_s(self) -> float:
        """One query after another: the rate a single caller gets."""
        return len(self.query_latencies_s) / sum(self.query_latencies_s)


@dataclass(frozen=True, kw_only=True)
class BaselineResult(_Timed):
    corpus_s: float
    corpus_texts: int
    corpus_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.corpus_tokens / self.corpus_s

    @property
    def texts_per_s(self) -> float:
        return self.corpus_texts / self.corpus_s


def measure(model_dir: str, device: str, corpus: list[str], corpus_tokens: int,
            queries: list[str], batch_size: int = 32, dtype: str = "float32") -> BaselineResult:
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device=device)
    # Cast after loading (works on every sentence-transformers / transformers version): fp16 on
    # CUDA is how users run it there, and what embedserve serves by default.
    model.to(getattr(torch, dtype)).eval()

    def encode(texts: list[str] | str, bs: int) -> Any:
        # convert_to_numpy copies to host, which also waits for a CUDA device to finish.
        return model.encode(texts, batch_size=bs, convert_to_numpy=True,
                            show_progress_bar=False)

    # Warm-up: first calls pay for lazy initialisation (allocator, kernels, thread pool).
    encode(corpus[:batch_size], batch_size)
    for q in queries[:10]:
        encode(q, 1)

    t0 = time.perf_counter()
    encode(corpus, batch_size)
    corpus_s = time.perf_counter() - t0

    latencies = []
    for q in queries:
        t0 = time.perf_counter()
        encode(q, 1)
        latencies.append(time.perf_counter() - t0)

    return BaselineResult(
        corpus_s=corpus_s, corpus_texts=len(corpus), corpus_tokens=corpus_tokens,
        query_latencies_s=latencies, torch_version=torch.__version__,
        torch_threads=torch.get_num_threads(), st_version=sentence_transformers.__version__,
    )


@dataclass(frozen=True, kw_only=True)
class RerankBaselineResult(_Timed):
    """CrossEncoder.predict over every pair (throughput), then one query's k pairs per call."""

    all_s: float
    pairs: int
    tokens: int

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.all_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.all_s


def measure_rerank(model_dir: str, device: str, queries: list[str], documents: list[list[str]],
                   tokens: int, latency_queries: int, batch_size: int = 32,
                   dtype: str = "float32") -> RerankBaselineResult:
    import sentence_transformers
    import torch
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(model_dir, device=device)
    model.to(getattr(torch, dtype)).eval()  # as `measure` casts SentenceTransformer
    by_query = [[(q, d) for d in docs] for q, docs in zip(queries, documents, strict=True)]

    def predict(pairs: list[tuple[str, str]]) -> Any:
        return model.predict(pairs, batch_size=batch_size, convert_to_numpy=True,
                             show_progress_bar=False)

    for pairs in by_query[:3]:  # warm-up
        predict(pairs)
    every = [pair for pairs in by_query for pair in pairs]
    t0 = time.perf_counter()
    predict(every)
    all_s = time.perf_counter() - t0
    latencies = []
    for pairs in by_query[:latency_queries]:
        t0 = time.perf_counter()
        predict(pairs)
        latencies.append(time.perf_counter() - t0)
    return RerankBaselineResult(
        all_s=all_s, pairs=len(every), tokens=tokens, query_latencies_s=latencies,
        torch_version=torch.__version__, torch_threads=torch.get_num_threads(),
        st_version=sentence_transformers.__version__)


def main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    if spec.get("task") == "rerank":
        reranked = measure_rerank(spec["model_dir"], spec["device"], spec["queries"],
                                  spec["documents"], spec["tokens"], spec["latency_queries"],
                                  batch_size=spec["batch_size"], dtype=spec["dtype"])
        Path(argv[1]).write_text(json.dumps(asdict(reranked)))
        return
    result = measure(spec["model_dir"], spec["device"], spec["corpus"], spec["corpus_tokens"],
                     spec["queries"], batch_size=spec.get("batch_size", 32),
                     dtype=spec.get("dtype", "float32"))
    Path(argv[1]).write_text(json.dumps(asdict(result)))


def load(path: Path) -> BaselineResult:
    return BaselineResult(**json.loads(path.read_text()))


def load_rerank(path: Path) -> RerankBaselineResult:
    return RerankBaselineResult(**json.loads(path.read_text()))


if __name__ == "__main__":
    main(sys.argv[1:])
