"""Tiny random BERTs served by the real `embedserve`: /embed equals sentence-transformers on the
same files, in both sentence-transformers file formats, with Dense modules and default prompts."""

from __future__ import annotations

import json

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



def test_do_lower_case_with_a_cased_tokenizer(tmp_path):
    # sentence_bert_config.json's do_lower_case lower-cases every text before a tokenizer
    # that would not (sentence-transformers adds a Lowercase step to its normalizer).
    model = make_tiny_bert(tmp_path / "model", st_format="classic")
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["normalizer"]["lowercase"] = False
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    settings = json.loads((model / "sentence_bert_config.json").read_text())
    (model / "sentence_bert_config.json").write_text(json.dumps(settings | {"do_lower_case": True}))
    texts = ["Hello World", "The WEATHER is lovely TODAY", "a cat"]

    def tokens(srv, text: str) -> list[dict]:
        return srv.client.post("/tokenize", json={"inputs": text,
                                                  "add_special_tokens": False}).json()[0]

    with serve_model(model, tmp_path) as srv:
        ours = embed(srv, inputs=texts)
        sent, lower = tokens(srv, "Hello World"), tokens(srv, "hello world")
    theirs = st_encode(model, texts)
    assert np.abs(ours - theirs).max() < 1e-5
    # Cased, the capitalised words would be other tokens (the tiny vocabulary is lower case).
    assert np.abs(ours[0] - st_encode(model, ["hello world"])[0]).max() < 1e-5
    # /tokenize shows what is embedded, with offsets into the text as sent.
    assert [t["id"] for t in sent] == [t["id"] for t in lower]
    assert [(t["text"], t["start"]) for t in sent] == [("Hello", 0), ("World", 6)]


def test_dense_without_an_activation_function_is_tanh(tmp_path):
    # A Dense config.json without activation_function (as older or hand-written saves have):
    # sentence-transformers builds its default activation, Tanh.
    model = make_tiny_bert(tmp_path / "model", dense_out=16, st_format="classic")
    config_path = model / "2_Dense" / "config.json"
    config = json.loads(config_path.read_text())
    del config["activation_function"]
    config_path.write_text(json.dumps(config))
    with serve_model(model, tmp_path) as srv:
        ours = embed(srv, inputs=TEXTS)
    assert np.abs(ours - st_encode(model, TEXTS)).max() < 1e-5


def test_truncate_dim_of_the_saved_model(tmp_path):
    # config_sentence_transformers.json's truncate_dim: SentenceTransformer.encode gives that
    # many dimensions unless told otherwise (Normalize runs before the cut: normalize=true is
    # encode's normalize_embeddings=True, normalize=false the cut of the vector before it).
    model = make_tiny_bert(tmp_path / "model", dense_out=16)
    st_path = model / "config_sentence_transformers.json"
    st_path.write_text(json.dumps(json.loads(st_path.read_text()) | {"truncate_dim": 8}))
    st = sentence_transformer(model)
    assert st.get_embedding_dimension() == 8
    with serve_model(model, tmp_path) as srv:
        ours = embed(srv, inputs=TEXTS)
        raw = embed(srv, inputs=TEXTS, normalize=False)
        wider = embed(srv, inputs=TEXTS, dimensions=12)
        full = embed(srv, inputs=TEXTS, dimensions=16, normalize=False)
        info = srv.client.get("/info").json()
        openai = srv.client.post("/v1/embeddings", json={"input": TEXTS}).json()
    assert info["embedding_dimension"] == 8
    assert ours.shape == (len(TEXTS), 8)
    assert np.abs(ours - st.encode(TEXTS, normalize_embeddings=True)).max() < 1e-5
    assert np.abs(ours - np.asarray([d["embedding"] for d in openai["data"]])).max() < 1e-6
    assert np.abs(raw - full[:, :8]).max() < 1e-6
    assert np.abs(
        wider - st.encode(TEXTS, truncate_dim=12, normalize_embeddings=True)).max() < 1e-5
