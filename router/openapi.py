"""The OpenAPI 3.1 document of the HTTP API, generated from the `Endpoint` list.

Schemas come from the msgspec types the routes decode and encode, so every field, type and
default is the one the server enforces; error statuses come from `router.errors.STATUS`. The
document depends on the routes only, so a stored copy (tests/openapi/openapi.json: an embedding
model's server, no AIP_* variables) can be compared with what a server serves. Regenerate it,
without starting a server, with `python -m router.openapi > tests/openapi/openapi.json`.
NOTE: `/`, `/invocations` and `/vertex` take their target route's schemas (router/routes/root.py),
so a classifier's, re-ranker's, SPLADE or CSR model's server documents them as /predict, /rerank
or /embed_sparse, and AIP_PREDICT_ROUTE / AIP_HEALTH_ROUTE add their routes: those servers'
documents differ from the stored copy there.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn, cast

import msgspec

from router.errors import STATUS, ErrorBody, OpenAIErrorBody, openai_shaped
from router.http import is_open
from router.routes import AppState, Endpoint
from shared.errors import ErrorType

OPENAPI_VERSION = "3.1.0"
SCHEMA_REF = "#/components/schemas/{name}"

# What read_json answers before a handler runs, on every route with a JSON body.
BODY_ERRORS = (ErrorType.BAD_REQUEST, ErrorType.PAYLOAD_TOO_LARGE,
               ErrorType.REQUEST_TIMEOUT, ErrorType.UNSUPPORTED_MEDIA_TYPE,
               ErrorType.VALIDATION)

MEANING: dict[ErrorType, str] = {
    ErrorType.VALIDATION: "`Validation`: the body does not fit the schema (the message names "
                          "the field), batch too large, input too long with truncate=false, "
                          "unknown prompt_name, bad dimensions or token id",
    ErrorType.TOKENIZER: "`Tokenizer`: the tokenizer failed",
    ErrorType.EMPTY: "`Empty`: empty input, batch or list",
    ErrorType.BACKEND: "`Backend`: wrong route for the model kind, or inference failed",
    ErrorType.OVERLOADED: "`Overloaded`: not enough permits; retry after `Retry-After` seconds",
    ErrorType.UNHEALTHY: "`Unhealthy`: the model is loading, a worker is down, or the server "
                         "is shutting down",
    ErrorType.BAD_REQUEST: "`BadRequest`: the body is not valid JSON",
    ErrorType.UNAUTHORIZED: "`Unauthorized`: missing or wrong `Authorization: Bearer <key>` "
                            "(only when the server runs with `--api-key`)",
    ErrorType.NOT_FOUND: "`NotFound`: no such route",
    ErrorType.METHOD_NOT_ALLOWED: "`MethodNotAllowed`: the route has no such method",
    ErrorType.PAYLOAD_TOO_LARGE: "`PayloadTooLarge`: the body is over `--payload-limit` bytes",
    ErrorType.REQUEST_TIMEOUT: "`RequestTimeout`: the body did not arrive in time",
    ErrorType.UNSUPPORTED_MEDIA_TYPE: "`UnsupportedMediaType`: the content type is not "
                                      "`application/json`",
    ErrorType.INTERNAL: "`Internal`: a bug of the server",
}

# The headers of router.routes.timing_headers (a unit test keeps the two in step).
TIMING_HEADERS: dict[str, str] = {
    "x-compute-type": "Device kind that computed, e.g. `cpu` or `cuda`",
    "x-compute-time": "Milliseconds from the request to its answer",
    "x-total-time": "Milliseconds from the request to its answer",
    "x-compute-characters": "Characters of the inputs",
    "x-compute-tokens": "Tokens of the inputs",
    "x-tokenization-time": "Milliseconds tokenizing (mean per input)",
    "x-queue-time": "Milliseconds queued (mean per input)",
    "x-inference-time": "Milliseconds of inference (mean per input)",
}

REQUEST_ID = "x-request-id"
_HEADER_REF = "#/components/headers/{name}"


def package_version() -> str:
    try:
        return importlib.metadata.version("embedserve")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+local"


def _status_responses(types: Sequence[ErrorType], error_schema: dict[str, Any],
                      ) -> dict[str, Any]:
    """One response per status: several error types may share one (422, 400)."""
    by_status: dict[int, list[ErrorType]] = {}
    for error_type in types:
        listed = by_status.setdefault(STATUS[error_type], [])
        if error_type not in listed:
            listed.append(error_type)
    responses: dict[str, Any] = {}
    for status in sorted(by_status):
        listed = sorted(by_status[status], key=lambda t: t.value)
        headers: dict[str, Any] = {REQUEST_ID: {"$ref": _HEADER_REF.format(name=REQUEST_ID)}}
        if ErrorType.OVERLOADED in listed:
            headers["retry-after"] = {"description": "Seconds to wait before retrying",
                                      "schema": {"type": "string"}}
        if ErrorType.UNAUTHORIZED in listed:
            headers["www-authenticate"] = {"description": "`Bearer`",
                                           "schema": {"type": "string"}}
        responses[str(status)] = {
            "description": "; ".join(MEANING[t] for t in listed),
            "headers": headers,
            "content": {"application/json": {"schema": error_schema}},
        }
    return responses


def _operation_id(endpoint: Endpoint) -> str:
    parts = [part.strip("{}") for part in endpoint.doc_path.replace("-", "_").split("/") if part]
    return "_".join([endpoint.method.lower(), *(parts or ["root"])])


def _operation(endpoint: Endpoint, schemas: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    open_route = is_open(endpoint.method, endpoint.path)
    ok_headers: dict[str, Any] = {REQUEST_ID: {"$ref": _HEADER_REF.format(name=REQUEST_ID)}}
    if endpoint.inference:
        ok_headers.update({name: {"$ref": _HEADER_REF.format(name=name)}
                           for name in TIMING_HEADERS})
    ok: dict[str, Any] = {"description": "OK", "headers": ok_headers}
    if endpoint.response is not None:
        ok["content"] = {endpoint.media_type: {"schema": schemas[endpoint.response]}}
    errors = list(endpoint.errors)
    if endpoint.request is not None:
        errors.extend(BODY_ERRORS)
    if not open_route:
        errors.append(ErrorType.UNAUTHORIZED)
    error_schema = schemas[OpenAIErrorBody if openai_shaped(endpoint.doc_path, endpoint.method)
                           else ErrorBody]
    operation: dict[str, Any] = {
        "tags": [endpoint.tag],
        "summary": endpoint.summary,
        "operationId": _operation_id(endpoint),
        "parameters": [{"$ref": "#/components/parameters/RequestId"},
                       *({"name": name, "in": "path", "required": True,
                          "schema": {"type": "string"}} for name in endpoint.path_parameters)],
    }
    if endpoint.request is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schemas[endpoint.request]}},
        }
    operation["responses"] = {"200": ok, **_status_responses(errors, error_schema)}
    operation["security"] = [] if open_route else [{"bearerAuth": []}]
    return operation


def document(endpoints: Sequence[Endpoint]) -> dict[str, Any]:
    """The OpenAPI document of `endpoints`: stable ordering, nothing from the served model."""
    types: list[Any] = []
    for endpoint in endpoints:
        for kind in (endpoint.request, endpoint.response):
            if kind is not None and kind not in types:
                types.append(kind)
    types += [ErrorBody, OpenAIErrorBody]
    refs, components = msgspec.json.schema_components(types, ref_template=SCHEMA_REF)
    schemas = dict(zip(types, refs, strict=True))

    paths: dict[str, dict[str, Any]] = {}
    for endpoint in sorted(endpoints, key=lambda e: (e.path, e.method)):
        paths.setdefault(endpoint.doc_path, {})[endpoint.method.lower()] = _operation(
            endpoint, schemas)

    headers: dict[str, Any] = {
        REQUEST_ID: {"description": "The request's id: the client's `x-request-id`, else a new "
                                    "one", "schema": {"type": "string"}},
        **{name: {"description": text, "schema": {"type": "string"}}
           for name, text in TIMING_HEADERS.items()},
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "embedserve",
            "version": package_version(),
            "description": "Text embeddings, speaking the HTTP API of Hugging Face's "
                           "text-embeddings-inference (TEI) and OpenAI's embeddings API.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [{"name": tag} for tag in sorted({e.tag for e in endpoints})],
        "paths": paths,
        "components": {
            "schemas": {name: components[name] for name in sorted(components)},
            "parameters": {"RequestId": {
                "name": REQUEST_ID, "in": "header", "required": False,
                "description": "Echoed in the answer; a new id is made when absent",
                "schema": {"type": "string"},
            }},
            "headers": headers,
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "Only when the server runs with `--api-key`; the probes, "
                               "/metrics and the API documentation never need it.",
            }},
        },
    }


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


class _Unserved:
    """Stands in for the service and model facts of a server that is not running.

    Building the routes only keeps references (or reads attributes) of them; a handler that
    used one would call it, which fails loudly.
    """

    def __getattr__(self, name: str) -> _Unserved:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError("the OpenAPI document is built without a running service")


def unserved_endpoints() -> list[Endpoint]:
    """The served routes, built without workers, tokenizers or a model."""
    from router.app import endpoints  # NOTE: here, as router.app imports this module's users
    from shared.config import ServerConfig

    unserved = cast(Any, _Unserved())
    return endpoints(AppState(ServerConfig(), unserved, unserved, unserved))


def main() -> None:
    sys.stdout.write(render(document(unserved_endpoints())))


if __name__ == "__main__":
    main()
