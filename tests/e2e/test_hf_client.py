"""huggingface_hub.InferenceClient, unchanged, against embedserve (it posts every task to /)."""

from __future__ import annotations

import numpy as np
import pytest
from huggingface_hub import InferenceClient

from tests.e2e.server import Server
from tests.e2e.test_embed_parity import LONG, SENTENCES, cosines


@pytest.fixture(autouse=True)
def local_requests_allowed(monkeypatch):
    # huggingface_hub refuses every request in offline mode, even to 127.0.0.1. These tests
    # talk to the local server only (base_url), so lift the flag for the client alone.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_feature_extraction(server, st_minilm):
    client = InferenceClient(base_url=server.url)
    ours = np.asarray(client.feature_extraction(SENTENCES[:3]))
    assert cosines(ours, st_minilm.encode(SENTENCES[:3])).min() >= 0.99999
    left = np.asarray(client.feature_extraction(LONG, truncate=True,
                                                truncation_direction="left"))
    right = np.asarray(client.feature_extraction(LONG, truncate=True,
                                                 truncation_direction="right"))
    assert cosines(right, st_minilm.encode([LONG])).min() >= 0.99999
    assert cosines(left, right).min() < 0.999  # the other end of the text was kept


def test_sentence_similarity(minilm_dir, st_minilm, tmp_path):
    srv = Server("--model-id", str(minilm_dir), "--max-batch-tokens", "1024",
                 env={"TASK": "sentence-similarity"}, log_path=tmp_path / "log").wait_healthy()
    try:
        scores = InferenceClient(base_url=srv.url).sentence_similarity(SENTENCES[1],
                                                                      SENTENCES[2:5])
        vectors = st_minilm.encode(SENTENCES[1:5])
        assert np.allclose(scores, vectors[1:] @ vectors[0], atol=1e-4)
    finally:
        assert srv.stop() == 0


def test_text_classification(minilm_classifier_dir, tmp_path):
    srv = Server("--model-id", str(minilm_classifier_dir), "--max-batch-tokens", "1024",
                 log_path=tmp_path / "log").wait_healthy()
    try:
        output = InferenceClient(base_url=srv.url).text_classification("I am so happy today!")
        direct = srv.client.post("/predict", json={"inputs": "I am so happy today!"}).json()
        # huggingface_hub 2.x keeps the first element of what a TEI endpoint answers for one
        # input: the best label (the hosted API wraps the list once more).
        best = output[0] if isinstance(output, list) else output
        assert best.label == direct[0]["label"]
        assert best.score == pytest.approx(direct[0]["score"], abs=1e-6)
    finally:
        assert srv.stop() == 0
