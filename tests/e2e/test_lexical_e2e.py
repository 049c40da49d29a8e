"""The real server on a BGE-M3-shaped model: /embed gives its dense vectors (CLS, normalized)
as sentence-transformers does and /embed_sparse its lexical weights as FlagEmbedding does."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.e2e.server import Server
from tests.fixtures.lexical import make_m3, reference

TEXTS = ["What is BGE M3?", "Definition of BM25 BM25", "<unk> and <s> are special"]


def test_dense_and_lexical_vectors_from_one_model(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    model_dir = make_m3(tmp_path / "model")
    srv = Server("--model-id", str(model_dir), log_path=tmp_path / "log").wait_healthy()
    try:
        sparse = srv.client.post("/embed_sparse", json={"inputs": TEXTS})
        dense = srv.client.post("/embed", json={"inputs": TEXTS})
        root = srv.client.post("/", json={"inputs": TEXTS})
        info = srv.client.get("/info").json()
        tokens = srv.client.post("/embed_all", json={"inputs": TEXTS[0]})
    finally:
        assert srv.stop() == 0
    assert sparse.status_code == dense.status_code == root.status_code == 200, sparse.text
    for answer, want in zip(sparse.json(), reference(model_dir, TEXTS), strict=True):
        assert [e["index"] for e in answer] == sorted(want)
        assert max(abs(e["value"] - want[e["index"]]) for e in answer) <= 1e-5
    expected = SentenceTransformer(str(model_dir), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(dense.json(), expected, atol=1e-5)
    assert root.json() == dense.json(), "/ stays the dense embedding route"
    assert info["model_type"] == {"embedding": {"pooling": "cls"}}
    assert info["sparse_vectors"] == "lexical_weights"
    assert tokens.status_code == 200, "the token embeddings are still served"
