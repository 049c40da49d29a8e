"""Routes of the other model kinds: /predict, /rerank (and Cohere/Jina's), /embed_sparse,
/embed_all."""

from __future__ import annotations

import time

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from router.http import read_json, unless_disconnected
from router.inputs import as_input_list, as_predict_list
from router.routes import AppState, Endpoint, json_response, timing_headers
from router.schemas import (
    CohereDocument,
    CohereRerankRequest,
    CohereRerankResponse,
    CohereResult,
    CohereUsage,
    EmbedAllRequest,
    Prediction,
    PredictRequest,
    Rank,
    RerankRequest,
    SparseValue,
)
from router.scores import activate, ranked_labels
from router.service import Outcome
from shared.errors import ErrorType, empty, validation
from shared.protocol import OutputKind

ERRORS = (ErrorType.VALIDATION, ErrorType.EMPTY, ErrorType.TOKENIZER, ErrorType.BACKEND,
          ErrorType.OVERLOADED, ErrorType.UNHEALTHY)


def routes(state: AppState) -> list[Endpoint]:
    service = state.service
    info = state.model
    limit = state.config.payload_limit

    async def run(request: Request, inputs: list, output: OutputKind, **options) -> Outcome:
        return await unless_disconnected(request, service.run(inputs, output, **options))

    async def scores(request: Request, pairs: list, truncate, direction, raw) -> tuple:
        outcome = await run(request, pairs, OutputKind.LOGITS, truncate=truncate,
                            direction=direction)
        return activate(np.stack(outcome.rows), info.activation, raw), outcome

    async def predict(request: Request) -> Response:
        started = time.perf_counter()
        body = await read_json(request, PredictRequest, limit)
        service.require("classifier")
        inputs = as_predict_list(body.inputs)
        batch = isinstance(body.inputs, list) and all(isinstance(x, list) for x in body.inputs)
        values, outcome = await scores(request, inputs, body.truncate,
                                       body.truncation_direction, body.raw_scores)
        answers = [[Prediction(s, label) for s, label in ranked_labels(row, info.id2label)]
                   for row in values]
        return json_response(answers if batch else answers[0],
                             timing_headers(outcome.timings, started, state.compute_type))

    async def rank(request: Request, query: str, texts: list[str], truncate, direction,
                   raw: bool) -> tuple[np.ndarray, Outcome]:
        service.require("reranker")
        if not texts:
            raise empty("`texts` cannot be empty")
        values, outcome = await scores(request, [(query, t) for t in texts], truncate,
                                       direction, raw)
        return values[:, 0], outcome

    async def rerank(request: Request) -> Response:
        started = time.perf_counter()
        body = await read_json(request, RerankRequest, limit)
        values, outcome = await rank(request, body.query, body.texts, body.truncate,
                                     body.truncation_direction, body.raw_scores)
        order = np.argsort(-values, kind="stable")
        ranks = [Rank(int(i), float(values[i]), body.texts[i] if body.return_text else None)
                 for i in order]
        return json_response(ranks, timing_headers(outcome.timings, started,
                                                   state.compute_type))

    async def cohere_rerank(request: Request) -> Response:
        started = time.perf_counter()
        body = await read_json(request, CohereRerankRequest, limit)
        texts = [d if isinstance(d, str) else d.text for d in body.documents]
        if body.top_n is not None and body.top_n <= 0:
            raise validation("`top_n` must be positive")
        values, outcome = await rank(request, body.query, texts, None, "right", False)
        order = np.argsort(-values, kind="stable")[: body.top_n]
        results = [CohereResult(int(i), float(values[i]),
                                CohereDocument(texts[i]) if body.return_documents else None)
                   for i in order]
        return json_response(
            CohereRerankResponse(results, body.model or state.info.served_model_name,
                                 CohereUsage(outcome.timings.tokens)),
            timing_headers(outcome.timings, started, state.compute_type))

    async def per_input(request: Request, needs: str, output: OutputKind) -> Outcome:
        """The shared part of /embed_sparse and /embed_all: same body, one output kind."""
        body = await read_json(request, EmbedAllRequest, limit)
        service.require(needs)
        return await run(request, as_input_list(body.inputs), output, truncate=body.truncate,
                         direction=body.truncation_direction, prompt_name=body.prompt_name)

    async def embed_sparse(request: Request) -> Response:
        started = time.perf_counter()
        outcome = await per_input(request, "splade", OutputKind.SPARSE)
        answers = [[SparseValue(int(i), float(v)) for i, v in zip(*row, strict=True)]
                   for row in outcome.rows]
        return json_response(answers, timing_headers(outcome.timings, started,
                                                     state.compute_type))

    async def embed_all(request: Request) -> Response:
        started = time.perf_counter()
        outcome = await per_input(request, "encoder", OutputKind.ALL_TOKENS)
        return json_response([rows.tolist() for rows in outcome.rows],
                             timing_headers(outcome.timings, started, state.compute_type))

    return [
        Endpoint("POST", "/predict", predict,
                 "Classify a text or text pair: every label's score, best first (a batch "
                 "of inputs answers a list of such lists)",
                 PredictRequest, list[Prediction], ERRORS, inference=True),
        Endpoint("POST", "/rerank", rerank, "Score texts against a query, best first",
                 RerankRequest, list[Rank], ERRORS, inference=True),
        Endpoint("POST", "/v1/rerank", cohere_rerank, "Cohere/Jina re-rank shape",
                 CohereRerankRequest, CohereRerankResponse, ERRORS, tag="Cohere/Jina",
                 inference=True),
        Endpoint("POST", "/v2/rerank", cohere_rerank, "Cohere/Jina re-rank shape (v2 path)",
                 CohereRerankRequest, CohereRerankResponse, ERRORS, tag="Cohere/Jina",
                 inference=True),
        Endpoint("POST", "/embed_sparse", embed_sparse,
                 "SPLADE: the non-zero entries of each input's sparse vector, index ascending",
                 EmbedAllRequest, list[list[SparseValue]], ERRORS, inference=True),
        Endpoint("POST", "/embed_all", embed_all,
                 "The last hidden state of every token of each input", EmbedAllRequest,
                 list[list[list[float]]], ERRORS, inference=True),
    ]
