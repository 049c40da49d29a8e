"""The one error taxonomy of embedserve.

Every failure a client can see is an `EmbedServeError` with an `ErrorType`; the router maps the
type to an HTTP status in exactly one place (`router/errors.py`). Internal invariant breaks are
ordinary exceptions and surface as 500s loudly instead of being disguised as client errors.
"""

from __future__ import annotations

import enum


class ErrorType(enum.Enum):
    # TEI's closed set, with TEI's status codes.
    VALIDATION = "Validation"
    TOKENIZER = "Tokenizer"
    EMPTY = "Empty"
    BACKEND = "Backend"
    OVERLOADED = "Overloaded"
    UNHEALTHY = "Unhealthy"
    # HTTP-level failures, which TEI answers with framework bodies; we answer with our JSON shape.
    BAD_REQUEST = "BadRequest"
    UNAUTHORIZED = "Unauthorized"
    NOT_FOUND = "NotFound"
    METHOD_NOT_ALLOWED = "MethodNotAllowed"
    PAYLOAD_TOO_LARGE = "PayloadTooLarge"
    REQUEST_TIMEOUT = "RequestTimeout"
    UNSUPPORTED_MEDIA_TYPE = "UnsupportedMediaType"
    # A bug of ours: logged with its traceback, answered 500 without internals.
    INTERNAL = "Internal"


class EmbedServeError(Exception):
    """An error with a type from the taxonomy and a message meant for the client."""

    def __init__(self, error_type: ErrorType, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message

    def __repr__(self) -> str:
        return f"EmbedServeError({self.error_type.value}: {self.message})"


def validation(message: str) -> EmbedServeError:
    return EmbedServeError(ErrorType.VALIDATION, message)


def empty(message: str) -> EmbedServeError:
    return EmbedServeError(ErrorType.EMPTY, message)


def backend(message: str) -> EmbedServeError:
    return EmbedServeError(ErrorType.BACKEND, message)


def tokenizer(message: str) -> EmbedServeError:
    return EmbedServeError(ErrorType.TOKENIZER, message)


def overloaded(message: str = "Model is overloaded") -> EmbedServeError:
    return EmbedServeError(ErrorType.OVERLOADED, message)


def unhealthy(message: str) -> EmbedServeError:
    return EmbedServeError(ErrorType.UNHEALTHY, message)


class ConfigError(Exception):
    """A start-up problem the operator must fix (bad flag, missing model, unsupported feature).

    Printed as one clear line by the CLI, which then exits non-zero; never a traceback.
    """
