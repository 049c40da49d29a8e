"""Cohere's embed API: /v1/embed (cohere.Client) and /v2/embed (cohere.ClientV2, which
langchain-cohere's CohereEmbeddings wraps), answered from the same vectors as /embed.

- `texts`, or v2's `inputs` whose content is one text part each; images are refused (a text
  model). Vectors are normalized, as Cohere's are; `output_dimension` is /embed's `dimensions`.
- `input_type` picks the model's prompt of that role (router/prompt_roles.py).
- `truncate`: END cuts the end, START the start, NONE refuses a text over the limit (422);
  absent, --auto-truncate decides, as for TEI's routes (END with `max_tokens`).
- v2's `max_tokens`: each text is cut to that many of its own tokens, on `truncate`'s side
  (with NONE, a longer text is refused); the model's limit still applies (`within_max_tokens`).
- `embedding_types`: float, base64 (float32), binary and ubinary (router/embedding_types.py).
  int8 / uint8 are refused: Cohere's scale is its own, and sentence-transformers' scalar
  quantization needs calibration ranges a server has no way to know.
- v1 without `embedding_types` answers `embeddings_floats` (a plain list of vectors); otherwise
  `embeddings_by_type`, as Cohere does. `meta.billed_units.input_tokens` counts the tokens.
- v2's fields (`inputs`, `output_dimension`, `max_tokens`, `priority`) are refused on v1,
  which Cohere's v1 API does not have; an empty `embedding_types` is refused on both.
"""

from __future__ import annotations

import time
from typing import Any, cast

from starlette.requests import Request
from starlette.responses import Response

from router.embedding_types import WRITERS
from router.http import read_json, unless_disconnected
from router.inputs import CHARS_PER_TOKEN_LIMIT, check_batch_size
from router.operations import kept_tokens
from router.prompt_roles import cohere_prompt
from router.routes import AppState, Endpoint, fields_named, json_response, timing_headers
from router.schemas import (
    CohereApiVersion,
    CohereBilledUnits,
    CohereEmbedByTypeResponse,
    CohereEmbeddingsByType,
    CohereEmbedFloatsResponse,
    CohereEmbedRequest,
    CohereMeta,
    EmbedRequest,
)
from router.service import InferenceService
from shared.errors import ErrorType, Field, FieldNames, empty, tei_names, validation

# Cohere's v2 fields: Cohere's v1 API has none of them. Refused on /v1/embed, naming the field,
# rather than honoured there (an answer Cohere's v1 would not give) or silently ignored.
V2_ONLY = ("inputs", "output_dimension", "max_tokens", "priority")


def check_version(body: CohereEmbedRequest, version: str) -> None:
    if version == "1":
        sent = next((name for name in V2_ONLY if getattr(body, name) is not None), None)
        if sent is not None:
            raise validation(f"`{sent}` is a field of Cohere's v2 embed API: send it to "
                             "/v2/embed")


def text_field(body: CohereEmbedRequest, index: int) -> str:
    """Where the client put its text `index`, for messages that name it."""
    return f"texts[{index}]" if body.texts is not None else f"inputs[{index}].content[0].text"


def cohere_names(body: CohereEmbedRequest) -> FieldNames:
    """Cohere's names for the fields the service's refusals name: TEI's `inputs` are the texts
    as sent (`texts[i]` or `inputs[i].content[0].text`), `dimensions` is `output_dimension`,
    `prompt_name` comes from `input_type`, and `normalize` is no field: Cohere's embeddings are
    always normalized."""
    def names(field: Field) -> str:
        if field.name == "inputs":
            return (f"`{'texts' if body.texts is not None else 'inputs'}`"
                    if field.index is None else f"`{text_field(body, field.index)}`")
        return {"dimensions": "`output_dimension`", "prompt_name": "`input_type`",
                "normalize": "normalizing (which Cohere's embed API always does)"}.get(
            field.name, tei_names(field))

    return names


def input_texts(body: CohereEmbedRequest) -> list[str]:
    if body.images:
        raise validation("`images` are not supported: this is a text model")
    if body.texts is not None and body.inputs is not None:
        raise validation("give either `texts` or `inputs`, not both")
    if not (body.texts or body.inputs):
        raise empty(f"`{'inputs' if body.inputs is not None else 'texts'}` cannot be empty")
    if body.texts is not None:
        texts = body.texts
    else:
        texts = []
        for index, item in enumerate(body.inputs or ()):
            parts = item.content
            if len(parts) != 1 or parts[0].type != "text" or parts[0].text is None:
                raise validation(f"`inputs[{index}]` must hold one text part (`{{\"type\": "
                                 "\"text\", \"text\": ...}`): images and several parts are "
                                 "not supported")
            texts.append(parts[0].text)
    # (checked here, before `max_tokens` has the texts tokenized; the service's refusal would
    # name the text as `cohere_names` does)
    blank = next((index for index, text in enumerate(texts) if not text), None)
    if blank is not None:
        raise empty(f"`{text_field(body, blank)}` cannot be empty")
    return texts


