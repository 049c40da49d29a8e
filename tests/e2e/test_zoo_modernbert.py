"""A tiny random ModernBERT served by the real `embedserve`: /embed equals sentence-transformers
on the same directory, for inputs both shorter and much longer than the local window."""

from __future__ import annotations

import pytest

from tests.e2e.zoo import embed, sentence_transformer, serve_model
from tests.fixtures.modernbert import make_tiny_modernbert
from tests.fixtures.oracles import cosine_rows

PROMPTS = {"search_query": "search_query: ", "search_document": "search_document: "}
TEXTS = [
    "hi",
    "The weather is lovely today.",
    "A much longer input, with punctuation; digits 0123456789 and MiXeD case: it spans "
    "well over forty word pieces, ten times the local attention window of the fixture.",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    # modernbert-embed's shape: mean pooling, Normalize, search_query / search_document prompts.
    model = make_tiny_modernbert(tmp_path_factory.mktemp("modernbert") / "model",
                                 pooling="mean", seed=11, prompts=PROMPTS)
    with serve_model(model, tmp_path_factory.mktemp("logs"), 1024) as srv:
        yield model, srv


def test_embed_matches_sentence_transformers(served) -> None:
    model, srv = served
    st = sentence_transformer(model)
    info = srv.client.get("/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    for prompt_name in (None, "search_query"):
        body = {"inputs": TEXTS} | ({"prompt_name": prompt_name} if prompt_name else {})
        ours = embed(srv, **body)
        theirs = st.encode(TEXTS, prompt_name=prompt_name, convert_to_numpy=True)
        assert ours.shape == theirs.shape == (len(TEXTS), 32)
        cosine = cosine_rows(ours, theirs)
        assert cosine.min() >= 0.9999, (prompt_name, cosine)
