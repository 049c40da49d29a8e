"""A tiny random MPNet served by the real `embedserve`: /embed equals sentence-transformers on
the same directory (router position offset 2, relative position bias in every layer)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.e2e.zoo import embed, sentence_transformer, serve_model
from tests.fixtures.families import make_tiny
from tests.fixtures.oracles import cosine_rows

TEXTS = ["hello world", "the weather is lovely today", "a",
         "A much longer input, with punctuation; digits 0123456789 and MiXeD case. " * 12]


@pytest.fixture(scope="module")
def mpnet(tmp_path_factory):
    model = make_tiny(tmp_path_factory.mktemp("mpnet") / "m", "mpnet", "MPNetModel",
                      pooling="mean", seed=9)
    with serve_model(model, tmp_path_factory.mktemp("logs")) as srv:
        yield model, srv


def test_embed_equals_sentence_transformers(mpnet) -> None:
    model, srv = mpnet
    ours = embed(srv, np.float64, inputs=TEXTS, truncate=True)
    theirs = sentence_transformer(model).encode(TEXTS).astype(np.float64)
    assert cosine_rows(ours, theirs).min() >= 0.99999
