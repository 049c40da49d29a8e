"""What each API operation asks of the service, whichever API it came in by.

The HTTP routes and the gRPC services parse their requests into these arguments and shape the
results into their own replies; the checks, the model-kind refusals, the activation of scores
and the token-id rules live here once, so both APIs answer the same numbers and errors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from router.inputs import (
    CHARS_PER_TOKEN_LIMIT,
    as_input_list,
    as_predict_list,
    check_batch_size,
    check_characters,
    is_batch,
    is_predict_batch,
    resolve_prompt,
)
from router.metrics import tokenization_refusals
from router.results import Outcome, Timings
from router.scores import activate, ranked_labels
from router.service import InferenceService
from router.tokenization import Token
from shared.errors import EmbedServeError, ErrorType, Field, about, empty, validation
from shared.modelinfo import ModelInfo
from shared.protocol import OutputKind

TEXTS = Field("texts")


async def classify(
    service: InferenceService, model: ModelInfo, inputs: str | list, *,
    truncate: bool | None, direction: str, raw_scores: bool,
) -> tuple[list[list[tuple[float, str]]], Timings]:
    """Every label's (score, label) for each input (`as_predict_list`'s shapes), best first."""
    batch = service.accepted(inputs, as_predict_list, "classifier")
    outcome = await service.run(batch, OutputKind.LOGITS, truncate=truncate, direction=direction,
                                batched=is_predict_batch(inputs))
    scores = activate(outcome.matrix(), model.activation, raw_scores)
    return [ranked_labels(row, model.id2label) for row in scores], outcome.timings


async def rerank(
    service: InferenceService, model: ModelInfo, query: str, texts: Sequence[str], *,
    truncate: bool | None, direction: str, raw_scores: bool,
    max_tokens: int | None = None, max_chunks: int = 1,
) -> tuple[np.ndarray, Timings]:
    """One score per text, in the texts' order (`best_first` gives the ranking); with
    `max_tokens`, each text is scored on its first `max_tokens` tokens only; with `max_chunks`
    above 1, a text too long to fit beside the query is scored in up to that many pieces, and
    its score is its best piece's (Cohere's `max_chunks_per_doc`)."""
    if not texts:  # (before the model kind, as TEI checks)
        with service.refusals_counted():
            raise about(TEXTS, ErrorType.EMPTY, "{field} cannot be empty")
    service.require("reranker")
    if max_tokens is not None and max_tokens < service.rules.max_input_length:
        # Cutting tokenizes every text: the request is first checked as `run` would check it,
        # and a refusal on the way counts as run's do.
        with service.refusals_counted():
            check_batch_size(len(texts), service.rules)
            texts = await kept_tokens(service, texts, max_tokens, "right")
    if max_chunks > 1 and service.tokenizers.conversations:
        # Pieces are cut to fit beside the query in the tokenizer's pair encoding; a chat
        # template's frame around them is another length.
        with service.refusals_counted():
            raise validation("`max_chunks_per_doc` is not supported for this model (its pairs "
                             "are written through a chat template)")
    if max_chunks > 1:
        scored = await _rerank_pieces(service, model, query, texts, direction=direction,
                                      raw_scores=raw_scores, max_chunks=max_chunks)
        if scored is not None:
            return scored
    # (a re-rank is a batch in te_request_count, however many texts, as TEI counts it)
    outcome = await service.run([(query, text) for text in texts], OutputKind.LOGITS,
                                truncate=truncate, direction=direction, batched=True)
    return activate(outcome.matrix(), model.activation, raw_scores)[:, 0], outcome.timings


async def kept_tokens(service: InferenceService, texts: Sequence[str], count: int,
                      direction: str) -> list[str]:
    """Each text cut after its first `count` tokens (Cohere's `max_tokens_per_doc`), at the end
    of the last token kept ("left": before its last `count`, at the start of the first kept, as
    Cohere embed's `max_tokens` with `truncate` START); shorter texts as they are. The cut text
    is tokenized again (in its pair, after its prompt), where the word at the cut may split
    into other pieces."""
    async with service.admission.admitted(len(texts), "tokenizer"):
        return await service.tokenizers.kept_tokens(list(texts), count, direction)


async def _rerank_pieces(
    service: InferenceService, model: ModelInfo, query: str, texts: Sequence[str], *,
    direction: str, raw_scores: bool, max_chunks: int,
) -> tuple[np.ndarray, Timings] | None:
    """`rerank` with long texts in pieces: each piece is scored beside the query, and a text's
    score is the best of its pieces' (the activation is monotonic, so raw or not the same piece
    wins). None when the query leaves no room for a piece: each text is then scored as it is
    without pieces (the pair truncated)."""
    max_length = service.rules.max_input_length
    # No more of a text than its pieces can hold goes to the tokenizer (TEI's bound of 250
    # characters per token, over every piece's tokens).
    texts = [text[:max_length * max_chunks * CHARS_PER_TOKEN_LIMIT] for text in texts]
    with service.refusals_counted():
        check_batch_size(len(texts), service.rules)
        # The pieces must fit beside the query as it is tokenized: after the default prompt.
        prompted = (service.rules.default_prompt or "") + query
        async with service.admission.admitted(len(texts), "tokenizer"):
            chunked = await service.tokenizers.chunks(prompted, list(texts), max_length,
                                                      max_chunks)
        if chunked.pieces is None:
            return None
        pairs = [(query, piece) for pieces in chunked.pieces for piece in pieces]
        if len(pairs) > service.max_concurrent_requests:
            raise validation(
                f"`max_chunks_per_doc` makes {len(pairs)} pieces of the {len(texts)} "
                f"documents, more than the server scores at once (--max-concurrent-requests "
                f"{service.max_concurrent_requests}): lower it or send fewer documents")
    # The pieces are the server's own cut, made to fit: a piece whose edge re-tokenizes a token
    # longer is truncated by that token, not refused (with --auto-truncate false too).
    try:
        outcome = await service.run(pairs, OutputKind.LOGITS, truncate=True,
                                    direction=direction, client_inputs=len(texts),
                                    batched=True)
    except EmbedServeError as exc:
        if exc.field is None or exc.field.index is None:
            raise
        # About a piece: the client is told which of its texts.
        owners = [text for text, pieces in enumerate(chunked.pieces) for _ in pieces]
        raise exc.at(owners[exc.field.index]) from None
    scores = activate(outcome.matrix(), model.activation, raw_scores)[:, 0]
    firsts = np.cumsum([0, *(len(pieces) for pieces in chunked.pieces[:-1])])
    return np.maximum.reduceat(scores, firsts), outcome.timings


def best_first(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score, ties in TEI's order: the later input first (TEI sorts
    ascending, stably, then reverses). Compared as the float32 the client is sent: scores
    equal there (two sigmoids rounded to 1.0) are a tie."""
    return np.argsort(scores.astype(np.float32), kind="stable")[::-1]


async def embed_sparse(
    service: InferenceService, inputs: str | list, *, truncate: bool | None,
    direction: str, prompt_name: str | None,
) -> Outcome:
    """Sparse vectors (SPLADE, BGE-M3's lexical weights, a CSR head): each row is (indices
    ascending, values) of the non-zero entries."""
    batch = service.accepted(inputs, as_input_list, "sparse")
    return await service.run(batch, OutputKind.SPARSE, truncate=truncate,
                             direction=direction, prompt_name=prompt_name,
                             batched=is_batch(inputs))


async def embed_all(
    service: InferenceService, inputs: str | list, *, truncate: bool | None,
    direction: str, prompt_name: str | None,
) -> Outcome:
    """Each row is the (tokens, hidden) last hidden state of one input."""
    batch = service.accepted(inputs, as_input_list, "hidden states")
    return await service.run(batch, OutputKind.ALL_TOKENS, truncate=truncate,
                             direction=direction, prompt_name=prompt_name,
                             batched=is_batch(inputs))


def _texts_to_tokenize(service: InferenceService, texts: list[str],
                       prompt_name: str | None) -> list[str]:
    if not texts or any(not text for text in texts):
        raise empty("Input validation error: `inputs` cannot be empty")
    check_batch_size(len(texts), service.rules)
    check_characters(texts, service.rules)
    with tokenization_refusals():  # (as Infer::tokenize counts a prompt it lacks)
        prompt = resolve_prompt(prompt_name, service.rules)
    return texts if prompt is None else [prompt + text for text in texts]


async def tokenize(
    service: InferenceService, texts: list[str], *, add_special_tokens: bool,
    prompt_name: str | None,
) -> list[list[Token]]:
    with service.refusals_counted():  # (TEI counts these failures; no te_request_count)
        texts = _texts_to_tokenize(service, texts, prompt_name)
        async with service.admission.admitted(len(texts), "tokenizer"):
            return await service.tokenizers.tokens(texts, add_special_tokens)


async def tokenize_json(
    service: InferenceService, texts: list[str], *, add_special_tokens: bool,
    prompt_name: str | None,
) -> bytes:
    """`tokenize`'s answer as the JSON array /tokenize sends, written in the tokenizer pool."""
    with service.refusals_counted():
        texts = _texts_to_tokenize(service, texts, prompt_name)
        async with service.admission.admitted(len(texts), "tokenizer"):
            return await service.tokenizers.tokens_json(texts, add_special_tokens)


async def decode(
    service: InferenceService, batch: list[list[int]], *, skip_special_tokens: bool
) -> list[str]:
    with service.refusals_counted():  # (TEI counts these failures; no te_request_count)
        check_batch_size(len(batch), service.rules)
        vocab = service.rules.vocab_size
        for ids in batch:
            if not ids:
                raise empty("Input validation error: `input_ids` cannot be empty")
            bad = next((t for t in ids if t < 0 or t >= vocab), None)
            if bad is not None:
                raise validation(f"token id {bad} is out of range; the model's vocabulary "
                                 f"has {vocab} tokens")
        async with service.admission.admitted(len(batch), "tokenizer"):
            return await service.tokenizers.decode(batch, skip_special_tokens)


def combined(timings: Sequence[Timings]) -> Timings:
    """One request's timings from its parts': counts add up, times are per-input means (what
    a single request of all the inputs reports)."""
    count = len(timings)
    return Timings(
        characters=sum(t.characters for t in timings),
        tokens=sum(t.tokens for t in timings),
        tokenization_ms=sum(t.tokenization_ms for t in timings) / count,
        queue_ms=sum(t.queue_ms for t in timings) / count,
        inference_ms=sum(t.inference_ms for t in timings) / count,
        admitted_at=min(t.admitted_at for t in timings),
    )
