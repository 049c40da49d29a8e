"""A Pooling that leaves the prompt out (sentence-transformers' include_prompt=false): the
router's tokenization says where each input's pooling starts and the worker's Pooler starts
there, for every pooling mode, equal to SentenceTransformer.encode with the prompt."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from backend_worker.engine import Engine
from router import tokenization
from router.tokenization import Encoded
from shared.modelinfo import load_model_info
from shared.protocol import BatchArrays
from tests.fixtures.oracles import cosine_rows
from tests.fixtures.tiny import make_tiny_bert

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = {"query": "query: ", "instruct": "Represent the scientific title for retrieval: "}
TEXTS = ["hello world", "a", "the quick brown fox jumps over the lazy dog " * 3,
         "naïve café, punctuation?!"]
MODES = ["mean", "cls", "max", "lasttoken", "weightedmean", "mean_sqrt_len_tokens"]


@pytest.fixture(scope="module", params=MODES)
def model_dir(request, tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("st") / request.param, pooling=request.param,
                          prompts=PROMPTS, include_prompt=False, seed=5)


def encode(model_dir: Path, texts: list[str], prompt: str | None, max_length: int) -> list[Encoded]:
    """As a pool process encodes them (restoring this process's tokenizer after: a loaded one
    would make later tests in this process tokenize short texts inline with it)."""
    before = tokenization._tokenizer
    tokenization._load(str(model_dir / "tokenizer.json"))
    try:
        prompted = [(prompt or "") + text for text in texts]
        outcome = tokenization._encode(prompted, max_length, "right", None, True, prompt)
    finally:
        tokenization._tokenizer = before
    assert outcome.error is None
    return outcome.value


def pack(encoded: list[Encoded]) -> BatchArrays:
    lengths = [len(e.ids) for e in encoded]
    return BatchArrays(
        np.concatenate([e.ids for e in encoded]).astype(np.int32),
        np.concatenate([np.arange(n) for n in lengths]).astype(np.int32),
        np.concatenate([e.type_ids for e in encoded]).astype(np.int32),
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
    )


def st_vectors(model_dir: Path, texts: list[str], prompt_name: str | None) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    assert model[1].include_prompt is False
    unnormalized = SentenceTransformer(modules=list(model)[:-1], prompts=PROMPTS, device="cpu")
    return unnormalized.encode(texts, prompt_name=prompt_name, convert_to_numpy=True)


@pytest.mark.parametrize("prompt_name", sorted(PROMPTS))
def test_pooling_leaves_the_prompt_out_as_sentence_transformers(model_dir, prompt_name):
    info = load_model_info(model_dir)
    assert not info.include_prompt
    engine = Engine.load(info)
    encoded = encode(model_dir, TEXTS, PROMPTS[prompt_name], info.max_input_length)
    assert all(e.pool_from > 0 for e in encoded)
    ours = engine.embed(pack(encoded), [e.pool_from for e in encoded])
    theirs = st_vectors(model_dir, TEXTS, prompt_name)
    assert cosine_rows(ours, theirs).min() >= 0.99999
    assert np.abs(ours - theirs).max() <= 1e-5


def test_prompted_and_plain_inputs_share_a_batch(model_dir):
    """One batch mixes inputs with and without an excluded prompt (different requests)."""
    info = load_model_info(model_dir)
    engine = Engine.load(info)
    prompted = encode(model_dir, TEXTS[:2], PROMPTS["query"], info.max_input_length)
    plain = encode(model_dir, TEXTS[2:], None, info.max_input_length)
    assert all(e.pool_from == 0 for e in plain)
    both = prompted + plain
    ours = engine.embed(pack(both), [e.pool_from for e in both])
    theirs = np.concatenate([st_vectors(model_dir, TEXTS[:2], "query"),
                             st_vectors(model_dir, TEXTS[2:], None)])
    assert np.abs(ours - theirs).max() <= 1e-5


def test_a_prompt_that_ends_with_a_special_token_without_a_trailing_one(tmp_path):
    """A decoder's tokenizer that adds only a BOS: the prompt's own last token, a special one
    (<eos> here), is what sentence-transformers leaves out of its count, where the tokenizer's
    special_tokens_mask marks only the BOS."""
    from sentence_transformers import SentenceTransformer

    from tests.fixtures.decoders import GEMMA_STYLE, make_st_decoder, set_json

    prompts = {"q": "query: <eos>"}
    root = make_st_decoder(tmp_path / "bos", "qwen2", pooling="mean", style=GEMMA_STYLE,
                           prompts=prompts, seed=3)
    tok = json.loads((root / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "<bos>", "type_id": 0}}
    tok["post_processor"] = {
        "type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<bos>": tok["post_processor"]["special_tokens"]["<bos>"]}}
    (root / "tokenizer.json").write_text(json.dumps(tok))
    set_json(root / "1_Pooling" / "config.json", include_prompt=False)
    info = load_model_info(root)
    encoded = encode(root, TEXTS, prompts["q"], info.max_input_length)
    ours = Engine.load(info).embed(pack(encoded), [e.pool_from for e in encoded])
    model = SentenceTransformer(str(root), device="cpu")
    unnormalized = SentenceTransformer(modules=list(model)[:-1], prompts=prompts, device="cpu")
    theirs = unnormalized.encode(TEXTS, prompt_name="q", convert_to_numpy=True)
    assert [e.pool_from for e in encoded] == [7] * len(TEXTS)  # <bos> query : (not <eos>)
    assert np.abs(ours - theirs).max() <= 1e-5


@pytest.mark.parametrize("pool_from", [[5, 0], [0, 7], [-1, 0], [1]],
                         ids=["all-prompt-first", "all-prompt-last", "negative", "one-short"])
def test_a_start_outside_its_sequence_is_refused(tmp_path, pool_from):
    """A prompt as long as its input would leave nothing to pool (a mean of no tokens)."""
    engine = Engine.load(load_model_info(make_tiny_bert(tmp_path / "m", pooling="mean")))
    arrays = BatchArrays(np.arange(5, 17, dtype=np.int32),
                         np.concatenate([np.arange(5), np.arange(7)]).astype(np.int32),
                         np.zeros(12, dtype=np.int32), np.array([0, 5, 12], dtype=np.int32))
    engine.embed(arrays, [4, 6])  # the last token of each is still pooled
    with pytest.raises(ValueError, match="pool_from needs one start per sequence, each inside"):
        engine.embed(arrays, pool_from)
