"""A tiny random DeBERTa-v3 re-ranker (DebertaV2ForSequenceClassification, one label, saved by
CrossEncoder as mxbai-rerank-*-v1 is) served by the real `embedserve`: /rerank, /v1/rerank and
/predict against CrossEncoder.predict on the same files, long documents cut at the model's
128 tokens."""

from __future__ import annotations

import numpy as np
import pytest

from tests.e2e.zoo import cross_encoder, rerank_scores, serve_model
from tests.fixtures.deberta import make_tiny_deberta

TOL = 1e-5
QUERY = "what is the weather today?"
DOCS = ["the weather is lovely today", "hello", "a",
        "A much longer document, with punctuation; digits 0123456789 and MiXeD case. " * 6]


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    from sentence_transformers import CrossEncoder

    root = make_tiny_deberta(tmp_path_factory.mktemp("deberta") / "m",
                             "DebertaV2ForSequenceClassification", seed=11, num_labels=1)
    CrossEncoder(str(root), device="cpu").save(str(root))
    with serve_model(root, tmp_path_factory.mktemp("logs")) as srv:
        yield root, srv


def test_rerank_equals_cross_encoder(reranker) -> None:
    root, srv = reranker
    expected = cross_encoder(root, [(QUERY, doc) for doc in DOCS])
    response = srv.client.post("/rerank", json={"query": QUERY, "texts": DOCS})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(rerank_scores(response.json()), expected, atol=TOL)
    cohere = srv.client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})
    assert cohere.status_code == 200, cohere.text
    by_index = {r["index"]: r["relevance_score"] for r in cohere.json()["results"]}
    np.testing.assert_allclose([by_index[i] for i in range(len(DOCS))], expected, atol=TOL)


def test_predict_pairs_and_info(reranker) -> None:
    root, srv = reranker
    expected = cross_encoder(root, [(QUERY, DOCS[0]), ("hello", "world")])
    response = srv.client.post("/predict", json={"inputs": [[QUERY, DOCS[0]],
                                                             ["hello", "world"]]})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose([row[0]["score"] for row in response.json()], expected, atol=TOL)
    info = srv.client.get("/info").json()
    assert "reranker" in info["model_type"] and info["max_input_length"] == 128
