"""Routes of the other model kinds: /predict, /rerank (and Cohere/Jina's), /embed_sparse,
/embed_all."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from router import operations
from router.http import read_json, unless_disconnected
from router.results import Outcome, Timings
from router.routes import AppState, Endpoint, fields_named, json_response, timing_headers
from router.schemas import (
    CohereApiVersion,
    CohereBilledUnits,
    CohereMeta,
    CohereRerankRequest,
    CohereRerankResponse,
    CohereResult,
    CohereUsage,
    EmbedAllRequest,
    Prediction,
    PredictRequest,
    PredictResponse,
    Rank,
    RerankRequest,
    SparseValue,
)
from shared.errors import ErrorType, Field, tei_names, validation

PerInput = Callable[..., Awaitable[Outcome]]  # operations.embed_sparse or .embed_all

ERRORS = (ErrorType.VALIDATION, ErrorType.EMPTY, ErrorType.TOKENIZER, ErrorType.BACKEND,
          ErrorType.OVERLOADED, ErrorType.UNHEALTHY)


def document_text(index: int, document: str | dict[str, Any]) -> str:
    """What a Cohere/Jina document is ranked on: the string, or the object's `text`."""
    text = document if isinstance(document, str) else document.get("text")
    if not isinstance(text, str):
        raise validation(f"`documents[{index}]` must be a string or an object with a string "
                         "`text`")
    return text


def cohere_rerank_names(field: Field) -> str:
    """Cohere/Jina re-rank's names: TEI's `texts` are its `documents`, and an input (`inputs`)
    the query paired with one of them."""
    if field.name == "texts":
        return "`documents`"
    if field.name == "inputs":
        return "`documents`" if field.index is None else (
            f"`query` and `documents[{field.index}]`")
    return tei_names(field)


def as_object(document: str | dict[str, Any]) -> dict[str, Any]:
    return {"text": document} if isinstance(document, str) else document


