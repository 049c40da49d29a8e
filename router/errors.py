"""Where the error taxonomy meets HTTP: the one table of statuses and the JSON bodies."""

from __future__ import annotations

import logging

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from shared.errors import EmbedServeError, ErrorType

log = logging.getLogger(__name__)

STATUS: dict[ErrorType, int] = {
    ErrorType.VALIDATION: 422,
    ErrorType.TOKENIZER: 422,
    ErrorType.EMPTY: 400,
    ErrorType.BACKEND: 424,
    ErrorType.OVERLOADED: 429,
    ErrorType.UNHEALTHY: 503,
    ErrorType.BAD_REQUEST: 400,
    ErrorType.UNAUTHORIZED: 401,
    ErrorType.NOT_FOUND: 404,
    ErrorType.METHOD_NOT_ALLOWED: 405,
    ErrorType.PAYLOAD_TOO_LARGE: 413,
    ErrorType.REQUEST_TIMEOUT: 408,
    ErrorType.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorType.INTERNAL: 500,
}

_BY_STATUS = {status: error_type for error_type, status in STATUS.items()
              if error_type not in (ErrorType.VALIDATION, ErrorType.TOKENIZER, ErrorType.EMPTY)}
_BY_STATUS[400] = ErrorType.BAD_REQUEST


class ErrorBody(msgspec.Struct):
    error: str
    error_type: str


class OpenAIErrorDetail(msgspec.Struct):
    message: str
    type: str
    code: int


class OpenAIErrorBody(msgspec.Struct):
    error: OpenAIErrorDetail


# Routes of the OpenAI API answer errors in OpenAI's shape, so its clients can read them.
OPENAI_PATHS = frozenset({"/v1/embeddings", "/embeddings", "/v1/models", "/models"})


def openai_shaped(path: str, method: str) -> bool:
    """Whether errors of `method path` take OpenAI's shape: its routes, and GET of one model
    (/v1/models/{id}, whatever the id holds); not a POST there, such as Vertex's
    AIP_PREDICT_ROUTE /v1/models/m:predict, which is TEI's."""
    return path in OPENAI_PATHS or (method in ("GET", "HEAD")
                                    and path.startswith(("/v1/models/", "/models/")))


# Seconds a client is told to wait after a 429; short, since permits free up per batch.
RETRY_AFTER_SECONDS = "1"


def error_response(
    error: EmbedServeError, headers: dict[str, str] | None = None, path: str = "",
    method: str = "",
) -> Response:
    """The one place an error becomes an HTTP response (status, body shape, headers)."""
    headers = dict(headers or {})
    if error.error_type is ErrorType.OVERLOADED:
        headers["retry-after"] = RETRY_AFTER_SECONDS
    if error.error_type is ErrorType.UNAUTHORIZED:
        headers["www-authenticate"] = "Bearer"
    if error.error_type in (ErrorType.PAYLOAD_TOO_LARGE, ErrorType.REQUEST_TIMEOUT):
        # The rest of the body may never arrive (a stalled upload; UnreadBody drains a
        # payload only until its body timeout), so the connection is not reused: say so, or
        # a keep-alive client's next request fails on the closed socket.
        headers["connection"] = "close"
    status = STATUS[error.error_type]
    if openai_shaped(path, method):
        body = msgspec.json.encode(OpenAIErrorBody(
            OpenAIErrorDetail(error.message, error.error_type.value, status)))
    else:
        body = msgspec.json.encode(ErrorBody(error.message, error.error_type.value))
    return Response(body, status_code=status, headers=headers, media_type="application/json")


async def handle_embedserve_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EmbedServeError)
    return error_response(exc, path=request.url.path, method=request.method)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(EmbedServeError(ErrorType.INTERNAL, "internal server error"),
                          path=request.url.path, method=request.method)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (and any HTTPException) in our JSON shape."""
    assert isinstance(exc, HTTPException)
    error_type = _BY_STATUS.get(exc.status_code)
    if error_type is None:
        raise RuntimeError(f"HTTP {exc.status_code} has no error type") from exc
    message = {404: f"route {request.url.path} not found",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(
        exc.status_code, str(exc.detail))
    return error_response(EmbedServeError(error_type, message), dict(exc.headers or {}),
                          path=request.url.path, method=request.method)
