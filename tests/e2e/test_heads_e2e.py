"""The real server on classifier, re-ranker, SPLADE and CSR models: /predict, /rerank, /v1/rerank,
/embed_sparse and /info against transformers / sentence-transformers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from router import tokenization
from tests.e2e.server import Server
from tests.fixtures.heads import LABELS, make_tiny_classifier, make_tiny_mlm, splade_tiny

TOL = 1e-4
QUERY = "what is the capital of france?"
DOCS = ["Paris is the capital and largest city of France.", "hi", "the cat sat on the dog",
        "France's capital city is Paris, on the Seine."]


def start(model_dir: Path, log: Path, *args: str) -> Server:
    return Server("--model-id", str(model_dir), "--max-batch-tokens", "512", *args,
                  log_path=log).wait_healthy()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Iterator[tuple[Server, Path]]:
    root = tmp_path_factory.mktemp("classifier")
    model_dir = make_tiny_classifier(root / "model", LABELS)
    srv = start(model_dir, root / "log")
    yield srv, model_dir
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def reranker(tmp_path_factory) -> Iterator[tuple[Server, Path]]:
    root = tmp_path_factory.mktemp("reranker")
    model_dir = make_tiny_classifier(root / "model", ["score"], seed=1)
    srv = start(model_dir, root / "log")
    yield srv, model_dir
    assert srv.stop() == 0


def hf_logits(model_dir: Path, inputs: list[str | tuple[str, str]]) -> np.ndarray:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    rows = []
    for item in inputs:  # one at a time: no padding in the reference
        encoded = tokenizer(*item, return_tensors="pt") if isinstance(item, tuple) \
            else tokenizer(item, return_tensors="pt")
        with torch.no_grad():
            rows.append(model(**encoded).logits[0].numpy())
    return np.stack(rows).astype(np.float64)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def check_prediction(answer: list[dict], scores: np.ndarray) -> None:
    got = [item["score"] for item in answer]
    assert got == sorted(got, reverse=True), "labels sorted by score, best first"
    assert sorted(item["label"] for item in answer) == sorted(LABELS)
    for item in answer:
        assert abs(item["score"] - scores[LABELS.index(item["label"])]) <= TOL


def test_predict_matches_transformers(classifier) -> None:
    srv, model_dir = classifier
    single, pair = "The weather is lovely today.", (QUERY, DOCS[0])
    logits = hf_logits(model_dir, [single, pair, "hi"])
    probs = softmax(logits)

    response = srv.client.post("/predict", json={"inputs": single})
    assert response.status_code == 200, response.text
    check_prediction(response.json(), probs[0])
    response = srv.client.post("/predict", json={"inputs": list(pair)})
    check_prediction(response.json(), probs[1])
    response = srv.client.post("/predict", json={"inputs": [[single], list(pair), ["hi"]]})
    batch = response.json()
    assert len(batch) == 3
    for answer, row in zip(batch, probs, strict=True):
        check_prediction(answer, row)
    raw = srv.client.post("/predict", json={"inputs": single, "raw_scores": True}).json()
    check_prediction(raw, logits[0])


def test_classifier_refuses_embed_and_reports_labels(classifier) -> None:
    srv, _ = classifier
    response = srv.client.post("/embed", json={"inputs": "hi"})
    assert response.status_code == 424
    assert "Model is not an embedding model" in response.text
    model_type = srv.client.get("/info").json()["model_type"]
    assert model_type == {"classifier": {
        "id2label": {str(i): label for i, label in enumerate(LABELS)},
        "label2id": {label: i for i, label in enumerate(LABELS)},
    }}


def test_rerank_matches_cross_encoder(reranker) -> None:
    from sentence_transformers import CrossEncoder

    srv, model_dir = reranker
    expected = CrossEncoder(str(model_dir), device="cpu").predict([(QUERY, d) for d in DOCS])
    expected = np.asarray(expected, dtype=np.float64)
    response = srv.client.post("/rerank", json={"query": QUERY, "texts": DOCS,
                                                "return_text": True})
    assert response.status_code == 200, response.text
    ranks = response.json()
    assert [r["index"] for r in ranks] == list(np.argsort(-expected, kind="stable"))
    for rank in ranks:
        assert abs(rank["score"] - expected[rank["index"]]) <= TOL
        assert rank["text"] == DOCS[rank["index"]]
    raw = srv.client.post("/rerank", json={"query": QUERY, "texts": DOCS,
                                           "raw_scores": True}).json()
    logits = hf_logits(model_dir, [(QUERY, d) for d in DOCS])[:, 0]
    for rank in raw:
        assert abs(rank["score"] - logits[rank["index"]]) <= TOL
        assert "text" not in rank

    cohere = srv.client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 2,
                                                 "return_documents": True}).json()
    top = list(np.argsort(-expected, kind="stable")[:2])
    assert [r["index"] for r in cohere["results"]] == top
    for result in cohere["results"]:
        assert abs(result["relevance_score"] - expected[result["index"]]) <= TOL
        assert result["document"] == {"text": DOCS[result["index"]]}
    assert cohere["usage"]["total_tokens"] > 0

    assert srv.client.get("/info").json()["model_type"] == {
        "reranker": {"id2label": {"0": "score"}, "label2id": {"score": 0}}}
    assert srv.client.post("/embed", json={"inputs": "hi"}).status_code == 424


def test_a_cross_encoders_default_prompt_goes_before_the_query(tmp_path: Path) -> None:
    from sentence_transformers import CrossEncoder

    model_dir = make_tiny_classifier(tmp_path / "model", ["score"], seed=1)
    CrossEncoder(str(model_dir), device="cpu", prompts={"rank": "rank this: "},
                 default_prompt_name="rank").save(str(model_dir))
    pairs = [(QUERY, d) for d in DOCS]
    expected = CrossEncoder(str(model_dir), device="cpu").predict(pairs)
    assert np.abs(expected - CrossEncoder(str(model_dir), device="cpu").predict(
        pairs, prompt="")).max() > 1e-3  # (the prompt matters to these scores)
    # Cohere's max_chunks_per_doc: the pieces fit beside the query as it is tokenized, after
    # the prompt (tokenization._chunks cuts them; CrossEncoder scores each, the best counts).
    long_doc = "the cat sat on the dog, then the dog sat on the cat. " * 12
    srv = start(model_dir, tmp_path / "log")
    try:
        ranks = srv.client.post("/rerank", json={"query": QUERY, "texts": DOCS}).json()
        chunked = srv.client.post("/v1/rerank", json={"query": QUERY, "documents": [long_doc],
                                                      "max_chunks_per_doc": 8}).json()
        max_length = srv.client.get("/info").json()["max_input_length"]
    finally:
        assert srv.stop() == 0
    for rank in ranks:
        assert abs(rank["score"] - expected[rank["index"]]) <= TOL
    before = tokenization._tokenizer
    try:
        tokenization._load(str(model_dir / "tokenizer.json"))
        pieces = tokenization._chunks("rank this: " + QUERY, [long_doc], max_length, 8)
    finally:
        tokenization._tokenizer = before
    assert pieces.value.pieces is not None and len(pieces.value.pieces[0]) > 1
    best = CrossEncoder(str(model_dir), device="cpu").predict(
        [(QUERY, piece) for piece in pieces.value.pieces[0]]).max()
    assert abs(chunked["results"][0]["relevance_score"] - best) <= TOL


def test_a_pair_with_one_empty_text_is_scored(reranker) -> None:
    """TEI refuses a pair only when both texts are empty: a retrieved chunk with no text (an
    empty PDF page) is ranked, not a 400 for the whole /rerank (LlamaIndex's and Haystack's TEI
    re-rankers send every node's text as it is)."""
    from sentence_transformers import CrossEncoder

    srv, model_dir = reranker
    texts = [DOCS[0], ""]
    expected = CrossEncoder(str(model_dir), device="cpu").predict([(QUERY, t) for t in texts])
    for route, body in (("/rerank", {"query": QUERY, "texts": texts}),
                        ("/v1/rerank", {"query": QUERY, "documents": texts})):
        response = srv.client.post(route, json=body)
        assert response.status_code == 200, response.text
        ranks = response.json()
        for rank in ranks["results"] if route == "/v1/rerank" else ranks:
            score = rank.get("score", rank.get("relevance_score"))
            assert abs(score - expected[rank["index"]]) <= TOL
    logits = hf_logits(model_dir, [("", DOCS[0])])[0, 0]
    response = srv.client.post("/predict", json={"inputs": ["", DOCS[0]], "raw_scores": True})
    assert response.status_code == 200, response.text
    assert abs(response.json()[0]["score"] - logits) <= TOL
    both = srv.client.post("/predict", json={"inputs": ["", ""]})
    assert both.status_code == 400 and both.json()["error_type"] == "Empty"


def sparse_reference(model_dir: Path, texts: list[str]) -> list[dict[int, float]]:
    """transformers MaskedLM -> relu -> log1p -> max over tokens, one text at a time."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForMaskedLM.from_pretrained(str(model_dir)).eval()
    rows = []
    for text in texts:
        with torch.no_grad():
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0]
        vector = torch.log1p(torch.relu(logits)).max(dim=0).values
        nonzero = torch.nonzero(vector)[:, 0]
        rows.append({int(i): float(vector[i]) for i in nonzero})
    return rows


def check_sparse(answers: list[list[dict]], expected: list[dict[int, float]]) -> float:
    worst = 0.0
    for answer, want in zip(answers, expected, strict=True):
        indices = [item["index"] for item in answer]
        assert indices == sorted(indices), "indices ascending"
        got = {item["index"]: item["value"] for item in answer}
        assert all(v > 0 for v in got.values())
        for index in set(got) | set(want):
            worst = max(worst, abs(got.get(index, 0.0) - want.get(index, 0.0)))
    assert worst <= TOL, worst
    return worst


TEXTS = ["The weather is lovely today.", "hi", "SPLADE expands a query into weighted terms.",
         "what is the capital of france?"]


def test_embed_sparse_on_tiny_masked_lm(tmp_path: Path) -> None:
    model_dir = make_tiny_mlm(tmp_path / "model", seed=2)
    srv = start(model_dir, tmp_path / "log", "--pooling", "splade")
    try:
        response = srv.client.post("/embed_sparse", json={"inputs": TEXTS})
        assert response.status_code == 200, response.text
        check_sparse(response.json(), sparse_reference(model_dir, TEXTS))
        assert srv.client.get("/info").json()["model_type"] == {
            "embedding": {"pooling": "splade"}}
        # TEI's rules for the other embedding routes: /embed gives the sparse vector written
        # out in full, unnormalized only; /embed_all is refused.
        sparse = response.json()
        dense = srv.client.post("/embed", json={"inputs": TEXTS, "normalize": False})
        assert dense.status_code == 200, dense.text
        vocab_size = srv.client.get("/info").json()["embedding_dimension"]
        for row, entries in zip(dense.json(), sparse, strict=True):
            assert len(row) == vocab_size
            assert {i: v for i, v in enumerate(row) if v} == {
                e["index"]: e["value"] for e in entries}
        # /similarity is served, as TEI serves it: the cosines of those vectors.
        similarity = srv.client.post("/similarity", json={
            "inputs": {"source_sentence": TEXTS[0], "sentences": TEXTS[1:]}})
        assert similarity.status_code == 200, similarity.text
        unit = np.asarray(dense.json()) / np.linalg.norm(dense.json(), axis=1, keepdims=True)
        np.testing.assert_allclose(similarity.json(), unit[1:] @ unit[0], atol=1e-6)
        for route, body, message in [
            ("/embed", {"inputs": "hi"}, "`normalize` is not available for SPLADE models"),
            # (the other APIs' clients never sent `normalize`: told what to send, or why not)
            ("/v1/embeddings", {"input": "hi"},
             "normalizing (send `normalized: false`) is not available for SPLADE models"),
            ("/v2/embed", {"texts": ["hi"]}, "normalizing (which Cohere's embed API always "
             "does) is not available for SPLADE models"),
            ("/embed_all", {"inputs": "hi"}, "`embed_all` is not available for SPLADE models"),
        ]:
            refused = srv.client.post(route, json=body)
            assert refused.status_code == 424 and message in refused.text, (route, refused.text)
    finally:
        assert srv.stop() == 0


def test_embed_sparse_on_splade_tiny(tmp_path_factory) -> None:
    import json

    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling

    root = tmp_path_factory.mktemp("splade-tiny")
    model_dir = splade_tiny(root / "model")
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == [
        "BertForMaskedLM"]
    srv = start(model_dir, root / "log", "--pooling", "splade")
    try:
        response = srv.client.post("/embed_sparse", json={"inputs": TEXTS})
        assert response.status_code == 200, response.text
        answers = response.json()
    finally:
        assert srv.stop() == 0
    encoder = SparseEncoder(modules=[MLMTransformer(str(model_dir)),
                                     SpladePooling("max", activation_function="relu")],
                            device="cpu")
    dense = encoder.encode(TEXTS, convert_to_tensor=True).to_dense()
    expected = [{int(i): float(row[i]) for i in torch.nonzero(row)[:, 0]} for row in dense]
    check_sparse(answers, expected)
    check_sparse(answers, sparse_reference(model_dir, TEXTS))


def test_a_sparse_encoders_own_files_are_served_as_it_encodes(tmp_path: Path) -> None:
    """No --pooling: modules.json names the SPLADE pipeline, with its own settings."""
    from sentence_transformers import SparseEncoder

    from tests.fixtures.sparse import make_sparse_encoder

    model_dir = make_sparse_encoder(tmp_path / "model", strategy="sum",
                                    activation="log1p_relu", max_active_dims=6)
    srv = start(model_dir, tmp_path / "log")
    try:
        info = srv.client.get("/info").json()
        assert info["model_type"] == {"embedding": {"pooling": "splade"}}
        assert info["sparse_vectors"] == "splade"
        response = srv.client.post("/embed_sparse", json={"inputs": TEXTS,
                                                          "prompt_name": "query"})
        assert response.status_code == 200, response.text
        # TEI's root route gives a SPLADE model's sparse vectors.
        root = srv.client.post("/", json={"inputs": TEXTS})
        assert root.status_code == 200 and root.json() == response.json(), root.text
    finally:
        assert srv.stop() == 0
    encoder = SparseEncoder(str(model_dir), device="cpu")
    dense = encoder.encode_query(TEXTS, convert_to_tensor=True).to_dense()
    expected = [{int(i): float(row[i]) for i in torch.nonzero(row)[:, 0]} for row in dense]
    assert all(len(row) == 6 for row in expected)
    check_sparse(response.json(), expected)


def test_an_inference_free_splade_model_serves_both_routes(tmp_path: Path) -> None:
    """A Router of a query and a document route: `prompt_name` names the route, as
    encode_query / encode_document do; the query route is answered by the router itself."""
    from sentence_transformers import SparseEncoder

    from tests.fixtures.sparse import make_inference_free

    model_dir = make_inference_free(tmp_path / "model", max_active_dims=8)
    # Documents cut at 40 tokens (TEXTS fit); queries keep their tokenizer's 128.
    config = model_dir / "document_0_MLMTransformer" / "sentence_bert_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_seq_length": 40}))
    srv = start(model_dir, tmp_path / "log")
    answers, tokens = {}, {}
    try:
        for route in ("query", "document", None):
            body = {"inputs": TEXTS} | ({"prompt_name": route} if route else {})
            response = srv.client.post("/embed_sparse", json=body)
            assert response.status_code == 200, response.text
            answers[route] = response.json()
            tokens[route] = int(response.headers["x-compute-tokens"])
        vectors = srv.client.post("/embed", json={"inputs": TEXTS[0], "normalize": False,
                                                  "prompt_name": "query"})
        long = "a query with many words " * 4  # 48 tokens, 50 with [CLS] / [SEP]
        limits = {route: srv.client.post("/embed_sparse", json={
            "inputs": long, "truncate": False, "prompt_name": route}).status_code
            for route in ("query", "document")}
        assert vectors.status_code == 200, vectors.text
        metrics = srv.client.get("/metrics").text
        assert srv.client.get("/info").json()["sparse_vectors"] == "splade_inference_free"
    finally:
        assert srv.stop() == 0
    encoder = SparseEncoder(str(model_dir), device="cpu")
    for route, encode in (("query", encoder.encode_query), ("document", encoder.encode_document),
                          (None, encoder.encode)):
        dense = encode(TEXTS, convert_to_tensor=True).to_dense()
        for answer, row in zip(answers[route], dense, strict=True):
            indices = [int(i) for i in torch.nonzero(row)[:, 0]]
            assert [item["index"] for item in answer] == indices, route
            values = [item["value"] for item in answer]
            np.testing.assert_allclose(values, row[indices].numpy(), atol=TOL)
    assert answers[None] == answers["document"]
    assert limits == {"query": 200, "document": 422}  # (too long: 422, as TEI)
    # The query route's tokens have no [CLS] / [SEP]: two fewer per input.
    assert tokens["query"] == tokens["document"] - 2 * len(TEXTS)
    assert {i: v for i, v in enumerate(vectors.json()[0]) if v} == {
        e["index"]: e["value"] for e in answers["query"][0]}
    # Every input answered counts, the query route's too (computed without a batch).
    assert "te_embed_success 14.0" in metrics
    assert 'te_request_success{method="batch"} 3.0' in metrics


def test_a_csr_sparse_encoder_is_served_as_it_encodes(tmp_path: Path) -> None:
    """Transformer, Pooling, Normalize, SparseAutoEncoder (its own normalize, max_active_dims 9
    over k 6): /embed_sparse and / give SparseEncoder.encode's non-zeros, /embed (unnormalized
    only, as for SPLADE) the hidden_dim-wide vector, /embed_all the Transformer's tokens."""
    from sentence_transformers import SparseEncoder

    from tests.fixtures.sparse import make_csr

    model_dir = make_csr(tmp_path / "model", k=6, max_active_dims=9, standardize=True,
                         l2_first=True)
    srv = start(model_dir, tmp_path / "log")
    try:
        info = srv.client.get("/info").json()
        response = srv.client.post("/embed_sparse", json={"inputs": TEXTS})
        assert response.status_code == 200, response.text
        root = srv.client.post("/", json={"inputs": TEXTS})
        dense = srv.client.post("/embed", json={"inputs": TEXTS, "normalize": False})
        refused = srv.client.post("/embed", json={"inputs": "hi"})
        tokens = srv.client.post("/embed_all", json={"inputs": "hi"})
    finally:
        assert srv.stop() == 0
    assert info["sparse_vectors"] == "csr" and info["embedding_dimension"] == 64
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert root.status_code == 200 and root.json() == response.json(), root.text
    encoder = SparseEncoder(str(model_dir), device="cpu")
    expected = encoder.encode(TEXTS, convert_to_tensor=True).to_dense()
    check_sparse(response.json(), [{int(i): float(row[i]) for i in torch.nonzero(row)[:, 0]}
                                   for row in expected])
    assert all(len(row) == 9 for row in response.json())
    assert dense.status_code == 200, dense.text
    for row, entries in zip(dense.json(), response.json(), strict=True):
        assert len(row) == 64
        assert {i: v for i, v in enumerate(row) if v} == {e["index"]: e["value"] for e in entries}
    assert refused.status_code == 424, refused.text
    assert "`normalize` is not available for sparse (CSR) models" in refused.text
    assert tokens.status_code == 200, tokens.text
    assert np.asarray(tokens.json()).shape[::2] == (1, 32)  # (texts, tokens, hidden size)
