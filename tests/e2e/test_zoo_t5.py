"""A tiny random T5 encoder in sentence-t5's layout (mean pooling, Dense, Normalize) behind the
tokenizer.json pipeline of older Hub files, served by the real `embedserve`: /embed equals
sentence-transformers on the same directory, and /tokenize gives its ids (a trailing space
gives no "▁" piece, as T5Tokenizer rebuilds the file)."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers

from tests.e2e.zoo import embed, sentence_transformer, serve_model
from tests.fixtures.oracles import cosine_rows
from tests.fixtures.t5 import make_tiny_t5
from tests.fixtures.tokenizer_oracle import edit_tokenizer

TEXTS = ["hello  world", "the weather is lovely today ", "a",
         "A much longer input, with punctuation; digits 0123456789 and MiXeD case. " * 3]


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    model = make_tiny_t5(tmp_path_factory.mktemp("t5") / "m", pooling="mean", seed=9)

    def hub_style(tok: Tokenizer) -> None:
        tok.normalizer = normalizers.Replace(Regex(" {2,}"), "▁")
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")

    edit_tokenizer(model, hub_style)
    with serve_model(model, tmp_path_factory.mktemp("logs")) as srv:
        yield model, srv


def test_embed_equals_sentence_transformers(t5) -> None:
    model, srv = t5
    ours = embed(srv, np.float64, inputs=TEXTS, truncate=True)
    theirs = sentence_transformer(model).encode(TEXTS).astype(np.float64)
    assert cosine_rows(ours, theirs).min() >= 0.99999


def test_tokenize_gives_sentence_transformers_ids(t5) -> None:
    model, srv = t5
    response = srv.client.post("/tokenize", json={"inputs": TEXTS[:2]})
    assert response.status_code == 200, response.text
    ours = [[token["id"] for token in tokens] for tokens in response.json()]
    theirs = sentence_transformer(model).tokenize(TEXTS[:2])
    expected = [[i for i, keep in zip(ids, mask, strict=True) if keep]
                for ids, mask in zip(theirs["input_ids"].tolist(),
                                     theirs["attention_mask"].tolist(), strict=True)]
    assert ours == expected
    file_alone = Tokenizer.from_file(str(model / "tokenizer.json"))
    assert file_alone.encode(TEXTS[1]).ids != ours[1]  # what the rebuild changes
