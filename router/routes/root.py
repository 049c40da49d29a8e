"""Routes answered by whichever route fits the served model: `POST /` and `/invocations`
(Hugging Face Inference Endpoints and SageMaker post every task there) and `/vertex` (Vertex AI
wraps several such request bodies in `instances`; AIP_PREDICT_ROUTE and AIP_HEALTH_ROUTE,
where Vertex sets them, answer as /vertex and /health)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from types import GenericAlias
from typing import TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message

from router.http import OPEN_ROUTES, read_json
from router.inputs import check_admissible
from router.routes import AppState, Endpoint, json_response
from router.schemas import RerankRequest
from shared.errors import ConfigError, empty

SENTENCE_SIMILARITY = "sentence-similarity"
HEALTH_PATHS = {"/health", "/ping", "/"}  # GET on each is the health probe already
T = TypeVar("T")


class _VertexBody(msgspec.Struct):
    instances: list[msgspec.Raw]


def target_path(state: AppState, task: str | None = None) -> str:
    """classifier -> /predict, re-ranker -> /rerank, SPLADE or CSR -> /embed_sparse, else /embed
    (or /similarity when `task` is sentence-similarity)."""
    model = state.model
    if model.kind == "classifier":
        return "/predict"
    if model.kind == "reranker":
        return "/rerank"
    # (Compared, not tested for None: router/openapi.py builds the routes with a stand-in model
    # whose every attribute is truthy.)
    if model.pooling == "splade" or model.sparse_vectors == "csr":
        return "/embed_sparse"
    return "/similarity" if task == SENTENCE_SIMILARITY else "/embed"


async def all_or_nothing(work: Iterable[Awaitable[T]]) -> list[T]:
    """Gather; on the first failure cancel the rest (their permits and queued inputs return)."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


def _with_body(request: Request, body: bytes) -> Request:
    """`request` with `body` as its body; later receives wait on the real connection, so the
    target route still notices a client that goes away."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await request.receive()

    return Request(request.scope, receive)


def routes(state: AppState, served: list[Endpoint]) -> list[Endpoint]:
    path = target_path(state, state.config.task)
    [target] = [e for e in served if e.method == "POST" and e.path == path]
    limit = state.config.payload_limit
    by_path = {e.path: e for e in served if e.method == "POST"}
    # TEI's /vertex: an instance of /rerank's shape goes there, whatever the model (another
    # kind's is then its 424); any other instance a classifier's or re-ranker's /predict, an
    # embedding model's /embed (/embed_sparse): TASK is POST /'s alone, not /vertex's.
    vertex_path = target_path(state)
    other = by_path["/predict" if state.model.kind == "reranker" else vertex_path]
    # The document shows the instances the model is for: a re-ranker's /rerank ones (its
    # /predict ones, and another model's /rerank ones, are in the summary: msgspec's schemas
    # cannot name a union of two untagged bodies).
    documented = by_path["/rerank"] if state.model.kind == "reranker" else other
    vertex_request = msgspec.defstruct(
        "VertexRequest", [("instances", GenericAlias(list, documented.request))])
    vertex_response = msgspec.defstruct(
        "VertexResponse", [("predictions", GenericAlias(list, documented.response))])

    def instance_route(instance: bytes) -> Endpoint:
        try:
            msgspec.json.decode(instance, type=RerankRequest)
        except msgspec.DecodeError:  # (ValidationError included)
            return other
        return by_path["/rerank"]

    async def vertex(request: Request) -> Response:
        body = await read_json(request, _VertexBody, limit)
        if not body.instances:
            raise empty("`instances` cannot be empty")
        # Each instance takes its own permits: past the limit, some would always get 429s.
        check_admissible(len(body.instances), state.config.max_concurrent_requests)
        answers = await all_or_nothing(
            instance_route(instance).handler(_with_body(request, bytes(instance)))
            for instance in body.instances)
        # Each answer is the target route's JSON already: embed it as is.
        return json_response({"predictions": [msgspec.Raw(a.body) for a in answers]})

    predict, health = state.config.aip_predict_route, state.config.aip_health_route
    taken = {e.path for e in served} | OPEN_ROUTES | {"/", "/invocations"}
    for name, route in (("AIP_PREDICT_ROUTE", predict), ("AIP_HEALTH_ROUTE", health)):
        if route in taken - (HEALTH_PATHS if name == "AIP_HEALTH_ROUTE" else {"/vertex"}):
            raise ConfigError(f"{name}={route} is a route of the API already: choose another "
                              "path in the Vertex AI model's container spec")
    if health is not None and (health == predict or (health == "/vertex")):
        raise ConfigError(f"AIP_HEALTH_ROUTE={health} is the prediction route: choose another "
                          "path in the Vertex AI model's container spec")
    vertex_routes = [
        Endpoint("POST", route, vertex,
                 f"Vertex AI: each of `instances` answered as POST {other.path}, or as POST "
                 "/rerank where it has /rerank's shape",
                 vertex_request, vertex_response, documented.errors, tag="Vertex")
        for route in dict.fromkeys(("/vertex", predict)) if route]
    if health is not None and health not in HEALTH_PATHS:
        [probe] = [e for e in served if e.method == "GET" and e.path == "/health"]
        vertex_routes.append(Endpoint("GET", health, probe.handler,
                                      "Vertex AI's health route: as GET /health",
                                      errors=probe.errors, tag="Vertex"))
    return [
        *(Endpoint("POST", root, target.handler, f"{what}: answered as POST {path}",
                   target.request, target.response, target.errors, target.tag, target.inference)
          for root, what in (("/", "Hugging Face Inference Endpoints"),
                             ("/invocations", "SageMaker"))),
        *vertex_routes,
    ]
