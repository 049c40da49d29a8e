"""A tiny random ALBERT in paraphrase-albert-small-v2's layout (mean pooling, Normalize) behind
the tokenizer.json pipeline of Hub files, served by the real `embedserve`: /embed equals
sentence-transformers on the same directory (shared layers, narrow embeddings, AlbertTokenizer's
rebuild: case, accents and quotes folded, no "▁" for a trailing space)."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import pre_tokenizers

from tests.e2e.zoo import embed, sentence_transformer, serve_model
from tests.fixtures.albert import make_tiny_albert
from tests.fixtures.oracles import cosine_rows
from tests.fixtures.tokenizer_oracle import edit_tokenizer

TEXTS = ["Hello World ", "Café ``naïve''", "a",
         "A much longer input, with punctuation; digits 0123456789 and MiXeD case. " * 3]


@pytest.fixture(scope="module")
def albert(tmp_path_factory):
    model = make_tiny_albert(tmp_path_factory.mktemp("albert") / "m", pooling="mean", seed=9)
    edit_tokenizer(model, lambda tok: setattr(
        tok, "pre_tokenizer", pre_tokenizers.Metaspace(prepend_scheme="always")))
    with serve_model(model, tmp_path_factory.mktemp("logs")) as srv:
        yield model, srv


def test_embed_equals_sentence_transformers(albert) -> None:
    model, srv = albert
    ours = embed(srv, np.float64, inputs=TEXTS, truncate=True)
    theirs = sentence_transformer(model).encode(TEXTS).astype(np.float64)
    assert cosine_rows(ours, theirs).min() >= 0.99999
