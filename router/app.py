"""The Starlette application: routes, middleware and error handling, assembled once."""

from __future__ import annotations

from opentelemetry.trace import Tracer
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from router.cors import JsonCORSMiddleware
from router.errors import handle_embedserve_error, handle_http_exception, handle_unexpected
from router.http import ApiKeyMiddleware, ClientGone, RequestIdMiddleware
from router.metrics import Metrics
from router.routes import AppState, Endpoint, cohere_embed, docs, heads, openai, root, tei
from router.tracing import TracingMiddleware
from shared.errors import EmbedServeError


async def _client_gone(request: Request, exc: Exception) -> Response:
    # Nobody reads this; 499 (nginx's "client closed request") keeps access logs honest.
    return Response(status_code=499)


def endpoints(state: AppState) -> list[Endpoint]:
    served = [*tei.routes(state), *heads.routes(state), *openai.routes(state),
              *cohere_embed.routes(state)]
    # The platform's routes first: its paths (TF Serving's /v1/models/m, as Vertex's examples
    # use) are its own, not the openai route /v1/models/{model}'s.
    return [*root.routes(state, served), *served]


def build_app(state: AppState, tracer: Tracer | None = None) -> Starlette:
    """The app; with a `tracer` (only when --otlp-endpoint is set) requests are traced."""
    middleware = [Middleware(RequestIdMiddleware)]
    if tracer is not None:
        middleware.append(Middleware(TracingMiddleware, tracer=tracer))
    # Without --cors-allow-origin any origin is allowed, as TEI allows it: browser front-ends
    # that call TEI directly keep working. (Credentials are never allowed, so a page cannot
    # ride on a browser's cookies; --api-key still applies.)
    middleware.append(Middleware(
        JsonCORSMiddleware,
        allow_origins=list(state.config.cors_allow_origin or ["*"]),
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["authorization", "content-type", "x-request-id"],
        expose_headers=["x-request-id", "x-compute-time", "x-compute-tokens"],
    ))
    if state.config.api_key:
        middleware.append(Middleware(ApiKeyMiddleware, api_key=state.config.api_key,
                                     open_probe=state.config.aip_health_route))
    app = Starlette(
        routes=docs.app_routes(endpoints(state)),
        middleware=middleware,
        exception_handlers={
            ClientGone: _client_gone,
            EmbedServeError: handle_embedserve_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected,
        },
    )
    # `POST /embed/` is a 404 as in TEI, not Starlette's bodiless 307 to /embed (which most
    # clients would not follow with the body anyway).
    app.router.redirect_slashes = False
    return app


def metrics_app(metrics: Metrics) -> Starlette:
    """What --prometheus-port serves: /metrics alone, from the main app's registry (its 404 and
    405 in the main port's JSON shape)."""
    return Starlette(routes=[Route("/metrics", metrics.endpoint, methods=["GET"])],
                     exception_handlers={HTTPException: handle_http_exception})
