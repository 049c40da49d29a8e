"""A tiny random DistilBERT served by the real `embedserve`: /embed equals sentence-transformers
on the same directory (the router's pair-less inputs, no token types, no position offset)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.e2e.zoo import embed, sentence_transformer, serve_model
from tests.fixtures.families import make_tiny
from tests.fixtures.oracles import cosine_rows

TEXTS = ["hello world", "the weather is lovely today", "a",
         "A much longer input, with punctuation; digits 0123456789 and MiXeD case. " * 12]


@pytest.fixture(scope="module")
def distilbert(tmp_path_factory):
    model = make_tiny(tmp_path_factory.mktemp("distilbert") / "m", "distilbert",
                      "DistilBertModel", pooling="mean", seed=9)
    with serve_model(model, tmp_path_factory.mktemp("logs")) as srv:
        yield model, srv


def test_embed_equals_sentence_transformers(distilbert) -> None:
    model, srv = distilbert
    ours = embed(srv, np.float64, inputs=TEXTS, truncate=True)
    theirs = sentence_transformer(model).encode(TEXTS).astype(np.float64)
    assert cosine_rows(ours, theirs).min() >= 0.99999
