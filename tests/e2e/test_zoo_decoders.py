"""A tiny Qwen3 embedder (Qwen3-Embedding's shape: GQA, head_dim, q/k norms, last-token
pooling, a tokenizer that appends <|endoftext|> and pads on the left, an instruction prompt)
served by the real `embedserve`: /embed equals sentence-transformers on the same files."""

from __future__ import annotations

import numpy as np
import pytest

from tests.e2e.zoo import embed, sentence_transformer, serve_model
from tests.fixtures.decoders import make_st_decoder
from tests.fixtures.oracles import cosine_rows

PROMPTS = {"query": "Instruct: Given a web search query, retrieve relevant passages\nQuery:"}
TEXTS = [
    "hello world",
    "the weather is lovely today",
    "a cat",
    # Longer than the model's 128 tokens: truncation must keep the end-of-text token last.
    "a long passage about dogs at night, " * 12,
]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    model = make_st_decoder(tmp_path_factory.mktemp("zoo") / "qwen3", "qwen3",
                            pooling="lasttoken", overrides={"head_dim": 16}, prompts=PROMPTS)
    with serve_model(model, tmp_path_factory.mktemp("logs"), 1024) as srv:
        yield model, srv


def st_encode(model, texts, **kwargs) -> np.ndarray:
    st = sentence_transformer(model)
    assert st.tokenizer.padding_side == "left"
    return st.encode(texts, **kwargs)


@pytest.mark.parametrize("prompt_name", [None, "query"])
def test_embed_equals_sentence_transformers(qwen3, prompt_name) -> None:
    model, srv = qwen3
    ours = embed(srv, inputs=TEXTS, prompt_name=prompt_name)
    theirs = st_encode(model, TEXTS, prompt_name=prompt_name)
    assert ours.shape == theirs.shape == (len(TEXTS), 32)
    assert cosine_rows(ours, theirs).min() >= 0.9999
    assert np.abs(ours - theirs).max() < 1e-4


def test_the_end_of_text_token_is_appended(qwen3) -> None:
    _, srv = qwen3
    response = srv.client.post("/tokenize", json={"inputs": "a cat"})
    assert response.status_code == 200, response.text
    last = response.json()[0][-1]
    assert last["text"] == "<|endoftext|>" and last["special"] is True


def test_info_reports_last_token_pooling(qwen3) -> None:
    _, srv = qwen3
    info = srv.client.get("/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "last_token"}}
    assert info["max_input_length"] == 128


def test_a_classifier_does_not_score_the_appended_pad_token(tmp_path) -> None:
    """A decoder classifier whose config names as padding the <|endoftext|> its tokenizer
    appends (a Qwen3-Embedding fine-tune's): transformers, and CrossEncoder with it, scores
    the token before it; so does /predict."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from tests.fixtures.decoders import decoder_vocab, make_decoder_dir

    pad = decoder_vocab()["<|endoftext|>"]
    model = make_decoder_dir(tmp_path / "m", "qwen3", architecture="Qwen3ForSequenceClassification",
                             overrides={"pad_token_id": pad, "num_labels": 3})
    hf = AutoModelForSequenceClassification.from_pretrained(str(model)).eval()
    with serve_model(model, tmp_path) as srv:
        for text in TEXTS[:3]:
            tokens = srv.client.post("/tokenize", json={"inputs": text}).json()[0]
            ids = [token["id"] for token in tokens]
            assert ids[-1] == pad  # appended, and the config's pad
            with torch.no_grad():
                expected = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
            response = srv.client.post("/predict", json={"inputs": text, "raw_scores": True})
            assert response.status_code == 200, response.text
            ours = sorted(response.json(), key=lambda p: p["label"])
            assert np.abs(np.array([p["score"] for p in ours]) - expected).max() < 1e-4
