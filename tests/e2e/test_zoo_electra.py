"""A tiny random ELECTRA re-ranker (ElectraForSequenceClassification, one label, saved by
CrossEncoder as cross-encoder/ms-marco-electra-base is) served by the real `embedserve`:
/rerank and /predict against CrossEncoder.predict on the same files (gelu classifier head,
embeddings projected to the layers' width, the tokenizer class its files name)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.e2e.zoo import cross_encoder, rerank_scores, serve_model
from tests.fixtures.families import make_tiny

TOL = 1e-5
QUERY = "What is the weather today?"
DOCS = ["the weather is lovely today", "hello", "a",
        "A much longer document, with punctuation; digits 0123456789 and MiXeD case. " * 6]


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    from sentence_transformers import CrossEncoder

    root = make_tiny(tmp_path_factory.mktemp("electra") / "m", "electra",
                     "ElectraForSequenceClassification", seed=11, num_labels=1)
    CrossEncoder(str(root), device="cpu").save(str(root))
    with serve_model(root, tmp_path_factory.mktemp("logs")) as srv:
        yield root, srv


def test_rerank_and_predict_equal_cross_encoder(reranker) -> None:
    root, srv = reranker
    expected = cross_encoder(root, [(QUERY, doc) for doc in DOCS])
    response = srv.client.post("/rerank", json={"query": QUERY, "texts": DOCS})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(rerank_scores(response.json()), expected, atol=TOL)
    response = srv.client.post("/predict", json={"inputs": [[QUERY, DOCS[0]]]})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()[0][0]["score"], expected[0], atol=TOL)
