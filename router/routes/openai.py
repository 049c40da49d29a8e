"""The OpenAI embeddings API: /v1/embeddings and /v1/models (and both without /v1)."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response

from router.embedding_types import WRITERS
from router.http import read_json, unless_disconnected
from router.inputs import as_input_list
from router.prompt_roles import jina_prompt
from router.routes import AppState, Endpoint, fields_named, json_response, timing_headers
from router.schemas import (
    EmbedRequest,
    OpenAIEmbedding,
    OpenAIEmbedRequest,
    OpenAIEmbedResponse,
    OpenAIModel,
    OpenAIModelList,
    OpenAIUsage,
)
from shared.errors import EmbedServeError, ErrorType, Field, FieldNames, tei_names, validation


def written_as(body: OpenAIEmbedRequest) -> str:
    """OpenAI's `encoding_format`, unless Jina's `embedding_type` (or its older spelling
    `encoding_type`) names one of the formats Jina's API offers."""
    named = [(name, value) for name, value in (("embedding_type", body.embedding_type),
                                               ("encoding_type", body.encoding_type))
             if value is not None]
    if not named:
        return body.encoding_format or "float"
    if len({value for _, value in named}) > 1:
        raise validation("`embedding_type` and `encoding_type` disagree")
    name, written = named[0]
    if written not in WRITERS:
        raise validation(f"`{name}` {written!r} is not supported: choose among "
                         f"{', '.join(WRITERS)}")
    return written


def openai_names(body: OpenAIEmbedRequest) -> FieldNames:
    """OpenAI's (and Jina's) names for the fields the service's refusals name: TEI's `inputs`
    is `input` (`input[i]` when a list holds texts or token-id lists), `prompt_name` comes
    from `task`, and `normalize` is `normalized` (Jina's), true unless the client sends false."""
    listed = isinstance(body.input, list) and not all(isinstance(x, int) for x in body.input)

    def names(field: Field) -> str:
        if field.name == "inputs":
            return "`input`" if field.index is None or not listed else f"`input[{field.index}]`"
        return {"prompt_name": "`task`",
                "normalize": "normalizing (send `normalized: false`)"}.get(
            field.name, tei_names(field))

    return names


def routes(state: AppState) -> list[Endpoint]:
    service = state.service
    limit = state.config.payload_limit
    model_name = state.info.served_model_name
    prompts = state.model.prompts

    async def embeddings(request: Request) -> Response:
        started = time.perf_counter()
        body = await read_json(request, OpenAIEmbedRequest, limit)
        with service.refusals_counted(), fields_named(openai_names(body)):
            if body.late_chunking:
                raise validation("`late_chunking` is not supported: each input is embedded "
                                 "on its own")
            written = written_as(body)
            prompt_name = jina_prompt(body.task, prompts)
            if prompt_name is not None and any(
                    not isinstance(item, str) for item in as_input_list(body.input)):
                # (said here with the reason: the service's refusal says only that `task`
                # cannot be used with token-id inputs)
                raise validation("`task` cannot be used with token-id inputs: its prompt is "
                                 "text")
        with fields_named(openai_names(body)):
            result = await unless_disconnected(request, service.embed(EmbedRequest(
                inputs=body.input, normalize=body.normalized is not False,
                dimensions=body.dimensions,
                prompt_name=prompt_name,
            )))
        data = [OpenAIEmbedding(embedding=row, index=i)
                for i, row in enumerate(WRITERS[written](result.vectors))]
        tokens = result.timings.tokens
        return json_response(
            OpenAIEmbedResponse(data=data, model=model_name,
                                usage=OpenAIUsage(prompt_tokens=tokens, total_tokens=tokens)),
            timing_headers(result.timings, started, state.compute_type),
        )

    async def models(request: Request) -> Response:
        return json_response(OpenAIModelList(data=[OpenAIModel(id=model_name)]))

    async def model(request: Request) -> Response:
        # (the openai client's models.retrieve; a model id may hold a "/", hence :path)
        if request.path_params["model"] != model_name:
            raise EmbedServeError(ErrorType.NOT_FOUND,
                                  f"the model {request.path_params['model']!r} does not exist; "
                                  f"this server serves {model_name!r}")
        return json_response(OpenAIModel(id=model_name))

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
        Endpoint("GET", "/v1/models/{model:path}", model, "OpenAI model: the served model's",
                 response=OpenAIModel, errors=(ErrorType.NOT_FOUND,), tag="OpenAI"),
        Endpoint("GET", "/models/{model:path}", model, "OpenAI model (alias)",
                 response=OpenAIModel, errors=(ErrorType.NOT_FOUND,), tag="OpenAI"),
    ]
