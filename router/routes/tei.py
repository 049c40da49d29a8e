"""TEI's own routes: /embed, /similarity, /tokenize, /decode and the probes."""

from __future__ import annotations

import time
from typing import TypeVar, cast

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from router import operations
from router.http import read_json, unless_disconnected
from router.results import EmbedResult, normalize_rows
from router.routes import AppState, Endpoint, json_response, timing_headers
from router.schemas import (
    DecodeRequest,
    EmbedRequest,
    Info,
    SimilarityParameters,
    SimilarityRequest,
    TokenInfo,
    TokenizeRequest,
)
from shared.errors import ErrorType, empty, unhealthy, validation

T = TypeVar("T")


def routes(state: AppState) -> list[Endpoint]:
    service = state.service
    limit = state.config.payload_limit

    async def embed_result(request: Request, body: EmbedRequest) -> EmbedResult:
        return await unless_disconnected(request, service.embed(body))

    async def embed(request: Request) -> Response:
        started = time.perf_counter()
        result = await embed_result(request, await read_json(request, EmbedRequest, limit))
        return json_response(result.vectors,
                             timing_headers(result.timings, started, state.compute_type))

    async def similarity(request: Request) -> Response:
        started = time.perf_counter()
        body = await read_json(request, SimilarityRequest, limit)
        if not body.inputs.sentences:
            with service.refusals_counted():
                raise empty("`inputs.sentences` cannot be empty")
        params = body.parameters or SimilarityParameters()
        # Normalized here, not asked of /embed: TEI's /similarity serves SPLADE models too,
        # whose vectors /embed refuses to normalize.
        result = await embed_result(request, EmbedRequest(
            inputs=[body.inputs.source_sentence, *body.inputs.sentences],
            truncate=params.truncate,
            truncation_direction=params.truncation_direction,
            prompt_name=params.prompt_name,
            normalize=False,
        ))
        vectors = normalize_rows(result.vectors)
        return json_response(np.clip(vectors[1:] @ vectors[0], -1.0, 1.0),
                             timing_headers(result.timings, started, state.compute_type))

    async def tokenize(request: Request) -> Response:
        body = await read_json(request, TokenizeRequest, limit)
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        # Cancelled when the client goes: its texts leave the tokenizer pool's queue.
        answer = await unless_disconnected(request, operations.tokenize_json(
            service, texts, add_special_tokens=body.add_special_tokens,
            prompt_name=body.prompt_name))
        return Response(answer, media_type="application/json")

    async def decode(request: Request) -> Response:
        body = await read_json(request, DecodeRequest, limit)
        ids = body.ids
        with service.refusals_counted():
            if not ids:
                raise empty("Input validation error: `input_ids` cannot be empty")
            batch = [ids] if all(isinstance(i, int) for i in ids) else ids
            if not all(isinstance(item, list) for item in batch):
                raise validation("`ids` must be a list of token ids or a list of such lists")
        return json_response(await unless_disconnected(request, operations.decode(
            service, cast(list[list[int]], batch), skip_special_tokens=body.skip_special_tokens)))

    async def health(request: Request) -> Response:
        if not service.ready:
            if service.draining:
                raise unhealthy("the server is shutting down")
            raise unhealthy("unhealthy: the model is loading or a backend worker is down")
        return Response(status_code=200)

    async def info(request: Request) -> Response:
        return json_response(state.live_info())

    inference_errors = (ErrorType.VALIDATION, ErrorType.EMPTY, ErrorType.TOKENIZER,
                        ErrorType.BACKEND, ErrorType.OVERLOADED, ErrorType.UNHEALTHY)
    tokenizer_errors = (ErrorType.VALIDATION, ErrorType.EMPTY, ErrorType.TOKENIZER)
    return [
        Endpoint("POST", "/embed", embed, "Embed inputs (texts or token ids)", EmbedRequest,
                 list[list[float]], inference_errors, inference=True),
        Endpoint("POST", "/similarity", similarity,
                 "Cosine similarity of a source sentence with each sentence",
                 SimilarityRequest, list[float], inference_errors, inference=True),
        Endpoint("POST", "/tokenize", tokenize, "Tokenize texts, with byte offsets",
                 TokenizeRequest, list[list[TokenInfo]], tokenizer_errors),
        Endpoint("POST", "/decode", decode, "Decode token ids into text", DecodeRequest,
                 list[str], tokenizer_errors),
        Endpoint("GET", "/", health, "Health (alias of /health)", errors=(ErrorType.UNHEALTHY,)),
        Endpoint("GET", "/health", health, "200 once every worker is ready, else 503",
                 errors=(ErrorType.UNHEALTHY,)),
        Endpoint("GET", "/ping", health, "Health (alias of /health)",
                 errors=(ErrorType.UNHEALTHY,)),
        Endpoint("GET", "/info", info, "What is served and how", response=Info),
        Endpoint("GET", "/metrics", service.metrics.endpoint,
                 "Prometheus metrics (text format): TEI's families plus per-worker health and "
                 "batches", response=str, media_type="text/plain"),
    ]
