"""A tiny Gemma 3 embedder (EmbeddingGemma's shape: bidirectional attention, local and global
layers, mean pooling, two bias-free identity Dense modules, a tokenizer that adds <bos> and
<eos>) served by the real `embedserve`: /embed equals sentence-transformers on the same files."""

from __future__ import annotations

import numpy as np
import pytest

from tests.e2e.server import serving
from tests.fixtures.decoders import make_embedding_gemma

TEXTS = [
    "hello world",
    "the weather is lovely today",
    "a cat",
    "a long passage about dogs at night, " * 12,  # longer than the model's 128 tokens
]

@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    model = make_embedding_gemma(tmp_path_factory.mktemp("zoo") / "gemma")
    log = tmp_path_factory.mktemp("logs") / "gemma.log"
    with serving("--model-id", str(model), "--max-batch-tokens", "1024", log_path=log) as srv:
        yield model, srv


def test_embed_equals_sentence_transformers(gemma) -> None:
    from sentence_transformers import SentenceTransformer

    model, srv = gemma
    response = srv.client.post("/embed", json={"inputs": TEXTS})
    assert response.status_code == 200, response.text
    ours = np.asarray(response.json(), dtype=np.float32)
    theirs = SentenceTransformer(str(model), device="cpu").encode(TEXTS)
    assert ours.shape == theirs.shape == (len(TEXTS), 24)
    cosine = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1)
                                       * np.linalg.norm(theirs, axis=1))
    assert cosine.min() >= 0.9999
    assert np.abs(ours - theirs).max() < 1e-4


def test_info_reports_mean_pooling_and_both_dense_modules(gemma) -> None:
    _, srv = gemma
    info = srv.client.get("/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["embedding_dimension"] == 24
    assert len(info["dense_modules"]) == 2
