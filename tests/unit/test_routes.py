"""The HTTP routes in-process, over a stand-in service: what each route asks of the service
(its fields passed through) and how it writes the answer (fields, order, headers). The e2e
tests serve the same routes on real models; these pin what a wrong field or header would
otherwise pass there unnoticed."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace
from typing import Any, cast

import msgspec
import numpy as np
import pytest
from starlette.testclient import TestClient

from router import operations
from router.app import build_app
from router.results import EmbedResult, Timings
from router.routes import AppState
from router.schemas import EmbedRequest, Info
from shared.config import ServerConfig
from shared.errors import ErrorType, Field, about

TIMINGS = Timings(characters=11, tokens=7, tokenization_ms=2.9, queue_ms=3.5,
                  inference_ms=5.2, admitted_at=0.0)
VECTORS = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, -2.0]], dtype=np.float32)


class Service:
    """Answers every embed with VECTORS' first rows, one per input, and keeps the requests."""

    def __init__(self) -> None:
        self.asked: list[EmbedRequest] = []
        self.ready, self.draining = True, False
        ready = SimpleNamespace(device="cuda:1", dtype="float16")
        self.workers = SimpleNamespace(workers=[SimpleNamespace(ready=ready)])
        self.rules = SimpleNamespace(max_input_length=512, max_client_batch_size=4)
        self.metrics = SimpleNamespace(endpoint=None)
        self.refusal: Exception | None = None  # raised by embed when set
        self.delay = 0.0
        self.vectors = VECTORS

    def refusals_counted(self) -> Any:
        return contextlib.nullcontext()

    def require(self, kind: str) -> None:
        pass

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        self.asked.append(request)
        await asyncio.sleep(self.delay)
        if self.refusal is not None:
            raise self.refusal
        count = 1 if isinstance(request.inputs, str) else len(request.inputs)
        return EmbedResult(self.vectors[:count], TIMINGS)


def serve(task: str | None = None, kind: str = "embedding", pooling: str = "mean",
          info: Any = None) -> tuple[TestClient, Service]:
    service = Service()
    model = SimpleNamespace(kind=kind, pooling=pooling, sparse_vectors=None,
                            prompts={"query": "q: ", "document": "d: "})
    state = AppState(ServerConfig(task=task), cast(Any, service),
                     info or cast(Any, SimpleNamespace(served_model_name="org/model")),
                     cast(Any, model))
    return TestClient(build_app(state)), service


def ok(response: Any) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


def test_an_inference_answer_carries_teis_headers() -> None:
    client, _ = serve()
    headers = client.post("/embed", json={"inputs": ["a", "b"]}).headers
    assert headers["x-compute-type"] == "cuda"
    assert headers["x-compute-characters"] == "11"
    assert headers["x-compute-tokens"] == "7"
    # Whole milliseconds, cut as TEI's as_millis cuts them.
    assert (headers["x-tokenization-time"], headers["x-queue-time"],
            headers["x-inference-time"]) == ("2", "3", "5")
    assert headers["x-total-time"] == headers["x-compute-time"]
    assert headers["content-type"] == "application/json"


def test_the_total_time_is_in_milliseconds() -> None:
    client, service = serve()
    service.delay = 0.05
    total = int(client.post("/embed", json={"inputs": "a"}).headers["x-total-time"])
    assert 50 <= total < 50_000


@pytest.mark.parametrize(("devices", "compute_type"), [
    ([None], "cpu"), (["cuda:1", "cpu", "cuda:0"], "cpu+cuda"), (["mps"], "mps")])
def test_the_compute_type_names_the_ready_workers_devices(devices: list[str | None],
                                                          compute_type: str) -> None:
    client, service = serve()
    service.workers.workers = [
        SimpleNamespace(ready=device and SimpleNamespace(device=device)) for device in devices]
    assert client.post("/embed", json={"inputs": "a"}).headers["x-compute-type"] == compute_type


def worker(id: str, device: str | None, dtype: str, pid: int | None, state: str, batches: int,
           restarts: int) -> SimpleNamespace:
    return SimpleNamespace(
        id=id, ready=device and SimpleNamespace(device=device, dtype=dtype),
        process=pid and SimpleNamespace(pid=pid), state=SimpleNamespace(value=state),
        batches_done=batches, restarts=restarts)


