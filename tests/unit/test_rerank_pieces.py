"""Re-rank with `max_chunks_per_doc` (router/operations.py) against a stand-in service: what
goes to the tokenizer and the model, how a text's score is its best piece's, and the bounds."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from router import operations
from router.admission import Admission
from router.inputs import CHARS_PER_TOKEN_LIMIT, InputRules
from router.results import Outcome, Timings
from router.tokenization import Chunked
from shared.errors import EmbedServeError, ErrorType, Field, about

MODEL = SimpleNamespace(activation="identity")


class Service:
    """What `operations.rerank` asks of an InferenceService: each piece scores as `scores`
    says, and every call is recorded."""

    def __init__(self, pieces: list[list[str]], scores: dict[str, float], *,
                 default_prompt: str | None = None, concurrent: int = 16,
                 conversations: bool = False, fail_at: int | None = None) -> None:
        self.rules = InputRules(max_input_length=16, max_client_batch_size=16, vocab_size=100,
                                prompts={}, default_prompt=default_prompt)
        self.max_concurrent_requests = concurrent
        self.admission = Admission(concurrent)
        self.scores = scores
        self.fail_at = fail_at
        self.chunked: list[tuple] = []
        self.ran: list[list] = []
        self.kept: list[int] = []
        service = self

        class Tokenizers:
            async def chunks(self, query: str, texts: list[str], max_length: int,
                             limit: int) -> Chunked:
                service.chunked.append((query, texts, max_length, limit))
                return Chunked(4, pieces)

            async def kept_tokens(self, texts: list[str], count: int,
                                  direction: str) -> list[str]:
                service.kept.append(count)
                return [text[:count] for text in texts]

            async def decode(self, ids: list[list[int]], skip: bool) -> list[str]:
                return [" ".join(map(str, row)) for row in ids]

        self.tokenizers = Tokenizers()
        self.tokenizers.conversations = conversations  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def refusals_counted(self) -> Any:
        yield

    def require(self, kind: str) -> None:
        pass

    async def run(self, inputs: list, output: Any, **options: Any) -> Outcome:
        self.ran.append(inputs)
        if self.fail_at is not None:
            raise about(Field("inputs", self.fail_at), ErrorType.VALIDATION,
                        "{field} is too long")
        rows = [np.array([self.scores[text]], dtype=np.float32) for _, text in inputs]
        return Outcome(rows, Timings(0, 0, 0.0, 0.0, 0.0, 0.0))


def rerank(service: Service, texts: list[str], max_chunks: int) -> np.ndarray:
    scores, _ = asyncio.run(operations.rerank(
        service, MODEL, "q", texts, truncate=True, direction="right",  # type: ignore[arg-type]
        raw_scores=True, max_chunks=max_chunks))
    return scores


def test_a_text_scores_as_its_best_piece() -> None:
    # The best piece is first, in the middle or last; the last text has one piece.
    pieces = [["a", "b", "c"], ["d", "e"], ["f", "g"], ["h"]]
    scores = {"a": 1.0, "b": 5.0, "c": 2.0, "d": -1.0, "e": -2.0, "f": 0.0, "g": 7.0,
              "h": 3.0}
    service = Service(pieces, scores)
    assert rerank(service, ["A", "D", "F", "H"], 3).tolist() == [5.0, -1.0, 7.0, 3.0]
    assert service.ran == [[("q", piece) for piece in "abcdefgh"]]


def test_pieces_fit_beside_the_query_as_it_is_prompted() -> None:
    # The chunks are cut beside the default prompt and query; the pairs carry the bare query
    # (the prompt is put on by `run`).
    service = Service([["a"]], {"a": 1.0}, default_prompt="query: ")
    rerank(service, ["A"], 2)
    assert service.chunked == [("query: q", ["A"], 16, 2)]
    assert service.ran == [[("q", "a")]]


def test_only_what_the_pieces_can_hold_is_tokenized() -> None:
    # 16 tokens x 3 pieces x the characters a token may hold: the rest is never tokenized.
    bound = 16 * 3 * CHARS_PER_TOKEN_LIMIT
    service = Service([["a"]], {"a": 1.0})
    rerank(service, ["x" * (bound + 10)], 3)
    assert [len(text) for text in service.chunked[0][1]] == [bound]


def test_as_many_pieces_as_the_server_scores_at_once_are_accepted() -> None:
    pieces = [["a", "b"], ["c", "d"]]
    scores = dict.fromkeys("abcd", 1.0)
    assert rerank(Service(pieces, scores, concurrent=4), ["A", "C"], 2).tolist() == [1.0, 1.0]
    with pytest.raises(EmbedServeError, match="makes 4 pieces"):
        rerank(Service(pieces, scores, concurrent=3), ["A", "C"], 2)


def test_an_error_about_a_piece_names_its_text() -> None:
    # Piece 3 (of 0-1 | 2-3 | 4) is the second text's.
    pieces = [["a", "b"], ["c", "d"], ["e"]]
    with pytest.raises(EmbedServeError) as info:
        rerank(Service(pieces, {}, fail_at=3), ["A", "C", "E"], 2)
    assert info.value.field == Field("inputs", 1)


def test_one_chunk_per_text_scores_the_pair_as_it_is() -> None:
    # max_chunks_per_doc 1 (Cohere's default) is a plain re-rank: no pieces are cut, and a
    # model whose pairs go through a chat template is not refused.
    service = Service([["never"]], {"A": 2.0}, conversations=True)
    assert rerank(service, ["A"], 1).tolist() == [2.0]
    assert service.chunked == [] and service.ran == [[("q", "A")]]
    with pytest.raises(EmbedServeError, match="not supported for this model"):
        rerank(service, ["A"], 2)


def test_decode_takes_every_id_of_the_vocabulary_and_none_past_it() -> None:
    service = Service([], {})  # 100 ids: 0-99
    decoded = asyncio.run(operations.decode(service, [[0, 99]],  # type: ignore[arg-type]
                                            skip_special_tokens=False))
    assert decoded == ["0 99"]
    for bad in (100, -1):
        with pytest.raises(EmbedServeError, match=f"token id {bad} is out of range"):
            asyncio.run(operations.decode(service, [[5, bad]],  # type: ignore[arg-type]
                                          skip_special_tokens=False))


def test_combined_timings_add_counts_and_average_times() -> None:
    parts = [Timings(10, 4, 1.0, 2.0, 3.0, admitted_at=7.0),
             Timings(20, 6, 3.0, 4.0, 5.0, admitted_at=5.0)]
    assert operations.combined(parts) == Timings(30, 10, 2.0, 3.0, 4.0, admitted_at=5.0)


def test_a_plain_rerank_activates_its_scores_unless_raw() -> None:
    service = Service([], {"A": 0.0, "B": 2.0})
    for raw, expected in ((False, [0.5, 1 / (1 + np.exp(-2.0))]), (True, [0.0, 2.0])):
        scores, _ = asyncio.run(operations.rerank(
            service, SimpleNamespace(activation="sigmoid"), "q",  # type: ignore[arg-type]
            ["A", "B"], truncate=True, direction="right", raw_scores=raw))
        assert np.allclose(scores, expected)


def test_max_tokens_cuts_only_below_the_models_limit() -> None:
    # At the limit (16 here) the pair's own truncation is the cut: no extra tokenizing.
    service = Service([], {"A": 1.0, "AB": 1.0, "ABC": 1.0})
    for max_tokens in (16, 17):
        asyncio.run(operations.rerank(
            service, MODEL, "q", ["ABC"], truncate=True,  # type: ignore[arg-type]
            direction="right", raw_scores=True, max_tokens=max_tokens))
    assert service.kept == []
    asyncio.run(operations.rerank(
        service, MODEL, "q", ["ABC"], truncate=True, direction="right",  # type: ignore[arg-type]
        raw_scores=True, max_tokens=2))
    assert service.kept == [2] and service.ran[-1] == [("q", "AB")]


def test_tokenize_refuses_an_empty_text_among_others() -> None:
    with pytest.raises(EmbedServeError, match="cannot be empty"):
        asyncio.run(operations.tokenize(Service([], {}), ["a", ""],  # type: ignore[arg-type]
                                        add_special_tokens=True, prompt_name=None))
