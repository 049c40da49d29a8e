"""Request inputs -> validated encodings: TEI's rules and messages, with a fake tokenizer pool."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from router.inputs import (
    CHARS_PER_TOKEN_LIMIT,
    InputRules,
    as_input_list,
    check_admissible,
    check_batch_size,
    resolve_prompt,
    tokenize_inputs,
)
from router.tokenization import Encoded
from shared.errors import EmbedServeError, ErrorType

CLS, SEP = 1, 2


def rules(**overrides: Any) -> InputRules:
    values: dict[str, Any] = {"max_input_length": 8, "max_client_batch_size": 4,
                              "vocab_size": 100, "prompts": {}, "default_prompt": None}
    return InputRules(**(values | overrides))


class FakeTokenizers:
    """One token per whitespace-separated word (id = word length + 10), wrapped in CLS/SEP.

    Truncation keeps the special tokens, as a real tokenizer's does.
    """

    conversations = False

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], int | None, str]] = []

    async def encode(self, texts: list[str], max_length: int | None,
                     direction: str, system: str | None = None,
                     special_tokens: bool = True,
                     excluded_prompt: str | None = None) -> list[Encoded]:
        assert system is None, "a prompt goes in front of the text"
        self.calls.append((list(texts), max_length, direction))
        out = []
        for text in texts:
            words = [len(w) + 10 for w in text.split()]
            if max_length is not None and len(words) + 2 > max_length:
                keep = max(max_length - 2, 0)
                words = words[len(words) - keep:] if direction == "left" else words[:keep]
            ids = np.array([CLS, *words, SEP], dtype=np.int32)
            out.append(Encoded(ids, np.zeros_like(ids)))
        return out


def tokenize(
    inputs: list, *, prompt: str | None = None, explicit_prompt: bool = False,
    truncate: bool = False, direction: str = "right", input_rules: InputRules | None = None,
    tokenizers: FakeTokenizers | None = None,
) -> tuple[list[Encoded], int]:
    return asyncio.run(tokenize_inputs(
        inputs, prompt=prompt, explicit_prompt=explicit_prompt, truncate=truncate,
        direction=direction, rules=input_rules or rules(),
        tokenizers=tokenizers or FakeTokenizers(),  # type: ignore[arg-type]
    ))


def error_of(call: Any, *args: Any, **kwargs: Any) -> EmbedServeError:
    with pytest.raises(EmbedServeError) as info:
        call(*args, **kwargs)
    return info.value


# -- as_input_list ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ("a", ["a"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], "b"], [[1, 2], "b"]),
        ([[1], [2, 3]], [[1], [2, 3]]),
        ("", [""]),
    ],
)
def test_as_input_list(inputs: Any, expected: list) -> None:
    assert as_input_list(inputs) == expected


def test_as_input_list_empty_list() -> None:
    refused = error_of(as_input_list, [])
    assert refused.error_type is ErrorType.EMPTY
    assert str(refused) == "Input validation error: `inputs` cannot be empty"  # TEI's words


@pytest.mark.parametrize("inputs", [[1, "a"], ["a", 1], [[1], 2]])
def test_as_input_list_refuses_bare_ids_mixed_with_other_inputs(inputs: list) -> None:
    error = error_of(as_input_list, inputs)
    assert error.error_type is ErrorType.VALIDATION
    assert "mixes bare token ids" in error.message


# -- check_batch_size -------------------------------------------------------------------------


def test_check_batch_size() -> None:
    check_batch_size(4, rules())
    error = error_of(check_batch_size, 5, rules())
    assert error.error_type is ErrorType.VALIDATION
    assert error.message == "batch size 5 > maximum allowed batch size 4"


def test_more_inputs_than_ever_admitted_is_a_422_not_an_endless_429() -> None:
    check_admissible(512, 512)
    error = error_of(check_admissible, 513, 512)
    assert error.error_type is ErrorType.VALIDATION
    assert error.message == ("batch size 513 > maximum concurrent inputs 512 "
                             "(--max-concurrent-requests)")


# -- resolve_prompt ---------------------------------------------------------------------------


def test_resolve_prompt() -> None:
    with_prompts = rules(prompts={"query": "query: ", "passage": "passage: "},
                         default_prompt="passage: ")
    assert resolve_prompt(None, with_prompts) == "passage: "
    assert resolve_prompt(None, rules()) is None
    assert resolve_prompt("query", with_prompts) == "query: "


def test_resolve_prompt_unknown_name_lists_the_prompts() -> None:
    error = error_of(resolve_prompt, "doc", rules(prompts={"query": "q", "passage": "p"}))
    assert error.error_type is ErrorType.VALIDATION
    assert "`doc`" in error.message
    # As TEI writes the list: tei-client parses the names back out of this message.
    assert error.message.endswith('Available prompts: ["passage", "query"]')


def test_resolve_prompt_without_prompts() -> None:
    error = error_of(resolve_prompt, "query", rules())
    assert error.error_type is ErrorType.VALIDATION
    assert "no prompts were found" in error.message


# -- tokenize_inputs: texts -------------------------------------------------------------------


def test_texts_are_tokenized_in_one_call_in_order() -> None:
    pool = FakeTokenizers()
    encoded, characters = tokenize(["hi there", "a"], tokenizers=pool)
    assert [e.ids.tolist() for e in encoded] == [[CLS, 12, 15, SEP], [CLS, 11, SEP]]
    assert pool.calls == [(["hi there", "a"], None, "right")]
    assert characters == len("hi there") + len("a")


def test_prompt_is_prepended_to_texts() -> None:
    pool = FakeTokenizers()
    tokenize(["hello"], prompt="query: ", tokenizers=pool)
    assert pool.calls[0][0] == ["query: hello"]


def test_a_conversation_model_gets_the_prompt_as_its_system_message() -> None:
    systems: list[tuple[list, str | None]] = []

    class Conversations:
        conversations = True

        async def encode(self, texts: list, max_length: int | None, direction: str,
                         system: str | None = None,
                         special_tokens: bool = True,
                         excluded_prompt: str | None = None) -> list[Encoded]:
            systems.append((list(texts), system))
            ids = np.array([CLS, SEP], dtype=np.int32)
            return [Encoded(ids, np.zeros_like(ids)) for _ in texts]

    tokenize(["hello", ("q", "d")], prompt="judge: ",
             tokenizers=Conversations())  # type: ignore[arg-type]
    assert systems == [(["hello", ("q", "d")], "judge: ")]  # nothing prepended
    # An empty prompt is no system message (sentence-transformers adds one only for a
    # non-empty prompt; a Qwen-style template would render an empty system turn).
    systems.clear()
    tokenize([("q", "d")], prompt="", tokenizers=Conversations())  # type: ignore[arg-type]
    assert systems == [([("q", "d")], None)]


def test_a_default_prompt_goes_before_the_query_of_a_pair() -> None:
    # (sentence-transformers' CrossEncoder: its prompt is prepended to a pair's first text)
    seen: list[list] = []

    class Plain:
        conversations = False

        async def encode(self, texts: list, max_length: int | None, direction: str,
                         system: str | None = None,
                         special_tokens: bool = True,
                         excluded_prompt: str | None = None) -> list[Encoded]:
            seen.append(list(texts))
            ids = np.array([CLS, SEP], dtype=np.int32)
            return [Encoded(ids, np.zeros_like(ids)) for _ in texts]

    _, characters = tokenize([("q", "d"), "t"], prompt="rank: ",
                             tokenizers=Plain())  # type: ignore[arg-type]
    tokenize([("q", "d")], prompt="", tokenizers=Plain())  # type: ignore[arg-type]
    assert seen == [[("rank: q", "d"), "rank: t"], [("q", "d")]]
    assert characters == 3  # the client's characters, as for single texts


@pytest.mark.parametrize("direction", ["left", "right"])
def test_truncating_texts_asks_the_tokenizer_to_cut(direction: str) -> None:
    pool = FakeTokenizers()
    encoded, _ = tokenize(["a bb ccc dddd eeeee ffffff ggggggg hhhhhhhh iiiiiiiii"],
                          truncate=True, direction=direction, tokenizers=pool)
    assert pool.calls[0][1:] == (8, direction)
    assert encoded[0].ids.shape[0] == 8


def test_too_long_text_without_truncation() -> None:
    error = error_of(tokenize, [" ".join(["w"] * 9)])  # 9 words + 2 specials
    assert error.error_type is ErrorType.VALIDATION
    assert "`inputs` must have less than 8 tokens. Given: 11" in error.message


def test_text_of_exactly_the_limit_is_accepted() -> None:
    encoded, _ = tokenize([" ".join(["w"] * 6)])
    assert encoded[0].ids.shape[0] == 8


def test_empty_text() -> None:
    error = error_of(tokenize, ["ok", ""])
    assert error.error_type is ErrorType.EMPTY


def test_character_limit_without_truncation() -> None:
    limit = 8 * CHARS_PER_TOKEN_LIMIT
    pool = FakeTokenizers()
    error = error_of(tokenize, ["x" * (limit + 1)], tokenizers=pool)
    assert error.error_type is ErrorType.VALIDATION
    assert f"less than {limit} characters. Given: {limit + 1}" in error.message
    assert pool.calls == []  # refused before the tokenizer is bothered


@pytest.mark.parametrize(("direction", "kept"), [("right", "a"), ("left", "b")])
def test_character_limit_with_truncation_cuts_on_the_side(direction: str, kept: str) -> None:
    limit = 8 * CHARS_PER_TOKEN_LIMIT
    pool = FakeTokenizers()
    text = "a" * limit + "b" * 10 if direction == "right" else "a" * 10 + "b" * limit
    tokenize([text], truncate=True, direction=direction, tokenizers=pool)
    sent = pool.calls[0][0][0]
    assert sent == kept * limit


def test_text_at_the_character_limit_is_not_cut() -> None:
    limit = 8 * CHARS_PER_TOKEN_LIMIT
    pool = FakeTokenizers()
    tokenize(["x" * limit], truncate=True, tokenizers=pool)
    assert pool.calls[0][0][0] == "x" * limit


def test_text_at_the_character_limit_is_accepted_without_truncation() -> None:
    """The bound refuses only texts *over* it, whether or not a cut would be allowed."""
    encoded, _ = tokenize(["x" * (8 * CHARS_PER_TOKEN_LIMIT)])
    assert encoded[0].ids.tolist() == [CLS, 10 + 8 * CHARS_PER_TOKEN_LIMIT, SEP]


def test_the_models_truncation_side_overrides_the_requests() -> None:
    """A static model cuts on its tokenizer file's side whatever `truncation_direction` says:
    texts and token ids alike."""
    pool = FakeTokenizers()
    left = rules(truncation_side="left")
    encoded, _ = tokenize(["a b", list(range(10, 20))], truncate=True, direction="right",
                          input_rules=left, tokenizers=pool)
    assert pool.calls[0][2] == "left"
    assert encoded[1].ids.tolist() == list(range(12, 20))


def test_a_pair_with_one_empty_text_is_accepted() -> None:
    """As in TEI, a pair is empty only when both of its texts are."""
    class Pairs(FakeTokenizers):
        async def encode(self, texts: list, *args: Any, **kwargs: Any) -> list[Encoded]:
            return await super().encode([" ".join(t) for t in texts], *args, **kwargs)

    encoded, _ = tokenize([("", "doc"), ("query", "")], tokenizers=Pairs())
    assert [e.ids.tolist() for e in encoded] == [[CLS, 13, SEP], [CLS, 15, SEP]]
    assert error_of(tokenize, [("", "")]).error_type is ErrorType.EMPTY



def test_a_pair_cut_at_the_character_limit_counts_the_clients_characters() -> None:
    """As a single text does, and as TEI counts a pair's compute_chars (gRPC Rerank and
    PredictPair Metadata, x-compute-characters): the texts sent, not what is left of them
    after the character cut."""
    class Pairs(FakeTokenizers):
        async def encode(self, texts: list, *args: Any, **kwargs: Any) -> list[Encoded]:
            return await super().encode([" ".join(t) for t in texts], *args, **kwargs)

    long = "x" * (8 * CHARS_PER_TOKEN_LIMIT + 100)
    _, characters = tokenize([("q", long), long], truncate=True, tokenizers=Pairs())
    assert characters == 1 + len(long) + len(long)

# -- tokenize_inputs: token ids ---------------------------------------------------------------


def test_token_ids_are_used_as_given() -> None:
    pool = FakeTokenizers()
    encoded, characters = tokenize([[5, 0, 99]], tokenizers=pool)
    assert encoded[0].ids.tolist() == [5, 0, 99]
    assert encoded[0].ids.dtype == np.int32
    assert encoded[0].type_ids.tolist() == [0, 0, 0]
    assert encoded[0].type_ids.dtype == np.int32
    assert pool.calls == []
    assert characters == 3


@pytest.mark.parametrize("bad", [-1, 100, 12345])
def test_token_id_out_of_range(bad: int) -> None:
    error = error_of(tokenize, [[3, bad, 4]])
    assert error.error_type is ErrorType.VALIDATION
    assert f"token id {bad} is out of range" in error.message
    assert "100" in error.message


def test_token_id_beyond_int64_is_a_validation_error() -> None:
    error = error_of(tokenize, [[3, 2**63]])
    assert error.error_type is ErrorType.VALIDATION
    assert str(2**63) in error.message


@pytest.mark.parametrize(("direction", "expected"),
                         [("right", list(range(10, 18))), ("left", list(range(12, 20)))])
def test_token_ids_truncation(direction: str, expected: list[int]) -> None:
    encoded, _ = tokenize([list(range(10, 20))], truncate=True, direction=direction)
    assert encoded[0].ids.tolist() == expected


def test_too_many_token_ids_without_truncation() -> None:
    error = error_of(tokenize, [list(range(10, 20))])
    assert error.error_type is ErrorType.VALIDATION
    assert "`inputs` must have less than 8 tokens. Given: 10" in error.message


def test_token_ids_of_exactly_the_limit_are_accepted() -> None:
    encoded, _ = tokenize([list(range(8))])
    assert encoded[0].ids.tolist() == list(range(8))


def test_empty_token_id_list() -> None:
    assert error_of(tokenize, [[]]).error_type is ErrorType.EMPTY


def test_explicit_prompt_with_token_ids_is_refused() -> None:
    error = error_of(tokenize, [[1, 2]], prompt="query: ", explicit_prompt=True)
    assert error.error_type is ErrorType.VALIDATION
    assert "prompt_name" in error.message


def test_default_prompt_leaves_token_ids_alone() -> None:
    pool = FakeTokenizers()
    encoded, _ = tokenize([[7, 8], "hi"], prompt="query: ", tokenizers=pool)
    assert encoded[0].ids.tolist() == [7, 8]
    assert pool.calls[0][0] == ["query: hi"]


def test_mixed_inputs_keep_their_order() -> None:
    encoded, _ = tokenize(["aaa", [50, 51], "b", [60]])
    assert [e.ids.tolist() for e in encoded] == [
        [CLS, 13, SEP], [50, 51], [CLS, 11, SEP], [60]]


def test_tokenizer_errors_propagate() -> None:
    class Broken:
        conversations = False

        async def encode(self, texts: list[str], max_length: int | None,
                         direction: str, system: str | None = None,
                         special_tokens: bool = True,
                         excluded_prompt: str | None = None) -> list[Encoded]:
            raise EmbedServeError(ErrorType.TOKENIZER, "boom")

    with pytest.raises(EmbedServeError) as info:
        asyncio.run(tokenize_inputs(["x"], prompt=None, explicit_prompt=False, truncate=False,
                                    direction="right", rules=rules(),
                                    tokenizers=Broken()))  # type: ignore[arg-type]
    assert info.value.error_type is ErrorType.TOKENIZER


def test_a_trailing_run_of_the_pad_id_is_dropped_for_scoring() -> None:
    from router.inputs import without_trailing
    from shared.classifier import scored_before

    def enc(*ids: int) -> Encoded:
        array = np.array(ids, dtype=np.int32)
        return Encoded(array, np.zeros_like(array))

    assert without_trailing(enc(5, 6, 9, 9), 9).ids.tolist() == [5, 6]
    assert without_trailing(enc(9, 5, 6), 9).ids.tolist() == [9, 5, 6]  # only at the end
    assert without_trailing(enc(9, 9), 9).ids.tolist() == [9]  # transformers scores the first
    qwen = {"model_type": "qwen3", "pad_token_id": 9}
    assert scored_before(qwen, "classifier") == 9
    assert scored_before(qwen, "embedding") is None
    assert scored_before(qwen | {"is_causal": False}, "reranker") is None
    assert scored_before({"model_type": "bert", "pad_token_id": 0}, "classifier") is None
    assert scored_before({"model_type": "llama"}, "classifier") is None
