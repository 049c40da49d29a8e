"""A classifier and a cross-encoder derived from the real MiniLM, served by `embedserve` and
compared with their oracles (transformers softmax, sentence-transformers CrossEncoder)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests.e2e.conftest import LABELS
from tests.e2e.server import serving

TEXTS = ["I am so happy today!", "This is terrifying.", "The meeting is at noon."]
QUERY = "How is the weather?"
DOCS = ["It is sunny and warm.", "The stock market fell.", "Rain is expected tonight.", "Hi"]


@pytest.fixture(scope="module")
def classifier(minilm_classifier_dir, tmp_path_factory):
    with serving("--model-id", str(minilm_classifier_dir), "--max-batch-tokens", "1024",
                 log_path=tmp_path_factory.mktemp("logs") / "cls.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def cross_encoder(minilm_cross_encoder_dir, tmp_path_factory):
    with serving("--model-id", str(minilm_cross_encoder_dir), "--max-batch-tokens", "1024",
                 log_path=tmp_path_factory.mktemp("logs") / "ce.log") as srv:
        yield srv


def transformers_logits(model_dir, inputs) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    firsts = [i if isinstance(i, str) else i[0] for i in inputs]
    seconds = None if all(isinstance(i, str) for i in inputs) else [i[1] for i in inputs]
    batch = tokenizer(firsts, seconds, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.numpy()


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_predict_equals_transformers_softmax(classifier, minilm_classifier_dir):
    expected = softmax(transformers_logits(minilm_classifier_dir, TEXTS))
    response = classifier.client.post("/predict", json={"inputs": [[t] for t in TEXTS]})
    assert response.status_code == 200, response.text
    for row, predictions in zip(expected, response.json(), strict=True):
        assert [p["label"] for p in predictions] == [LABELS[i] for i in np.argsort(-row)]
        assert np.allclose([p["score"] for p in predictions], np.sort(row)[::-1], atol=1e-4)
    single = classifier.client.post("/predict", json={"inputs": TEXTS[0]}).json()
    assert single == response.json()[0] or np.allclose(
        [p["score"] for p in single], [p["score"] for p in response.json()[0]], atol=1e-5)


def test_predict_pairs_and_raw_scores(classifier, minilm_classifier_dir):
    pair = [TEXTS[0], TEXTS[1]]
    logits = transformers_logits(minilm_classifier_dir, [tuple(pair)])[0]
    raw = classifier.client.post("/predict", json={"inputs": pair, "raw_scores": True}).json()
    assert np.allclose([p["score"] for p in raw], np.sort(logits)[::-1], atol=1e-4)
    info = classifier.client.get("/info").json()
    assert info["model_type"]["classifier"]["id2label"] == {str(k): v for k, v in LABELS.items()}
    assert info["embedding_dimension"] is None  # a classifier embeds nothing


def test_rerank_equals_cross_encoder(cross_encoder, minilm_cross_encoder_dir):
    from sentence_transformers import CrossEncoder

    expected = CrossEncoder(str(minilm_cross_encoder_dir), device="cpu").predict(
        [(QUERY, d) for d in DOCS])
    response = cross_encoder.client.post("/rerank", json={"query": QUERY, "texts": DOCS,
                                                          "return_text": True})
    assert response.status_code == 200, response.text
    ranks = response.json()
    assert [r["index"] for r in ranks] == list(np.argsort(-expected, kind="stable"))
    for r in ranks:
        assert r["score"] == pytest.approx(float(expected[r["index"]]), abs=1e-4)
        assert r["text"] == DOCS[r["index"]]
    raw = cross_encoder.client.post("/rerank", json={"query": QUERY, "texts": DOCS,
                                                     "raw_scores": True}).json()
    logits = np.log(expected / (1 - expected))  # the sigmoid's inverse
    for r in raw:
        assert r["score"] == pytest.approx(float(logits[r["index"]]), abs=1e-3)
        assert "text" not in r
    empty = cross_encoder.client.post("/rerank", json={"query": QUERY, "texts": []})
    assert empty.status_code == 400 and empty.json()["error_type"] == "Empty"
    cohere = cross_encoder.client.post("/v2/rerank", json={
        "query": QUERY, "documents": [{"text": d} for d in DOCS], "top_n": 2,
        "return_documents": True}).json()
    assert [r["index"] for r in cohere["results"]] == [r["index"] for r in ranks[:2]]
    assert cohere["results"][0]["document"] == {"text": DOCS[ranks[0]["index"]]}
    assert cohere["usage"]["total_tokens"] > 0
    nothing = cross_encoder.client.post("/v1/rerank", json={"query": QUERY, "documents": []})
    assert nothing.status_code == 400 and "`documents` cannot be empty" in nothing.text
    # A pair with nothing in it is refused in the names of the API it came by: TEI's words on
    # TEI's route, the query and that document on Cohere's, which has no `inputs` (also where
    # the long document before it was scored in pieces).
    for fields in ({}, {"max_chunks_per_doc": 4}):
        blank = cross_encoder.client.post("/v1/rerank", json={
            "query": "", "documents": ["weather " * 1000, ""], **fields})
        assert blank.status_code == 400, blank.text
        assert blank.json()["error"] == (
            "Input validation error: `query` and `documents[1]` cannot be empty"), fields
    blank = cross_encoder.client.post("/rerank", json={"query": "", "texts": ["a", ""]})
    assert blank.json()["error"] == "Input validation error: `inputs` cannot be empty"
    # Scores are float32, written as TEI writes its f32: at most 9 significant digits.
    text = cross_encoder.client.post("/rerank", json={"query": QUERY, "texts": DOCS}).text
    for number in re.findall(r'"score":([-0-9.eE+]+)', text):
        digits = number.lstrip("-").split("e")[0].split("E")[0].replace(".", "").lstrip("0")
        assert len(digits) <= 9, number


def test_root_routes_by_model_kind(classifier, cross_encoder):
    predicted = classifier.client.post("/", json={"inputs": TEXTS[0]})
    assert predicted.status_code == 200 and predicted.json()[0]["label"] in LABELS.values()
    ranked = cross_encoder.client.post("/invocations", json={"query": QUERY, "texts": DOCS})
    assert ranked.status_code == 200 and len(ranked.json()) == len(DOCS)
    # /info's embedding_dimension is null for a re-ranker too: it embeds nothing either.
    assert cross_encoder.client.get("/info").json()["embedding_dimension"] is None


def test_vertex_answers_each_instance_as_the_models_route(classifier, cross_encoder):
    instances = [{"inputs": TEXTS[0]}, {"inputs": [TEXTS[1], TEXTS[2]], "raw_scores": True}]
    response = classifier.client.post("/vertex", json={"instances": instances})
    assert response.status_code == 200, response.text
    expected = [classifier.client.post("/predict", json=i).json() for i in instances]
    for got, want in zip(response.json()["predictions"], expected, strict=True):
        assert [p["label"] for p in got] == [p["label"] for p in want]
        assert np.allclose([p["score"] for p in got], [p["score"] for p in want], atol=1e-5)
    ranked = cross_encoder.client.post("/vertex", json={"instances": [
        {"query": QUERY, "texts": DOCS}]}).json()["predictions"]
    assert len(ranked) == 1 and len(ranked[0]) == len(DOCS)
    # As TEI's: a re-ranker's instance of /predict's shape is answered by /predict, and a
    # classifier's of /rerank's shape by /rerank (its 424).
    pair = {"inputs": [QUERY, DOCS[0]]}
    mixed = cross_encoder.client.post("/vertex", json={"instances": [
        {"query": QUERY, "texts": DOCS[:1]}, pair]})
    assert mixed.status_code == 200, mixed.text
    assert mixed.json()["predictions"][1] == cross_encoder.client.post("/predict",
                                                                       json=pair).json()
    wrong = classifier.client.post("/vertex", json={"instances": [{"query": QUERY,
                                                                   "texts": DOCS}]})
    assert wrong.status_code == 424 and "re-ranker" in wrong.json()["error"], wrong.text
    bad = classifier.client.post("/vertex", json={"instances": [{"inputs": TEXTS[0]},
                                                                {"nope": 1}]})
    assert bad.status_code == 422 and bad.json()["error_type"] == "Validation"