def embed_request(body: CohereEmbedRequest, texts: list[str],
                  prompts: dict[str, str]) -> EmbedRequest:
    """The /embed request of a Cohere request's `texts`, once its fields are checked."""
    if body.embedding_types == []:
        raise validation(f"`embedding_types` cannot be empty: name one or more of "
                         f"{', '.join(WRITERS)}, or leave it out")
    refused = [t for t in body.embedding_types or () if t not in WRITERS]
    if refused:
        raise validation(f"`embedding_types` {', '.join(refused)} not supported: choose among "
                         f"{', '.join(WRITERS)} (int8 / uint8 need a calibration this server "
                         "does not have)")
    if body.max_tokens is not None and body.max_tokens <= 0:
        raise validation("`max_tokens` must be positive")
    if body.priority:
        raise validation("`priority` is not supported: requests are served in arrival order")
    inputs: list[str | int | list[int]] = [*texts]
    truncate = body.truncate
    if truncate is None and body.max_tokens is not None:
        truncate = "END"  # Cohere's default: a client that sets `max_tokens` asks for cuts
    return EmbedRequest(
        inputs=inputs,
        truncate=None if truncate is None else truncate != "NONE",
        truncation_direction="left" if truncate == "START" else "right",
        prompt_name=cohere_prompt(body.input_type, prompts),
        normalize=True,
        dimensions=body.output_dimension,
    )


async def within_max_tokens(service: InferenceService, body: CohereEmbedRequest,
                            texts: list[str], max_tokens: int) -> list[str]:
    """Each text cut to `max_tokens` of its own tokens (its prompt and special tokens not
    counted, as Cohere's rerank `max_tokens_per_doc`), on the side `truncate` names (absent:
    END, Cohere's default); with NONE a longer text is refused. At or past the model's limit
    it changes nothing: the limit cuts first, as `truncate` says."""
    service.require("embedding")  # (before the texts are tokenized for nothing)
    if max_tokens >= service.rules.max_input_length:
        return texts
    truncate = body.truncate
    direction = "left" if truncate == "START" else "right"
    # TEI's bound of 250 characters per token, before the texts reach the tokenizer.
    chars = max_tokens * CHARS_PER_TOKEN_LIMIT
    bounded = [text[-chars:] if direction == "left" else text[:chars] for text in texts]
    with service.refusals_counted():
        check_batch_size(len(texts), service.rules)
        cut = await kept_tokens(service, bounded, max_tokens, direction)
        longer = next((i for i, (text, kept) in enumerate(zip(texts, cut, strict=True))
                       if kept != text), None)
        if truncate == "NONE" and longer is not None:
            raise validation(f"`{text_field(body, longer)}` has more than `max_tokens` "
                             f"({max_tokens}) tokens, and `truncate` is NONE")
    return cut


def routes(state: AppState) -> list[Endpoint]:
    service = state.service
    limit = state.config.payload_limit
    prompts = state.model.prompts

    async def embed(request: Request, version: str) -> Response:
        started = time.perf_counter()
        body = await read_json(request, CohereEmbedRequest, limit)
        with service.refusals_counted():
            check_version(body, version)
            texts = input_texts(body)
            asked = embed_request(body, texts, prompts)
        if body.max_tokens is not None:
            cut = await unless_disconnected(request, within_max_tokens(
                service, body, texts, body.max_tokens))
            asked.inputs = [*cut]
        with fields_named(cohere_names(body)):
            result = await unless_disconnected(request, service.embed(asked))
        meta = CohereMeta(CohereApiVersion(version), CohereBilledUnits(result.timings.tokens))
        answer: Any
        if version == "1" and body.embedding_types is None:
            answer = CohereEmbedFloatsResponse(
                id=request.state.request_id,
                embeddings=cast(list[list[float]], result.vectors), texts=texts, meta=meta)
        else:
            wanted = dict.fromkeys(body.embedding_types or ["float"])
            by_type = {kind: WRITERS[kind](result.vectors) for kind in wanted}
            answer = CohereEmbedByTypeResponse(
                id=request.state.request_id,
                embeddings=CohereEmbeddingsByType(floats=by_type.pop("float", None),
                                                  **by_type),
                texts=texts, meta=meta)
        return json_response(answer, timing_headers(result.timings, started,
                                                    state.compute_type))

    async def embed_v1(request: Request) -> Response:
        return await embed(request, "1")

    async def embed_v2(request: Request) -> Response:
        return await embed(request, "2")

    errors = (ErrorType.VALIDATION, ErrorType.EMPTY, ErrorType.TOKENIZER, ErrorType.BACKEND,
              ErrorType.OVERLOADED, ErrorType.UNHEALTHY)
    return [
        # (one request schema for both: v1's summary says which of its fields v1 refuses)
        Endpoint("POST", "/v1/embed", embed_v1, "Cohere embed shape (v1: a plain list of float "
                 "vectors unless `embedding_types` are asked for; v2's `inputs`, "
                 "`output_dimension`, `max_tokens` and `priority` are refused)",
                 CohereEmbedRequest,
                 CohereEmbedFloatsResponse | CohereEmbedByTypeResponse, errors,
                 tag="Cohere/Jina", inference=True),
        Endpoint("POST", "/v2/embed", embed_v2, "Cohere embed shape (v2: embeddings by type)",
                 CohereEmbedRequest, CohereEmbedByTypeResponse, errors, tag="Cohere/Jina",
                 inference=True),
    ]
