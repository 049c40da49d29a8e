"""A tiny random XLM-R behind multilingual-e5-small's real tokenizer, served by the real
`embedserve`: the router's Unigram tokenization, its position offset (pad_token_id + 1) and its
truncation at the model's 64 tokens give /embed equal to sentence-transformers."""

from __future__ import annotations

import numpy as np
import pytest

from tests.e2e.zoo import embed, sentence_transformer, serve_model
from tests.fixtures.families import make_tiny_xlmr
from tests.fixtures.oracles import cosine_rows

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
    with serve_model(model, tmp_path_factory.mktemp("logs")) as srv:
        yield model, srv


def test_embed_equals_sentence_transformers(xlmr) -> None:
    model, srv = xlmr
    ours = embed(srv, np.float64, inputs=TEXTS, truncate=True)
    theirs = sentence_transformer(model).encode(TEXTS).astype(np.float64)
    assert cosine_rows(ours, theirs).min() >= 0.99999
    assert srv.client.get("/info").json()["max_input_length"] == 64
