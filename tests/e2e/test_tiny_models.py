"""Tiny random BERTs served by the real `embedserve`: /embed equals sentence-transformers on the
same files, in both sentence-transformers file formats, with Dense modules and default prompts."""

from __future__ import annotations

import numpy as np
import pytest

from tests.e2e.zoo import embed, sentence_transformer, serve_model
from tests.fixtures.tiny import make_tiny_bert

TEXTS = ["hello world", "the weather is lovely today", "a cat", "query: dog at night " * 5]
PROMPTS = {"query": "query: ", "passage": "passage: "}


@pytest.fixture(scope="module", params=["v6", "classic"])
def tiny(request, tmp_path_factory):
    model = make_tiny_bert(tmp_path_factory.mktemp("tiny") / request.param, pooling="cls",
                           dense_out=16, prompts=PROMPTS, default_prompt_name="query",
                           max_seq_length=24, st_format=request.param)
    with serve_model(model, tmp_path_factory.mktemp("logs")) as srv:
        yield model, srv


def st_encode(model, texts, **kwargs) -> np.ndarray:
    return sentence_transformer(model).encode(texts, **kwargs)


def test_cls_and_dense_with_the_default_prompt(tiny):
    model, srv = tiny
    ours = embed(srv, inputs=TEXTS)
    theirs = st_encode(model, TEXTS)  # applies default_prompt_name "query", as we do
    assert ours.shape == (len(TEXTS), 16)
    cos = (ours * theirs).sum(1) / np.linalg.norm(theirs, axis=1)
    assert cos.min() >= 0.99999
    assert np.abs(ours - theirs).max() < 1e-5


def test_explicit_prompt_name(tiny):
    model, srv = tiny
    ours = embed(srv, inputs=TEXTS, prompt_name="passage")
    theirs = st_encode(model, TEXTS, prompt_name="passage")
    assert np.abs(ours - theirs).max() < 1e-5


def test_info_reports_dense_prompts_and_limit(tiny):
    _, srv = tiny
    info = srv.client.get("/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "cls"}}
    assert info["embedding_dimension"] == 16
    assert len(info["dense_modules"]) == 1
    assert info["default_prompt"] == "query: "
    assert info["max_input_length"] == 24
