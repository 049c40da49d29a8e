"""A tiny NomicBERT served by the real `embedserve`: /embed equals SentenceTransformer on the
same directory (transformers' native nomic_bert, mean pooling, Normalize); and v2-moe's layout,
which neither transformers nor sentence-transformers can load, equals the engine in process
(itself checked against a float64 reference in tests/parity/test_nomic_bert.py)."""

from __future__ import annotations

import numpy as np

from backend_worker.engine import Engine
from shared.modelinfo import load_model_info
from tests.e2e.zoo import embed, sentence_transformer, serve_model
from tests.fixtures.oracles import cosine_rows
from tests.fixtures.rotary import (
    add_sentence_transformers,
    make_tiny_rotary,
    save_model,
    tiny_model,
)
from tests.fixtures.tiny import pack

TEXTS = ["hello world", "the weather is lovely today", "a cat", "query: dog at night " * 5]


def test_embed_matches_sentence_transformers(tmp_path) -> None:
    root = add_sentence_transformers(save_model(tiny_model("NomicBertModel", seed=11),
                                                tmp_path / "nomic"), "mean")
    theirs = sentence_transformer(root).encode(TEXTS)
    with serve_model(root, tmp_path) as srv:
        ours = embed(srv, inputs=TEXTS)
        info = srv.client.get("/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert ours.shape == theirs.shape == (len(TEXTS), 32)
    assert cosine_rows(ours, theirs).min() >= 0.9999
    assert np.abs(ours - theirs).max() < 1e-5


def test_mixture_of_experts_is_served(tmp_path) -> None:
    root = make_tiny_rotary(tmp_path / "moe", "nomic-moe", seed=12)
    expected = Engine.load(load_model_info(root)).embed(pack(root, TEXTS)[0])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    with serve_model(root, tmp_path) as srv:
        ours = embed(srv, inputs=TEXTS)
        one = embed(srv, inputs=TEXTS[1])
    assert ours.shape == (len(TEXTS), 32)
    assert np.abs(ours - expected).max() < 1e-5
    assert np.abs(one[0] - expected[1]).max() < 1e-5
