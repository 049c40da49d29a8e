"""A tiny GTE served by the real `embedserve`: /embed equals SentenceTransformer on the same
directory (transformers' native gte, CLS pooling, Normalize)."""

from __future__ import annotations

import numpy as np

from tests.e2e.server import serving
from tests.fixtures.rotary import add_sentence_transformers, save_model, tiny_model

TEXTS = ["hello world", "the weather is lovely today", "a cat", "query: dog at night " * 5]


def test_embed_matches_sentence_transformers(tmp_path) -> None:
    from sentence_transformers import SentenceTransformer

    model = tiny_model("GteModel", seed=12, type_vocab_size=2)
    root = add_sentence_transformers(save_model(model, tmp_path / "gte"), "cls")
    theirs = SentenceTransformer(str(root), device="cpu").encode(TEXTS)
    with serving("--model-id", str(root), "--max-batch-tokens", "512",
                 log_path=tmp_path / "server.log") as srv:
        response = srv.client.post("/embed", json={"inputs": TEXTS})
        assert response.status_code == 200, response.text
        ours = np.asarray(response.json(), dtype=np.float32)
        info = srv.client.get("/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "cls"}}
    assert ours.shape == theirs.shape == (len(TEXTS), 32)
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cosine.min() >= 0.9999
    assert np.abs(ours - theirs).max() < 1e-5
