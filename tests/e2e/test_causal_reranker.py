"""A tiny LogitScore re-ranker (a causal LM scoring pairs by its "yes"/"no" logits, in the
layout sentence-transformers saves Qwen3-Reranker in) served by the real `embedserve`: /rerank,
/v1/rerank, /predict and /info against CrossEncoder.predict on the same files; and a sequence
classifier whose Transformer module takes chat messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.e2e.server import serving
from tests.e2e.zoo import cross_encoder, rerank_scores
from tests.fixtures.causal_reranker import make_causal_reranker, make_chat_classifier

TOL = 1e-4
QUERY = "what is a cat"
# Short and long: the long ones overflow the model's 64 tokens and are cut.
DOCS = ["a cat is a small animal", "hello", "the dog " * 40, "cats and dogs, " * 12]
PROMPTS = {"judge": "judge the document"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = make_causal_reranker(tmp_path_factory.mktemp("causal") / "model", prompts=PROMPTS,
                                default_prompt_name="judge")
    with serving("--model-id", str(root), "--max-batch-tokens", "512",
                 log_path=tmp_path_factory.mktemp("logs") / "log") as srv:
        yield root, srv


def test_rerank_equals_cross_encoder(served) -> None:
    root, srv = served
    expected = cross_encoder(root, [(QUERY, doc) for doc in DOCS])
    response = srv.client.post("/rerank", json={"query": QUERY, "texts": DOCS})
    assert response.status_code == 200, response.text
    ranks = response.json()
    np.testing.assert_allclose(rerank_scores(ranks), expected, atol=TOL)
    assert [r["index"] for r in ranks] == list(np.argsort(-expected, kind="stable"))
    raw = srv.client.post("/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True})
    expected_raw = cross_encoder(root, [(QUERY, doc) for doc in DOCS],
                                 activation_fn=torch.nn.Identity())
    np.testing.assert_allclose(rerank_scores(raw.json()), expected_raw, atol=TOL)


def test_cohere_shape_and_predict_agree(served) -> None:
    root, srv = served
    expected = cross_encoder(root, [(QUERY, doc) for doc in DOCS])
    cohere = srv.client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})
    assert cohere.status_code == 200, cohere.text
    by_index = {r["index"]: r["relevance_score"] for r in cohere.json()["results"]}
    np.testing.assert_allclose([by_index[i] for i in range(len(DOCS))], expected, atol=TOL)
    predicted = srv.client.post("/predict", json={"inputs": [[QUERY, DOCS[0]]]})
    assert predicted.status_code == 200, predicted.text
    assert predicted.json()[0][0]["label"] == "LABEL_0"
    assert abs(predicted.json()[0][0]["score"] - expected[0]) < TOL


def test_info_and_refusals(served) -> None:
    _, srv = served
    info = srv.client.get("/info").json()
    assert info["model_type"] == {"reranker": {"id2label": {"0": "LABEL_0"},
                                               "label2id": {"LABEL_0": 0}}}
    chunks = srv.client.post("/v2/rerank", json={"query": QUERY, "documents": DOCS,
                                                 "max_chunks_per_doc": 2})
    assert chunks.status_code == 422, chunks.text
    assert "chat template" in chunks.json()["error"]
    untruncated = srv.client.post("/rerank", json={"query": QUERY, "texts": DOCS,
                                                   "truncate": False})
    assert untruncated.status_code == 422, untruncated.text
    assert "must have less than 64 tokens" in untruncated.json()["error"]


def test_a_chat_sequence_classifier_equals_cross_encoder(tmp_path: Path) -> None:
    root = make_chat_classifier(tmp_path / "model")
    expected = cross_encoder(root, [(QUERY, doc) for doc in DOCS])
    with serving("--model-id", str(root), "--max-batch-tokens", "512",
                 log_path=tmp_path / "log") as srv:
        response = srv.client.post("/rerank", json={"query": QUERY, "texts": DOCS})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(rerank_scores(response.json()), expected, atol=TOL)
