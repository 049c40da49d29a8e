"""A tiny random XLM-R behind multilingual-e5-small's real tokenizer, served by the real
`embedserve`: the router's Unigram tokenization, its position offset (pad_token_id + 1) and its
truncation at the model's 64 tokens give /embed equal to sentence-transformers."""

from __future__ import annotations

import numpy as np
import pytest

from tests.e2e.server import serving
from tests.fixtures.families import make_tiny_xlmr

TEXTS = [
    "The weather is lovely today.",
    "Il fait très beau aujourd'hui, n'est-ce pas ?",
    "今日はとても良い天気ですね。",
    "Привет",
    "a",
    # Over 64 tokens: truncated, the last position row is used.
    "Embedding servers batch requests by token budget, in many languages. " * 10,
]


@pytest.fixture(scope="module")
def xlmr(tmp_path_factory):
    model = make_tiny_xlmr(tmp_path_factory.mktemp("xlmr") / "m", pooling="mean")
    log = tmp_path_factory.mktemp("logs") / "xlmr.log"
    with serving("--model-id", str(model), "--max-batch-tokens", "512", log_path=log) as srv:
        yield model, srv


def test_embed_equals_sentence_transformers(xlmr) -> None:
    from sentence_transformers import SentenceTransformer

    model, srv = xlmr
    response = srv.client.post("/embed", json={"inputs": TEXTS, "truncate": True})
    assert response.status_code == 200, response.text
    ours = np.asarray(response.json(), dtype=np.float64)
    theirs = SentenceTransformer(str(model), device="cpu").encode(TEXTS).astype(np.float64)
    cosine = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) *
                                       np.linalg.norm(theirs, axis=1))
    assert cosine.min() >= 0.99999
    assert srv.client.get("/info").json()["max_input_length"] == 64
