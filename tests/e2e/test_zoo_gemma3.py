"""A tiny Gemma 3 embedder (EmbeddingGemma's shape: bidirectional attention, local and global
layers, mean pooling, two bias-free identity Dense modules, a tokenizer that adds <bos> and
<eos>) served by the real `embedserve`: /embed equals sentence-transformers on the same files."""

from __future__ import annotations

import numpy as np
import pytest

from tests.e2e.zoo import embed, sentence_transformer, serve_model
from tests.fixtures.decoders import make_embedding_gemma
from tests.fixtures.oracles import cosine_rows

TEXTS = [
    "hello world",
    "the weather is lovely today",
    "a cat",
    "a long passage about dogs at night, " * 12,  # longer than the model's 128 tokens
]

@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    model = make_embedding_gemma(tmp_path_factory.mktemp("zoo") / "gemma")
    with serve_model(model, tmp_path_factory.mktemp("logs"), 1024) as srv:
        yield model, srv


def test_embed_equals_sentence_transformers(gemma) -> None:
    model, srv = gemma
    ours = embed(srv, inputs=TEXTS)
    theirs = sentence_transformer(model).encode(TEXTS)
    assert ours.shape == theirs.shape == (len(TEXTS), 24)
    assert cosine_rows(ours, theirs).min() >= 0.9999
    assert np.abs(ours - theirs).max() < 1e-4


def test_info_reports_mean_pooling_and_both_dense_modules(gemma) -> None:
    _, srv = gemma
    info = srv.client.get("/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["embedding_dimension"] == 24
    assert len(info["dense_modules"]) == 2