def routes(state: AppState) -> list[Endpoint]:
    service = state.service
    info = state.model
    limit = state.config.payload_limit

    async def predict(request: Request) -> Response:
        started = time.perf_counter()
        body = await read_json(request, PredictRequest, limit)
        batch = isinstance(body.inputs, list) and all(isinstance(x, list) for x in body.inputs)
        ranked, timings = await unless_disconnected(request, operations.classify(
            service, info, body.inputs, truncate=body.truncate,
            direction=body.truncation_direction, raw_scores=body.raw_scores))
        # float32 scalars: written in float32's shortest form, as TEI writes them (the schema
        # says number).
        answers = [[Prediction(cast(float, np.float32(score)), label) for score, label in row]
                   for row in ranked]
        return json_response(answers if batch else answers[0],
                             timing_headers(timings, started, state.compute_type))

    async def rank(request: Request, query: str, texts: list[str], truncate, direction,
                   raw: bool, max_tokens: int | None = None,
                   max_chunks: int = 1) -> tuple[np.ndarray, np.ndarray, Timings]:
        """Scores in text order (float32, as TEI writes them), the order best first, and the
        timings."""
        scores, timings = await unless_disconnected(request, operations.rerank(
            service, info, query, texts, truncate=truncate, direction=direction,
            raw_scores=raw, max_tokens=max_tokens,
            max_chunks=max_chunks))
        return scores.astype(np.float32), operations.best_first(scores), timings

    async def rerank(request: Request) -> Response:
        started = time.perf_counter()
        body = await read_json(request, RerankRequest, limit)
        values, order, timings = await rank(request, body.query, body.texts, body.truncate,
                                            body.truncation_direction, body.raw_scores)
        ranks = [Rank(int(i), values[i], body.texts[i] if body.return_text else None)
                 for i in order]
        return json_response(ranks, timing_headers(timings, started, state.compute_type))

    async def cohere_rerank(request: Request, version: str) -> Response:
        started = time.perf_counter()
        body = await read_json(request, CohereRerankRequest, limit)
        with service.refusals_counted():
            texts = [document_text(i, d) for i, d in enumerate(body.documents)]
            if body.top_n is not None and body.top_n <= 0:
                raise validation("`top_n` must be positive")
            if body.max_tokens_per_doc is not None and body.max_tokens_per_doc <= 0:
                raise validation("`max_tokens_per_doc` must be positive")
            if body.max_chunks_per_doc is not None and body.max_chunks_per_doc <= 0:
                raise validation("`max_chunks_per_doc` must be positive")
            if body.rank_fields and body.rank_fields != ["text"]:
                raise validation("`rank_fields` other than [\"text\"] are not supported: "
                                 "documents are ranked on their `text`")
        with fields_named(cohere_rerank_names):
            values, order, timings = await rank(request, body.query, texts, None, "right",
                                                False, max_tokens=body.max_tokens_per_doc,
                                                max_chunks=body.max_chunks_per_doc or 1)
        results = [CohereResult(int(i), values[i],
                                as_object(body.documents[i]) if body.return_documents else None)
                   for i in order[: body.top_n]]
        meta = CohereMeta(CohereApiVersion(version), CohereBilledUnits(timings.tokens))
        return json_response(
            CohereRerankResponse(request.state.request_id, results, state.info.served_model_name,
                                 CohereUsage(timings.tokens), meta),
            timing_headers(timings, started, state.compute_type))

    async def cohere_rerank_v1(request: Request) -> Response:
        return await cohere_rerank(request, "1")

    async def cohere_rerank_v2(request: Request) -> Response:
        return await cohere_rerank(request, "2")

    async def per_input(request: Request, operation: PerInput) -> Outcome:
        """The shared part of /embed_sparse and /embed_all: same body, one operation."""
        body = await read_json(request, EmbedAllRequest, limit)
        return await unless_disconnected(request, operation(
            service, body.inputs, truncate=body.truncate, direction=body.truncation_direction,
            prompt_name=body.prompt_name))

    async def embed_sparse(request: Request) -> Response:
        started = time.perf_counter()
        outcome = await per_input(request, operations.embed_sparse)
        answers = [[SparseValue(int(i), v) for i, v in zip(*row, strict=True)]
                   for row in outcome.rows]
        return json_response(answers, timing_headers(outcome.timings, started,
                                                     state.compute_type))

    async def embed_all(request: Request) -> Response:
        started = time.perf_counter()
        outcome = await per_input(request, operations.embed_all)
        return json_response(outcome.rows,
                             timing_headers(outcome.timings, started, state.compute_type))

    return [
        Endpoint("POST", "/predict", predict,
                 "Classify a text or text pair: every label's score, best first (a batch "
                 "of inputs answers a list of such lists)",
                 PredictRequest, PredictResponse, ERRORS, inference=True),
        Endpoint("POST", "/rerank", rerank, "Score texts against a query, best first",
                 RerankRequest, list[Rank], ERRORS, inference=True),
        Endpoint("POST", "/v1/rerank", cohere_rerank_v1, "Cohere/Jina re-rank shape",
                 CohereRerankRequest, CohereRerankResponse, ERRORS, tag="Cohere/Jina",
                 inference=True),
        Endpoint("POST", "/v2/rerank", cohere_rerank_v2, "Cohere/Jina re-rank shape (v2 path)",
                 CohereRerankRequest, CohereRerankResponse, ERRORS, tag="Cohere/Jina",
                 inference=True),
        Endpoint("POST", "/embed_sparse", embed_sparse,
                 "SPLADE: the non-zero entries of each input's sparse vector, index ascending",
                 EmbedAllRequest, list[list[SparseValue]], ERRORS, inference=True),
        Endpoint("POST", "/embed_all", embed_all,
                 "The last hidden state of every token of each input", EmbedAllRequest,
                 list[list[list[float]]], ERRORS, inference=True),
    ]
