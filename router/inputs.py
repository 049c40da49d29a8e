"""Turning a request's `inputs` into validated, tokenized entries (TEI's rules and messages)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from router.tokenization import Encoded, TokenizerPool
from shared.errors import (
    TEI_BACKEND,
    BatchSizeError,
    EmbedServeError,
    ErrorType,
    Field,
    about,
    validation,
)

INPUTS = Field("inputs")
PROMPT_NAME = Field("prompt_name")
NORMALIZE = Field("normalize")
DIMENSIONS = Field("dimensions")
# TEI's words for an empty input (clients match on them); {field} is where another API differs.
EMPTY = "Input validation error: {field} cannot be empty"

# TEI refuses (or cuts, when truncating) texts longer than this many characters per allowed
# token before tokenizing, so a huge body cannot keep a tokenizer busy for seconds.
CHARS_PER_TOKEN_LIMIT = 250


@dataclass(frozen=True)
class InputRules:
    max_input_length: int
    max_client_batch_size: int
    vocab_size: int
    prompts: dict[str, str]
    default_prompt: str | None
    # The side every cut is made on, whatever a request asks (a static model whose tokenizer
    # file's truncation is the limit: StaticEmbedding cuts there on the file's side).
    truncation_side: str | None = None
    # The model's Pooling leaves the prompt's tokens out (sentence-transformers'
    # include_prompt=false): each prompted text says where its pooling starts.
    exclude_prompt: bool = False
    # A decoder classifier's pad id, which transformers does not score: a trailing run of it
    # is dropped from what the worker scores (shared/classifier.py scored_before).
    scored_before: int | None = None


def without_trailing(encoded: Encoded, token_id: int) -> Encoded:
    """`encoded` less its trailing run of `token_id` (its first token always kept, which is
    what transformers scores when every token is that id)."""
    end = len(encoded.ids)
    while end > 1 and encoded.ids[end - 1] == token_id:
        end -= 1
    if end == len(encoded.ids):
        return encoded
    return Encoded(encoded.ids[:end], encoded.type_ids[:end], encoded.pool_from)


def is_batch(inputs: str | list) -> bool:
    """TEI's reading of `inputs` (its te_request_count `method`): a list of inputs is a batch,
    of one too; a text or one list of token ids is a single input."""
    return not (isinstance(inputs, str) or (bool(inputs) and all(isinstance(x, int)
                                                                 for x in inputs)))


def is_predict_batch(inputs: str | list) -> bool:
    """/predict's: a list of texts and pairs (`[["a"], ["b", "c"]]`) is a batch; a text, a
    `[text]` and a pair are one input."""
    return isinstance(inputs, list) and bool(inputs) and all(isinstance(x, list) for x in inputs)


def as_input_list(inputs: str | list) -> list[str | list[int]]:
    """`"a"` / `["a", "b"]` / `[1, 2]` / `[[1, 2], "b"]` -> a list of single inputs."""
    if not is_batch(inputs):
        return [inputs]
    assert isinstance(inputs, list)  # (a text is never a batch)
    if not inputs:
        raise about(INPUTS, ErrorType.EMPTY, EMPTY)
    if any(isinstance(x, int) for x in inputs):
        raise about(INPUTS, ErrorType.VALIDATION,
                    "{field} must be a text, a list of token ids, or a list of texts and "
                    "token-id lists; it mixes bare token ids with other inputs")
    return inputs


Pair = tuple[str, str]


def as_predict_list(inputs: str | list) -> list[str | Pair]:
    """TEI's /predict shapes: `"a"`, `["a"]` and `["a", "b"]` (a pair) are one input;
    `[["a"], ["b", "c"]]` is a batch of single texts and pairs."""
    if isinstance(inputs, str):
        return [inputs]
    if not inputs:
        raise about(INPUTS, ErrorType.EMPTY, EMPTY)
    if all(isinstance(x, str) for x in inputs):
        return [_sequence(inputs)]
    if all(isinstance(x, list) for x in inputs):
        return [_sequence(x) for x in inputs]
    raise validation("`inputs` must be a text, a pair of texts, or a list of those")


def _sequence(texts: list[str]) -> str | Pair:
    if len(texts) == 1:
        return texts[0]
    if len(texts) == 2:
        return (texts[0], texts[1])
    raise validation(f"an input is one text or a pair of texts, got a list of {len(texts)}")


def check_batch_size(count: int, rules: InputRules) -> None:
    if count > rules.max_client_batch_size:
        raise BatchSizeError(
            f"batch size {count} > maximum allowed batch size {rules.max_client_batch_size}"
        )


def check_dimensions(dimensions: int | None, embedding_dim: int) -> None:
    if dimensions is not None and dimensions <= 0:
        raise about(DIMENSIONS, ErrorType.VALIDATION,
                    "Input validation error: {field} should be positive")
    if dimensions is not None and dimensions > embedding_dim:
        raise about(DIMENSIONS, ErrorType.VALIDATION, "Input validation error: {field} should "
                    "be smaller than the maximum embedding dimension.")


def unnormalizable(splade: bool) -> EmbedServeError:
    """TEI's 424 for `normalize` asked of a sparse model's vectors (in its words)."""
    return about(NORMALIZE, ErrorType.BACKEND, TEI_BACKEND + "{field} is not available for "
                 + ("SPLADE models" if splade else "sparse (CSR) models"))


def check_admissible(count: int, max_concurrent_requests: int) -> None:
    """More inputs than the server admits at once (with --max-client-batch-size above
    --max-concurrent-requests, or over /vertex's instances) could only ever get 429s."""
    if count > max_concurrent_requests:
        raise validation(
            f"batch size {count} > maximum concurrent inputs {max_concurrent_requests} "
            "(--max-concurrent-requests)"
        )


def prompt_list(prompts: Mapping[str, str]) -> str:
    """The prompt names as TEI lists them (["passage", "query"]): clients such as tei-client
    parse the names back out of this error message."""
    return json.dumps(sorted(prompts))


def resolve_prompt(prompt_name: str | None, rules: InputRules) -> str | None:
    if prompt_name is None:
        return rules.default_prompt
    if not rules.prompts:
        raise about(PROMPT_NAME, ErrorType.VALIDATION,
                    f"Input validation error: {{field}} is set to `{prompt_name}` but no "
                    "prompts were found in the Sentence Transformers configuration")
    if prompt_name not in rules.prompts:
        raise about(PROMPT_NAME, ErrorType.VALIDATION,
                    f"Input validation error: {{field}} is set to `{prompt_name}` but it was "
                    f"not found in the Sentence Transformers prompts. Available prompts: "
                    f"{prompt_list(rules.prompts)}")
    return rules.prompts[prompt_name]


def check_characters(texts: Sequence[str], rules: InputRules) -> None:
    """TEI's character bound on texts that are tokenized whole (/tokenize): no truncation."""
    char_limit = rules.max_input_length * CHARS_PER_TOKEN_LIMIT
    for index, text in enumerate(texts):
        _cut(text, char_limit, truncate=False, direction="right", index=index)


def _cut(text: str, char_limit: int, truncate: bool, direction: str, index: int) -> str:
    if len(text) <= char_limit:
        return text
    if not truncate:
        raise about(Field("inputs", index), ErrorType.VALIDATION,
                    f"Input validation error: {{field}} must have less than {char_limit} "
                    f"characters. Given: {len(text)}")
    return text[-char_limit:] if direction == "left" else text[:char_limit]


def _too_long(length: int, rules: InputRules, index: int) -> Exception:
    return about(Field("inputs", index), ErrorType.VALIDATION,
                 f"Input validation error: {{field}} must have less than "
                 f"{rules.max_input_length} tokens. Given: {length}")


def _token_ids(ids: list[int], truncate: bool, direction: str, rules: InputRules,
               index: int) -> Encoded:
    # Token ids are used as given (no decode/re-encode round trip): only range and length checks.
    # Checked on Python ints first: JSON allows ids past int64, which numpy would refuse.
    bad = next((t for t in ids if t < 0 or t >= rules.vocab_size), None)
    if bad is not None:
        raise validation(
            f"Input validation error: token id {bad} is out of range; the "
            f"model's vocabulary has {rules.vocab_size} tokens"
        )
    array = np.asarray(ids, dtype=np.int64)
    if array.shape[0] > rules.max_input_length:
        if not truncate:
            raise _too_long(array.shape[0], rules, index)
        keep = rules.max_input_length
        array = array[-keep:] if direction == "left" else array[:keep]
    ids32 = array.astype(np.int32)
    return Encoded(ids32, np.zeros_like(ids32))


async def tokenize_inputs(
    inputs: Sequence[str | list[int] | Pair],
    *,
    prompt: str | None,
    explicit_prompt: bool,
    truncate: bool,
    direction: str,
    rules: InputRules,
    tokenizers: TokenizerPool,
    special_tokens: bool = True,
) -> tuple[list[Encoded], int]:
    """Validate and tokenize (texts with special tokens unless `special_tokens` is false);
    returns the encodings in input order and the characters counted."""
    char_limit = rules.max_input_length * CHARS_PER_TOKEN_LIMIT
    direction = rules.truncation_side or direction
    texts: list[str | Pair] = []
    text_slots: list[int] = []
    encoded: list[Encoded | None] = [None] * len(inputs)
    characters = 0
    for index, item in enumerate(inputs):
        if isinstance(item, tuple):
            if explicit_prompt:
                raise validation("`prompt_name` cannot be set with dual inputs")
            if not any(item):  # as in TEI, a pair is empty only when both texts are
                raise about(Field("inputs", index), ErrorType.EMPTY, EMPTY)
            # The client's characters, as for a single text and as TEI counts a pair's (its
            # compute_chars): before the character cut.
            characters += len(item[0]) + len(item[1])
            first, second = (_cut(text, char_limit, truncate, direction, index)
                             for text in item)
            if prompt and not tokenizers.conversations:
                # sentence-transformers' CrossEncoder puts its (default) prompt before the query.
                first = prompt + first
            texts.append((first, second))
            text_slots.append(index)
            continue
        if len(item) == 0:
            raise about(Field("inputs", index), ErrorType.EMPTY, EMPTY)
        characters += len(item)
        if isinstance(item, list):
            if explicit_prompt:
                raise about(PROMPT_NAME, ErrorType.VALIDATION, "Input validation error: {field} "
                            "cannot be used with token-id inputs")
            encoded[index] = _token_ids(item, truncate, direction, rules, index)
            continue
        item = _cut(item, char_limit, truncate, direction, index)
        texts.append(item if prompt is None or tokenizers.conversations else prompt + item)
        text_slots.append(index)
    if texts:
        max_length = rules.max_input_length if truncate else None
        # A model that takes conversations gets the prompt as their system message, pairs too
        # (what sentence-transformers' CrossEncoder does with its default prompt); an empty
        # prompt is none, as there (a system message, even empty, changes the render).
        system = (prompt or None) if tokenizers.conversations else None
        # (sentence-transformers tracks the prompt only of plain texts, not of conversations)
        excluded = (prompt if rules.exclude_prompt and system is None
                    and not any(isinstance(t, tuple) for t in texts) else None)
        encodings = await tokenizers.encode(texts, max_length, direction, system,
                                            special_tokens, excluded)
        for index, enc in zip(text_slots, encodings, strict=True):
            if enc.ids.shape[0] > rules.max_input_length:
                raise _too_long(enc.ids.shape[0], rules, index)
            encoded[index] = enc
    assert all(e is not None for e in encoded), "every input is either ids or text"
    return encoded, characters  # type: ignore[return-value]