@pytest.mark.parametrize(("second", "dtype"), [(None, "float16"), ("bfloat16", "float32")])
def test_info_lists_each_worker_and_the_dtype_they_agree_on(second: str | None,
                                                           dtype: str) -> None:
    info = msgspec.convert({
        "model_id": "org/model", "model_sha": None, "model_dtype": "float32",
        "served_model_name": "org/model", "model_type": {"embedding": {"pooling": "mean"}},
        "max_concurrent_requests": 512, "max_input_length": 512, "max_batch_tokens": 16384,
        "max_batch_requests": None, "max_client_batch_size": 32, "auto_truncate": True,
        "tokenization_workers": 1, "version": "0", "sha": None, "docker_label": None,
        "embedding_dimension": 2, "normalize_module": False, "dense_modules": [],
        "prompts": {}, "default_prompt": None, "sparse_vectors": None, "workers": []}, Info)
    client, service = serve(info=info)
    service.workers.workers = [
        worker("w0", "cuda:0", "float16", 11, "ready", 5, 1),
        worker("w1", second and "cuda:1", second or "", None, "starting", 0, 2)]
    answer = ok(client.get("/info"))
    assert answer["model_dtype"] == dtype
    assert answer["workers"] == [
        {"id": "w0", "device": "cuda:0", "pid": 11, "state": "ready", "batches": 5,
         "restarts": 1},
        {"id": "w1", "device": second and "cuda:1", "pid": None, "state": "starting",
         "batches": 0, "restarts": 2}]


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/embed", {"inputs": ["a", "b"]}, "`inputs` holds too many tokens at 1"),
    ("/v1/embeddings", {"input": ["a", "b"]}, "`input[1]` holds too many tokens at 1"),
    ("/v1/embeddings", {"input": [1, 2]}, "`input` holds too many tokens at 1"),
    ("/v1/embed", {"texts": ["a", "b"]}, "`texts[1]` holds too many tokens at 1"),
    ("/v2/embed", {"inputs": [{"content": [{"type": "text", "text": "a"}]}] * 2},
     "`inputs[1].content[0].text` holds too many tokens at 1"),
])
def test_the_services_refusals_name_the_field_as_the_route_does(path: str, body: dict,
                                                                message: str) -> None:
    client, service = serve()
    service.refusal = about(Field("inputs", 1), ErrorType.VALIDATION,
                            "{field} holds too many tokens at 1")
    assert client.post(path, json=body).json() in (
        {"error": message, "error_type": "Validation"},
        {"error": {"message": message, "type": "Validation", "code": 422}})


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/v1/embeddings", {"input": "a"}, "`dimensions` must be 1 or more"),
    ("/v2/embed", {"texts": ["a"]}, "`output_dimension` must be 1 or more"),
])
def test_dimensions_are_named_as_the_route_names_them(path: str, body: dict,
                                                      message: str) -> None:
    client, service = serve()
    service.refusal = about(Field("dimensions"), ErrorType.VALIDATION,
                            "{field} must be 1 or more")
    assert message in client.post(path, json=body).text


def test_a_get_of_a_post_route_is_a_405() -> None:
    client, service = serve()
    for path in ("/embed", "/v1/embeddings", "/rerank"):
        assert client.get(path).status_code == 405
    assert client.post("/health").status_code == 405
    assert service.asked == []


@pytest.mark.parametrize("path", ["/", "/invocations", "/similarity", "/v1/embeddings",
                                  "/v2/embed"])
def test_every_inference_route_carries_the_headers(path: str) -> None:
    client, _ = serve()
    body = {"/similarity": {"inputs": {"source_sentence": "a", "sentences": ["b"]}},
            "/v1/embeddings": {"input": "a"}, "/v2/embed": {"texts": ["a"]}}.get(
        path, {"inputs": "a"})
    assert ok_headers(client.post(path, json=body))["x-compute-tokens"] == "7"


def ok_headers(response: Any) -> Any:
    assert response.status_code == 200, response.text
    return response.headers


def test_similarity_asks_unnormalized_vectors_with_its_parameters_and_normalizes() -> None:
    client, service = serve()
    body = {"inputs": {"source_sentence": "s", "sentences": ["a", "b"]},
            "parameters": {"truncate": True, "truncation_direction": "Left",
                           "prompt_name": "query"}}
    # The source (3, 4) against (1, 0) and (0, -2), each normalized first.
    assert ok(client.post("/similarity", json=body)) == [pytest.approx(0.6),
                                                          pytest.approx(-0.8)]
    [asked] = service.asked
    assert (asked.inputs, asked.truncate, asked.truncation_direction, asked.prompt_name,
            asked.normalize) == (["s", "a", "b"], True, "Left", "query", False)


def test_similarity_is_at_most_one() -> None:
    # (a vector against itself, normalized in float32, can come out a hair above 1)
    client, service = serve()
    service.vectors = np.array([[-0.6232744455337524, 0.04132597893476486]] * 2, np.float32)
    answer = ok(client.post("/similarity", json={"inputs": {"source_sentence": "s",
                                                             "sentences": ["s"]}}))
    assert answer == [1.0]


def test_similarity_refuses_no_sentences() -> None:
    client, service = serve()
    answer = client.post("/similarity", json={"inputs": {"source_sentence": "s",
                                                         "sentences": []}})
    assert (answer.status_code, answer.json()) == (
        400, {"error": "`inputs.sentences` cannot be empty", "error_type": "Empty"})
    assert service.asked == []


def test_health_says_why_it_is_unhealthy() -> None:
    client, service = serve()
    assert (client.get("/health").status_code, client.get("/health").content) == (200, b"")
    service.ready, service.draining = False, True
    assert client.get("/ping").json() == {"error": "the server is shutting down",
                                          "error_type": "Unhealthy"}
    service.draining = False
    assert client.get("/").json()["error"] == (
        "unhealthy: the model is loading or a backend worker is down")


