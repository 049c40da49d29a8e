"""Tiny static models (sentence-transformers' StaticEmbedding: its own save, and model2vec's
vocabulary-quantized files) served by the real `embedserve`: /embed and /v1/embeddings equal
SentenceTransformer.encode, inputs without tokens give zeros, /info and /tokenize say what the
model sees, and the batch budget is the length limit."""

from __future__ import annotations

import numpy as np
import pytest

from tests.e2e.zoo import embed, sentence_transformer, serve_model
from tests.fixtures.static import make_model2vec, make_static

TOL = 1e-6
BUDGET = 512
TEXTS = ["hello world", "the weather is lovely today", "a", "   ", "\n",
         "A much longer input, with punctuation; digits 0123456789 and MiXeD case. " * 4]
PROMPTS = {"query": "query: ", "document": ""}


@pytest.fixture(scope="module")
def static(tmp_path_factory):
    model = make_static(tmp_path_factory.mktemp("static") / "m", prompts=PROMPTS, seed=3)
    with serve_model(model, tmp_path_factory.mktemp("logs"), max_batch_tokens=BUDGET) as srv:
        yield model, srv


@pytest.fixture(scope="module")
def model2vec(tmp_path_factory):
    model = make_model2vec(tmp_path_factory.mktemp("model2vec") / "m", quantized=True, seed=4)
    with serve_model(model, tmp_path_factory.mktemp("logs")) as srv:
        yield model, srv


@pytest.mark.parametrize("which", ["static", "model2vec"])
def test_embed_equals_sentence_transformers(request, which: str) -> None:
    model, srv = request.getfixturevalue(which)
    ours = embed(srv, inputs=TEXTS)
    theirs = sentence_transformer(model).encode(TEXTS)
    np.testing.assert_allclose(ours, theirs, atol=TOL)
    assert not ours[3:5].any()  # no tokens: zeros, normalized or not (never NaN)
    assert not embed(srv, inputs=["  "], normalize=False).any()


def test_prompts_and_the_openai_route(static) -> None:
    model, srv = static
    oracle = sentence_transformer(model)
    ours = embed(srv, inputs=TEXTS, prompt_name="query")
    np.testing.assert_allclose(ours, oracle.encode(TEXTS, prompt_name="query"), atol=TOL)
    response = srv.client.post("/v1/embeddings", json={"input": TEXTS})
    assert response.status_code == 200, response.text
    openai = np.asarray([row["embedding"] for row in response.json()["data"]], np.float32)
    np.testing.assert_allclose(openai, oracle.encode(TEXTS), atol=TOL)


def test_info_says_what_is_served(static) -> None:
    _, srv = static
    info = srv.client.get("/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == BUDGET  # no limit of its own: the batch budget
    assert info["embedding_dimension"] == 16 and info["normalize_module"] is True
    assert info["prompts"] == PROMPTS


def test_the_batch_budget_cuts_or_refuses_longer_inputs(static) -> None:
    model, srv = static
    long = "hello " * (BUDGET + 88)
    refused = srv.client.post("/embed", json={"inputs": long, "truncate": False})
    assert refused.status_code == 422, refused.text
    assert f"must have less than {BUDGET} tokens" in refused.json()["error"]
    cut = embed(srv, inputs=long, truncate=True)
    # The first BUDGET tokens' mean: what sentence-transformers gives for them alone.
    expected = sentence_transformer(model).encode(["hello " * BUDGET])
    np.testing.assert_allclose(cut, expected, atol=TOL)


def test_tokenize_shows_the_ids_the_model_averages(static) -> None:
    _, srv = static
    for add_special_tokens in (True, False):
        response = srv.client.post("/tokenize", json={
            "inputs": ["hello world", "  "], "add_special_tokens": add_special_tokens})
        assert response.status_code == 200, response.text
        first, empty = response.json()
        assert [t["text"] for t in first] == ["hello", "world"]
        assert not any(t["special"] for t in first) and empty == []


def test_embed_all_is_refused(static) -> None:
    """StaticEmbedding has no token embeddings (sentence-transformers gives none)."""
    _, srv = static
    response = srv.client.post("/embed_all", json={"inputs": "hello world"})
    assert response.status_code == 424, response.text
    assert "not available for static embedding models" in response.json()["error"]


def test_inputs_without_tokens_count_none(static) -> None:
    """The empty bag's stand-in id is the server's, not the input's: x-compute-tokens and the
    OpenAI usage count the tokens /tokenize shows (none for whitespace)."""
    _, srv = static
    response = srv.client.post("/embed", json={"inputs": ["   ", "hello world", "\n"]})
    assert response.status_code == 200, response.text
    assert response.headers["x-compute-tokens"] == "2"
    response = srv.client.post("/v1/embeddings", json={"input": "   "})
    assert response.status_code == 200, response.text
    assert response.json()["usage"] == {"prompt_tokens": 0, "total_tokens": 0}


def test_a_client_cannot_send_the_empty_bags_id(static) -> None:
    """The empty bag's stand-in (the id one past the table, a zero row in the worker) is the
    server's own: sent as a token id it is out of range (422), as any id past the vocabulary,
    and never averaged as zeros."""
    from tokenizers import Tokenizer

    model, srv = static
    vocab = Tokenizer.from_file(str(model / "tokenizer.json")).get_vocab_size()
    for route, body in (("/embed", {"inputs": [[vocab]]}),
                        ("/embed", {"inputs": [[5, vocab]]}),
                        ("/v1/embeddings", {"input": [vocab]}),
                        ("/decode", {"ids": [vocab]})):
        response = srv.client.post(route, json=body)
        assert response.status_code == 422, (route, response.text)
        assert f"token id {vocab} is out of range" in response.text
    assert embed(srv, inputs=[[vocab - 1]]).any()  # the last row is the table's own


def test_a_long_input_is_cut_on_the_files_side(tmp_path_factory) -> None:
    """Where the tokenizer file's truncation is the limit, it cuts on its own side whatever
    the request's truncation_direction: the characters cut before tokenizing (past 250 per
    token) too, or the vector would be the file's first tokens of the text's end."""
    model = make_static(tmp_path_factory.mktemp("cut") / "m", truncate=3, seed=5)
    text = "the weather is " + "hello " * 200  # past 3 x 250 characters
    expected = sentence_transformer(model).encode([text, "the weather is"])
    np.testing.assert_allclose(expected[0], expected[1], atol=TOL)  # the file's first tokens
    with serve_model(model, tmp_path_factory.mktemp("logs")) as srv:
        for direction in ("right", "left"):
            ours = embed(srv, inputs=[text], truncate=True, truncation_direction=direction)
            np.testing.assert_allclose(ours[0], expected[0], atol=TOL)
