"""A tiny GTE served by the real `embedserve`: /embed equals SentenceTransformer on the same
directory (transformers' native gte, CLS pooling, Normalize)."""

from __future__ import annotations

import numpy as np

from tests.e2e.zoo import embed, sentence_transformer, serve_model
from tests.fixtures.oracles import cosine_rows
from tests.fixtures.rotary import add_sentence_transformers, save_model, tiny_model

TEXTS = ["hello world", "the weather is lovely today", "a cat", "query: dog at night " * 5]


def test_embed_matches_sentence_transformers(tmp_path) -> None:
    model = tiny_model("GteModel", seed=12, type_vocab_size=2)
    root = add_sentence_transformers(save_model(model, tmp_path / "gte"), "cls")
    theirs = sentence_transformer(root).encode(TEXTS)
    with serve_model(root, tmp_path) as srv:
        ours = embed(srv, inputs=TEXTS)
        info = srv.client.get("/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "cls"}}
    assert ours.shape == theirs.shape == (len(TEXTS), 32)
    assert cosine_rows(ours, theirs).min() >= 0.9999
    assert np.abs(ours - theirs).max() < 1e-5
