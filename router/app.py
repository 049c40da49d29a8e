"""The Starlette application: routes of API.md that exist so far, and their error handling."""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from router.errors import handle_embedserve_error, handle_http_exception, handle_unexpected
from router.http import (
    ApiKeyMiddleware,
    ClientGone,
    RequestIdMiddleware,
    read_json,
    unless_disconnected,
)
from router.schemas import EmbedRequest, Info, WorkerInfo
from router.service import InferenceService, Timings
from shared.config import ServerConfig
from shared.errors import EmbedServeError, unhealthy


@dataclass(frozen=True)
class AppState:
    config: ServerConfig
    service: InferenceService
    info: Info  # the static part; workers are filled in per call


def _ms(value: float) -> str:
    return str(int(value))


def timing_headers(timings: Timings, started: float, compute_type: str) -> dict[str, str]:
    total = _ms((time.perf_counter() - started) * 1e3)
    return {
        "x-compute-type": compute_type,
        "x-compute-time": total,
        "x-total-time": total,
        "x-compute-characters": str(timings.characters),
        "x-compute-tokens": str(timings.tokens),
        "x-tokenization-time": _ms(timings.tokenization_ms),
        "x-queue-time": _ms(timings.queue_ms),
        "x-inference-time": _ms(timings.inference_ms),
    }


def build_app(state: AppState) -> Starlette:
    service = state.service
    limit = state.config.payload_limit

    async def embed(request: Request) -> Response:
        started = time.perf_counter()
        body = await read_json(request, EmbedRequest, limit)
        result = await unless_disconnected(request, service.embed(body))
        # NOTE: tolist() is the fast way to floats msgspec can write; JSON needs decimal text.
        return Response(
            msgspec.json.encode(result.vectors.tolist()),
            media_type="application/json",
            headers=timing_headers(result.timings, started, _compute_type(service)),
        )

    async def health(request: Request) -> Response:
        if not service.ready:
            if service.draining:
                raise unhealthy("the server is shutting down")
            raise unhealthy("unhealthy: the model is loading or a backend worker is down")
        return Response(status_code=200)

    async def info(request: Request) -> Response:
        workers = [
            WorkerInfo(w.id, w.ready.device if w.ready else None,
                       w.process.pid if w.process else None, w.state.value, w.batches_done,
                       w.restarts)
            for w in service.workers.workers
        ]
        dtypes = {w.ready.dtype for w in service.workers.workers if w.ready}
        body = msgspec.structs.replace(
            state.info, workers=workers,
            model_dtype=dtypes.pop() if len(dtypes) == 1 else state.info.model_dtype,
        )
        return Response(msgspec.json.encode(body), media_type="application/json")

    middleware = [Middleware(RequestIdMiddleware)]
    if state.config.cors_allow_origin:
        middleware.append(Middleware(
            CORSMiddleware,
            allow_origins=list(state.config.cors_allow_origin),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["authorization", "content-type", "x-request-id"],
            expose_headers=["x-request-id", "x-compute-time", "x-compute-tokens"],
        ))
    if state.config.api_key:
        middleware.append(Middleware(ApiKeyMiddleware, api_key=state.config.api_key))
    return Starlette(
        routes=[
            Route("/embed", embed, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/info", info, methods=["GET"]),
        ],
        middleware=middleware,
        exception_handlers={
            ClientGone: _client_gone,
            EmbedServeError: handle_embedserve_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected,
        },
    )


async def _client_gone(request: Request, exc: Exception) -> Response:
    # Nobody reads this; 499 (nginx's "client closed request") keeps access logs honest.
    return Response(status_code=499)


def _compute_type(service: InferenceService) -> str:
    devices = {w.ready.device.split(":")[0] for w in service.workers.workers if w.ready}
    return "+".join(sorted(devices)) or "cpu"
