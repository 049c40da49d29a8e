"""The serve-and-compare steps the model zoo's end-to-end tests share: a tiny model served by
the real `embedserve`, /embed read back as an array, and sentence-transformers on the same
directory as the oracle. Each test keeps its own inputs, shapes and tolerances."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from tests.e2e.server import Server, serving


@contextmanager
def serve_model(model: Path, log_dir: Path, max_batch_tokens: int = 512) -> Iterator[Server]:
    """`serving` with the model's directory, the token budget and a log in `log_dir`."""
    with serving("--model-id", str(model), "--max-batch-tokens", str(max_batch_tokens),
                 log_path=log_dir / "server.log") as srv:
        yield srv


def embed(srv: Server, dtype: Any = np.float32, **body: Any) -> np.ndarray:
    """POST /embed with `body`; the vectors as an array of `dtype` (the response must be 200)."""
    response = srv.client.post("/embed", json=body)
    assert response.status_code == 200, response.text
    return np.asarray(response.json(), dtype=dtype)


def sentence_transformer(model: Path) -> Any:
    """sentence-transformers' model on the same directory, on the CPU: the oracle."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model), device="cpu")


def cross_encoder(model: Path, pairs: list[tuple[str, str]], **kwargs: Any) -> np.ndarray:
    """CrossEncoder.predict on the same directory, on the CPU: the re-rankers' oracle."""
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(model), device="cpu").predict(pairs, **kwargs)


def rerank_scores(ranks: list[dict[str, Any]]) -> np.ndarray:
    """A /rerank answer's scores back in the order of its texts (the answer is by score)."""
    scores = np.zeros(len(ranks))
    for rank in ranks:
        scores[rank["index"]] = rank["score"]
    return scores
