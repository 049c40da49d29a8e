"""The one error taxonomy of embedserve.

Every failure a client can see is an `EmbedServeError` with an `ErrorType`; the router maps the
type to an HTTP status in exactly one place (`router/errors.py`). Internal invariant breaks are
ordinary exceptions and surface as 500s loudly instead of being disguised as client errors.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass


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


@dataclass(frozen=True)
class Field:
    """The request field an error is about, by TEI's name (`inputs`, `normalize`, ...), and
    which of its inputs when it is one input's fault."""

    name: str
    index: int | None = None


MARKER = "{field}"  # where a template names its field
# How an API names a field for its clients: the text put in the message, backticks included.
FieldNames = Callable[[Field], str]


def tei_names(field: Field) -> str:
    return f"`{field.name}`"


class EmbedServeError(Exception):
    """An error with a type from the taxonomy and a message meant for the client.

    One that names a request field carries it (`field`) and its message's `template`, whose
    first `{field}` stands for the field's name (replaced, not str.format: the rest may hold
    a client's text, braces and all): TEI's name by default, another API's from `named`. So
    the shared service refuses in TEI's words without knowing which API a request came in by,
    and each route renders the refusal in its own."""

    # Its te_request_failure label where that is not its type's (TEI counts some refusals
    # apart: an oversized batch, whatever its tokenization refuses).
    counted_as: str | None = None

    def __init__(self, error_type: ErrorType, message: str, field: Field | None = None,
                 template: str | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.field = field
        self.template = template

    def named(self, names: FieldNames) -> EmbedServeError:
        """This error with its field named as `names` name it (itself if it names none)."""
        if self.field is None or self.template is None:
            return self
        return EmbedServeError(self.error_type, self.template.replace(MARKER, names(self.field), 1),
                               self.field, self.template)

    def at(self, index: int) -> EmbedServeError:
        """This error about input `index` of its field instead (where the inputs were pieces
        of the client's)."""
        assert self.field is not None and self.template is not None, "an error about a field"
        return about(Field(self.field.name, index), self.error_type, self.template)

    def __repr__(self) -> str:
        return f"EmbedServeError({self.error_type.value}: {self.message})"


def about(field: Field, error_type: ErrorType, template: str) -> EmbedServeError:
    """An error naming `field` where `template` says `{field}` (in TEI's name until a route
    names it in its API's: `EmbedServeError.named`)."""
    return EmbedServeError(error_type, template.replace(MARKER, tei_names(field), 1), field,
                           template)


def validation(message: str) -> EmbedServeError:
    return EmbedServeError(ErrorType.VALIDATION, message)


class BatchSizeError(EmbedServeError):
    """More inputs than --max-client-batch-size: a validation error to the client, but TEI
    counts it apart, as te_request_failure{err="batch_size"}."""

    counted_as = "batch_size"

    def __init__(self, message: str) -> None:
        super().__init__(ErrorType.VALIDATION, message)


def empty(message: str) -> EmbedServeError:
    return EmbedServeError(ErrorType.EMPTY, message)


def backend(message: str) -> EmbedServeError:
    return EmbedServeError(ErrorType.BACKEND, message)


# How TEI writes its TextEmbeddingsError::Backend, whose refusals of a route the served model
# does not fit (and of `normalize` for sparse vectors) we give in its words.
TEI_BACKEND = "Backend error: "


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
