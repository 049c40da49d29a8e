"""The shapes /predict and /rerank inputs take, the `dimensions` bounds, the pad run a
decoder classifier's input loses, and the character bound on pairs (router/inputs.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from router.inputs import (
    CHARS_PER_TOKEN_LIMIT,
    InputRules,
    as_predict_list,
    check_dimensions,
    tokenize_inputs,
    without_trailing,
)
from router.tokenization import Encoded
from shared.errors import EmbedServeError, ErrorType


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ("a", ["a"]),
        (["a"], ["a"]),
        (["query", "doc"], [("query", "doc")]),  # a pair, in its order
        ([["a"], ["q", "d"]], ["a", ("q", "d")]),
    ],
)
def test_predict_inputs_read_as_tei_reads_them(inputs: Any, expected: list) -> None:
    """`["a", "b"]` is one pair (query first), not two texts: a classifier of pairs scores
    (a, b), and swapped texts give another score."""
    assert as_predict_list(inputs) == expected


def test_a_predict_input_of_three_texts_is_refused() -> None:
    with pytest.raises(EmbedServeError) as info:
        as_predict_list([["a", "b", "c"]])
    assert info.value.error_type is ErrorType.VALIDATION


@pytest.mark.parametrize("dimensions", [None, 1, 16])
def test_dimensions_up_to_the_embedding_width_are_accepted(dimensions: int | None) -> None:
    check_dimensions(dimensions, 16)  # 16: the whole vector, as asked


@pytest.mark.parametrize(("dimensions", "words"),
                         [(0, "should be positive"), (-1, "should be positive"),
                          (17, "smaller than the maximum")])
def test_dimensions_out_of_bounds_are_refused(dimensions: int, words: str) -> None:
    with pytest.raises(EmbedServeError) as info:
        check_dimensions(dimensions, 16)
    assert info.value.error_type is ErrorType.VALIDATION
    assert words in info.value.message


def test_dropping_a_trailing_pad_run_keeps_type_ids_and_pool_start_aligned() -> None:
    """The type ids are cut with the ids (the worker packs them side by side) and the
    pooling start stays what it was."""
    ids = np.array([5, 6, 7, 9, 9], dtype=np.int32)
    types = np.array([0, 0, 1, 1, 1], dtype=np.int32)
    cut = without_trailing(Encoded(ids, types, 1), 9)
    assert cut.ids.tolist() == [5, 6, 7]
    assert cut.type_ids.tolist() == [0, 0, 1]
    assert cut.pool_from == 1


class Recorder:
    """A tokenizer pool that records the texts it is sent (one token each)."""

    conversations = False

    def __init__(self) -> None:
        self.sent: list = []

    async def encode(self, texts: list, *args: Any, **kwargs: Any) -> list[Encoded]:
        self.sent.extend(texts)
        ids = np.array([1], dtype=np.int32)
        return [Encoded(ids, np.zeros_like(ids)) for _ in texts]


def tokenize_pair(pair: tuple[str, str], truncate: bool, pool: Recorder) -> None:
    rules = InputRules(max_input_length=2, max_client_batch_size=4, vocab_size=100,
                       prompts={}, default_prompt=None)
    asyncio.run(tokenize_inputs([pair], prompt=None, explicit_prompt=False, truncate=truncate,
                                direction="left", rules=rules,
                                tokenizers=pool))  # type: ignore[arg-type]


def test_each_text_of_a_pair_is_held_to_the_character_bound() -> None:
    """The bound that spares the tokenizer a huge body applies to both texts of a pair: cut
    on the asked side when truncating, else refused naming the input."""
    limit = 2 * CHARS_PER_TOKEN_LIMIT
    pool = Recorder()
    tokenize_pair(("q", "a" * 5 + "b" * limit), True, pool)
    assert pool.sent == [("q", "b" * limit)]
    with pytest.raises(EmbedServeError) as info:
        tokenize_pair(("a" * (limit + 1), "d"), False, pool)
    assert f"Given: {limit + 1}" in info.value.message
