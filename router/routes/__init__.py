"""Route handlers, one module per API family, sharing the app state and response helpers."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from router.results import Timings
from router.schemas import Info, WorkerInfo
from router.service import InferenceService
from shared.config import ServerConfig
from shared.errors import EmbedServeError, ErrorType, FieldNames
from shared.modelinfo import ModelInfo


@dataclass(frozen=True)
class AppState:
    config: ServerConfig
    service: InferenceService
    info: Info  # the static part; workers are filled in per call
    model: ModelInfo

    @property
    def compute_type(self) -> str:
        devices = {w.ready.device.split(":")[0] for w in self.service.workers.workers if w.ready}
        return "+".join(sorted(devices)) or "cpu"

    def live_info(self) -> Info:
        """/info now: the static part plus each worker's state (and the dtype the workers
        chose, once they agree)."""
        workers = self.service.workers.workers
        listed = [
            WorkerInfo(w.id, w.ready.device if w.ready else None,
                       w.process.pid if w.process else None, w.state.value, w.batches_done,
                       w.restarts)
            for w in workers
        ]
        dtypes = {w.ready.dtype for w in workers if w.ready}
        return msgspec.structs.replace(
            self.info, workers=listed,
            model_dtype=dtypes.pop() if len(dtypes) == 1 else self.info.model_dtype,
        )


@dataclass(frozen=True)
class Endpoint:
    """One route and what it accepts and answers: the app and the OpenAPI document both come
    from this list, so the documentation cannot drift from the routes."""

    method: str
    path: str
    handler: Callable[[Request], Awaitable[Response]]
    summary: str
    request: Any = None  # a msgspec type, or None for no body
    response: Any = None  # a msgspec type, or None for an empty 200
    errors: tuple[ErrorType, ...] = ()
    tag: str = "TEI"
    inference: bool = False  # carries the x-compute-* / x-*-time headers
    media_type: str = "application/json"  # of the 200 answer

    def route(self) -> Route:
        return Route(self.path, self.handler, methods=[self.method])

    @property
    def doc_path(self) -> str:
        """The path as OpenAPI writes it: `{model:path}` (Starlette's converter) is `{model}`."""
        return re.sub(r"\{(\w+):\w+\}", r"{\1}", self.path)

    @property
    def path_parameters(self) -> list[str]:
        return re.findall(r"\{(\w+)(?::\w+)?\}", self.path)


def _ms(value: float) -> str:
    return str(int(value))


def timing_headers(timings: Timings, started: float, compute_type: str) -> dict[str, str]:
    """TEI's inference headers: whole milliseconds; per-input means, summed counts."""
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


def _numpy_json(value: Any) -> Any:
    """msgspec's hook for what it cannot write: a numpy array becomes a raw JSON fragment from
    orjson, which writes float32 in its shortest round-tripping form ("0.0045407615", as TEI
    does) where Python floats would print float64's 17 digits of the same value."""
    if isinstance(value, np.ndarray):
        return msgspec.Raw(orjson.dumps(np.ascontiguousarray(value),
                                        option=orjson.OPT_SERIALIZE_NUMPY))
    if isinstance(value, np.floating):
        # A float32 score or sparse value in float32's shortest form ("0.29404664", as TEI
        # writes its f32 scores), not float64's digits of the same value.
        return msgspec.Raw(orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY))
    if isinstance(value, np.generic):
        return value.item()
    raise NotImplementedError(f"cannot write {type(value).__name__} as JSON")


_encoder = msgspec.json.Encoder(enc_hook=_numpy_json)


def json_response(body: Any, headers: dict[str, str] | None = None) -> Response:
    """A JSON answer; numpy arrays anywhere in `body` are written as JSON arrays."""
    try:
        encoded = _encoder.encode(body)
    except RecursionError:
        # An object of the request echoed (a Cohere document, with `return_documents`) sits
        # deeper in the answer than in the request: at the depth the decoder still took, the
        # encoder can run out of recursion (read_json's own refusal, a level or two later).
        raise EmbedServeError(ErrorType.BAD_REQUEST, "the request body is nested too deeply "
                              "to be echoed in the answer") from None
    return Response(encoded, media_type="application/json", headers=headers)


@contextlib.contextmanager
def fields_named(names: FieldNames) -> Iterator[None]:
    """The service's refusals in the block name their fields as `names` do: a route of another
    API than TEI's says `input` or `texts[2]` where TEI's say `inputs`."""
    try:
        yield
    except EmbedServeError as exc:
        if exc.field is None:
            raise
        raise exc.named(names) from None