@pytest.mark.parametrize(("ids", "batch"), [([1, 2], [[1, 2]]), ([[1], [2, 3]], [[1], [2, 3]])])
def test_decode_passes_ids_and_skip_special_tokens(monkeypatch: pytest.MonkeyPatch, ids: list,
                                                  batch: list) -> None:
    asked: list[tuple] = []

    async def decode(service: Any, ids: list, *, skip_special_tokens: bool) -> list[str]:
        asked.append((ids, skip_special_tokens))
        return ["x"] * len(ids)

    monkeypatch.setattr(operations, "decode", decode)
    client, _ = serve()
    assert ok(client.post("/decode", json={"ids": ids, "skip_special_tokens": False})) == (
        ["x"] * len(batch))
    assert asked == [(batch, False)]


@pytest.mark.parametrize("ids", [[], [1, [2]]])
def test_decode_refuses_no_ids_and_mixed_ids(ids: list) -> None:
    client, _ = serve()
    answer = client.post("/decode", json={"ids": ids})
    assert answer.json() == ({"error": "Input validation error: `input_ids` cannot be empty",
                              "error_type": "Empty"} if not ids else
                             {"error": "`ids` must be a list of token ids or a list of such "
                                       "lists", "error_type": "Validation"})


@pytest.mark.parametrize(("inputs", "texts"), [("a", ["a"]), (["a", "b"], ["a", "b"])])
def test_tokenize_passes_its_fields(monkeypatch: pytest.MonkeyPatch, inputs: Any,
                                    texts: list[str]) -> None:
    asked: list[tuple] = []

    async def tokenize_json(service: Any, texts: list[str], *, add_special_tokens: bool,
                            prompt_name: str | None) -> bytes:
        asked.append((texts, add_special_tokens, prompt_name))
        return b"[[]]"

    monkeypatch.setattr(operations, "tokenize_json", tokenize_json)
    client, _ = serve()
    body = {"inputs": inputs, "add_special_tokens": False, "prompt_name": "query"}
    assert ok(client.post("/tokenize", json=body)) == [[]]
    assert asked == [(texts, False, "query")]


def test_openai_embeddings_answer_each_row_at_its_index_with_usage() -> None:
    client, service = serve()
    answer = ok(client.post("/v1/embeddings", json={"input": ["a", "b"], "dimensions": 2}))
    assert answer == {
        "object": "list", "model": "org/model",
        "data": [{"object": "embedding", "embedding": [3.0, 4.0], "index": 0},
                 {"object": "embedding", "embedding": [1.0, 0.0], "index": 1}],
        "usage": {"prompt_tokens": 7, "total_tokens": 7}}
    [asked] = service.asked
    assert (asked.normalize, asked.dimensions, asked.prompt_name) == (True, 2, None)


@pytest.mark.parametrize(("normalized", "normalize"), [(None, True), (True, True),
                                                       (False, False)])
def test_jinas_normalized_is_true_unless_false(normalized: bool | None,
                                               normalize: bool) -> None:
    client, service = serve()
    ok(client.post("/embeddings", json={"input": "a", "normalized": normalized,
                                        "task": "retrieval.query"}))
    [asked] = service.asked
    assert (asked.normalize, asked.prompt_name) == (normalize, "query")


def test_openai_base64_is_written_as_asked() -> None:
    client, _ = serve()
    answer = ok(client.post("/v1/embeddings", json={"input": "a", "encoding_format": "base64"}))
    assert answer["data"][0]["embedding"] == "AABAQAAAgEA="  # float32 3.0, 4.0


@pytest.mark.parametrize(("body", "message"), [
    ({"input": "a", "late_chunking": True},
     "`late_chunking` is not supported: each input is embedded on its own"),
    ({"input": [1, 2], "task": "retrieval.query"},
     "`task` cannot be used with token-id inputs: its prompt is text"),
    ({"input": [[1, 2], "a"], "task": "retrieval.query"},
     "`task` cannot be used with token-id inputs: its prompt is text"),
])
def test_openai_refusals_in_openais_shape(body: dict, message: str) -> None:
    client, service = serve()
    answer = client.post("/v1/embeddings", json=body)
    assert (answer.status_code, answer.json()) == (
        422, {"error": {"message": message, "type": "Validation", "code": 422}})
    assert service.asked == []


def test_openai_models_list_and_retrieve_the_served_model() -> None:
    client, _ = serve()
    model = {"id": "org/model", "object": "model", "created": 0, "owned_by": "embedserve"}
    assert ok(client.get("/v1/models")) == {"object": "list", "data": [model]}
    assert ok(client.get("/models/org/model")) == model
    other = client.get("/v1/models/org/other")
    assert (other.status_code, other.json()) == (404, {"error": {
        "message": "the model 'org/other' does not exist; this server serves 'org/model'",
        "type": "NotFound", "code": 404}})
