"""The OpenAI embeddings API: /v1/embeddings and /v1/models (and both without /v1)."""

from __future__ import annotations

import base64
import time

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from router.http import read_json, unless_disconnected
from router.routes import AppState, Endpoint, json_response, timing_headers
from router.schemas import (
    EmbedRequest,
    OpenAIEmbedding,
    OpenAIEmbedRequest,
    OpenAIEmbedResponse,
    OpenAIModel,
    OpenAIModelList,
    OpenAIUsage,
)
from shared.errors import ErrorType, validation


def _base64(row: np.ndarray) -> str:
    # What the openai client decodes by default: little-endian float32 bytes.
    return base64.b64encode(row.astype("<f4", copy=False).tobytes()).decode()


def routes(state: AppState) -> list[Endpoint]:
    service = state.service
    limit = state.config.payload_limit
    model_name = state.info.served_model_name

    async def embeddings(request: Request) -> Response:
        started = time.perf_counter()
        body = await read_json(request, OpenAIEmbedRequest, limit)
        with service.refusals_counted():
            for name, value in (("encoding_type", body.encoding_type),
                                ("embedding_type", body.embedding_type)):
                if value not in (None, "float"):
                    raise validation(
                        f"`{name}` {value!r} is not supported: embeddings are answered as "
                        "float numbers, or as base64 float32 with `encoding_format`")
        result = await unless_disconnected(request, service.embed(EmbedRequest(
            inputs=body.input, normalize=True, dimensions=body.dimensions,
        )))
        data = [OpenAIEmbedding(embedding=_base64(row) if body.encoding_format == "base64"
                                else row, index=i)
                for i, row in enumerate(result.vectors)]
        tokens = result.timings.tokens
        return json_response(
            OpenAIEmbedResponse(data=data, model=model_name,
                                usage=OpenAIUsage(prompt_tokens=tokens, total_tokens=tokens)),
            timing_headers(result.timings, started, state.compute_type),
        )

    async def models(request: Request) -> Response:
        return json_response(OpenAIModelList(data=[OpenAIModel(id=model_name)]))

    errors = (ErrorType.VALIDATION, ErrorType.EMPTY, ErrorType.TOKENIZER, ErrorType.BACKEND,
              ErrorType.OVERLOADED, ErrorType.UNHEALTHY)
    return [
        Endpoint("POST", "/v1/embeddings", embeddings, "OpenAI embeddings", OpenAIEmbedRequest,
                 OpenAIEmbedResponse, errors, tag="OpenAI", inference=True),
        Endpoint("POST", "/embeddings", embeddings, "OpenAI embeddings (alias)",
                 OpenAIEmbedRequest, OpenAIEmbedResponse, errors, tag="OpenAI", inference=True),
        Endpoint("GET", "/v1/models", models, "OpenAI model list: the served model",
                 response=OpenAIModelList, tag="OpenAI"),
        Endpoint("GET", "/models", models, "OpenAI model list (alias)",
                 response=OpenAIModelList, tag="OpenAI"),
    ]
