"""The routes of the other model kinds (/predict, /rerank and Cohere/Jina's, /embed_sparse,
/embed_all) and the routes answered as the served model's (`POST /`, /vertex), in-process over
a stand-in service (tests/unit/test_routes.py's): the fields each passes on and the answer's
shape and order."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from router import operations
from router.results import Outcome
from tests.unit.test_routes import TIMINGS, ok, serve

SCORES = np.array([0.25, 0.75, 0.5])


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """What the routes ask of operations: classify, rerank, embed_sparse and embed_all."""
    calls: list[tuple] = []

    async def classify(service: Any, model: Any, inputs: Any, **options: Any) -> Any:
        calls.append(("classify", inputs, options))
        count = len(inputs) if isinstance(inputs, list) and isinstance(inputs[0], list) else 1
        return [[(0.875, "yes"), (0.125, "no")]] * count, TIMINGS

    async def rerank(service: Any, model: Any, query: str, texts: list[str],
                     **options: Any) -> Any:
        calls.append(("rerank", query, texts, options))
        return SCORES[:len(texts)], TIMINGS

    async def embed_sparse(service: Any, inputs: Any, **options: Any) -> Outcome:
        calls.append(("embed_sparse", inputs, options))
        return Outcome([(np.array([2, 5]), np.array([0.5, 1.5], dtype=np.float32))], TIMINGS)

    async def embed_all(service: Any, inputs: Any, **options: Any) -> Outcome:
        calls.append(("embed_all", inputs, options))
        return Outcome([np.ones((2, 1), dtype=np.float32), np.zeros((1, 1), np.float32)],
                       TIMINGS)

    for operation in (classify, rerank, embed_sparse, embed_all):
        monkeypatch.setattr(operations, operation.__name__, operation)
    return calls


OPTIONS = {"truncate": True, "truncation_direction": "Left"}
PASSED = {"truncate": True, "direction": "Left"}


@pytest.mark.parametrize(("inputs", "answer"), [
    ("a", [{"score": 0.875, "label": "yes"}, {"score": 0.125, "label": "no"}]),
    ([["a"], ["b", "c"]], [[{"score": 0.875, "label": "yes"}, {"score": 0.125, "label": "no"}]]
     * 2),
])
def test_predict_passes_its_fields_and_answers_a_batch_as_a_list(asked: list, inputs: Any,
                                                                 answer: list) -> None:
    client, _ = serve(kind="classifier")
    body = {"inputs": inputs, "raw_scores": True, **OPTIONS}
    response = client.post("/predict", json=body)
    assert ok(response) == answer
    assert response.headers["x-compute-tokens"] == "7"
    assert asked == [("classify", inputs, {**PASSED, "raw_scores": True})]


@pytest.mark.parametrize("path", ["/predict", "/"])
def test_predict_answers_fit_the_documented_schema(asked: list, path: str) -> None:
    import jsonschema

    client, _ = serve(kind="classifier")
    document = ok(client.get("/openapi.json"))
    schema = {**document["paths"][path]["post"]["responses"]["200"]["content"][
        "application/json"]["schema"], "components": document["components"]}
    for inputs in ("a", ["a", "b"], [["a"], ["b", "c"]]):  # a text, a pair, a batch
        jsonschema.validate(ok(client.post(path, json={"inputs": inputs})), schema)


def test_rerank_answers_best_first_with_the_texts_asked(asked: list) -> None:
    client, _ = serve(kind="reranker")
    body = {"query": "q", "texts": ["a", "b", "c"], "raw_scores": True, "return_text": True,
            **OPTIONS}
    assert ok(client.post("/rerank", json=body)) == [
        {"index": 1, "score": 0.75, "text": "b"}, {"index": 2, "score": 0.5, "text": "c"},
        {"index": 0, "score": 0.25, "text": "a"}]
    assert asked == [("rerank", "q", ["a", "b", "c"],
                      {**PASSED, "raw_scores": True, "max_tokens": None, "max_chunks": 1})]
    assert ok(client.post("/rerank", json={"query": "q", "texts": ["a", "b"]})) == [
        {"index": 1, "score": 0.75}, {"index": 0, "score": 0.25}]


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
def test_cohere_rerank_answers_the_top_n_with_the_documents(asked: list, path: str) -> None:
    client, _ = serve(kind="reranker")
    body = {"query": "q", "documents": ["a", {"text": "b", "id": 7}, "c"], "top_n": 2,
            "return_documents": True, "max_tokens_per_doc": 9, "max_chunks_per_doc": 3,
            "rank_fields": ["text"]}
    response = client.post(path, json=body, headers={"x-request-id": "r3"})
    assert ok(response) == {
        "id": "r3", "model": "org/model", "usage": {"total_tokens": 7},
        "meta": {"api_version": {"version": path[2]}, "billed_units": {"input_tokens": 7}},
        "results": [{"index": 1, "relevance_score": 0.75, "document": {"text": "b", "id": 7}},
                    {"index": 2, "relevance_score": 0.5, "document": {"text": "c"}}]}
    assert response.headers["x-compute-tokens"] == "7"
    assert asked == [("rerank", "q", ["a", "b", "c"], {
        "truncate": None, "direction": "right", "raw_scores": False, "max_tokens": 9,
        "max_chunks": 3})]
    plain = ok(client.post(path, json={"query": "q", "documents": ["a", "b"]}))["results"]
    assert plain == [{"index": 1, "relevance_score": 0.75}, {"index": 0, "relevance_score": 0.25}]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("top_n", 0, "`top_n` must be positive"),
    ("max_tokens_per_doc", 0, "`max_tokens_per_doc` must be positive"),
    ("max_chunks_per_doc", 0, "`max_chunks_per_doc` must be positive"),
    ("rank_fields", ["title"], "`rank_fields` other than [\"text\"] are not supported: "
                               "documents are ranked on their `text`"),
    ("documents", ["a", {"title": "b"}],
     "`documents[1]` must be a string or an object with a string `text`"),
])
def test_cohere_rerank_refusals(asked: list, field: str, value: Any, message: str) -> None:
    client, _ = serve(kind="reranker")
    answer = client.post("/v1/rerank", json={"query": "q", "documents": ["a"], field: value})
    assert (answer.status_code, answer.json()) == (
        422, {"error": message, "error_type": "Validation"})
    assert asked == []



def test_a_document_too_deep_to_echo_is_a_400_not_a_500(asked: list) -> None:
    """A document object is echoed with `return_documents` one level deeper than it was read:
    at the depth the decoder still took, the encoder ran out of recursion (a 500, with two
    tracebacks). Every depth is answered, or refused as a client's fault."""
    client, _ = serve(kind="reranker")
    statuses = set()
    for depth in range(900, 1000):  # around the interpreter's recursion limit (1000)
        document = '{"text":"b","x":' + '{"a":' * depth + "1" + "}" * depth + "}"
        answer = client.post("/v2/rerank", headers={"content-type": "application/json"},
                             content='{"query":"q","return_documents":true,"documents":['
                             + document + "]}")
        statuses.add(answer.status_code)
        if answer.status_code == 400:
            assert "nested too deeply" in answer.json()["error"]
    assert statuses == {200, 400}


def test_embed_sparse_and_embed_all_pass_their_fields(asked: list) -> None:
    client, _ = serve()
    body = {"inputs": ["a", "b"], "prompt_name": "query", **OPTIONS}
    assert ok(client.post("/embed_sparse", json=body)) == [
        [{"index": 2, "value": 0.5}, {"index": 5, "value": 1.5}]]
    assert ok(client.post("/embed_all", json=body)) == [[[1.0], [1.0]], [[0.0]]]
    passed = {**PASSED, "prompt_name": "query"}
    assert asked == [("embed_sparse", ["a", "b"], passed), ("embed_all", ["a", "b"], passed)]


@pytest.mark.parametrize(("kind", "pooling", "task", "answer"), [
    ("classifier", "cls", None,
     [{"score": 0.875, "label": "yes"}, {"score": 0.125, "label": "no"}]),
    ("reranker", "cls", None, [{"index": 0, "score": 0.25}]),
    ("embedding", "splade", None, [[{"index": 2, "value": 0.5}, {"index": 5, "value": 1.5}]]),
    ("embedding", "mean", None, [[3.0, 4.0]]),
    ("embedding", "mean", "sentence-similarity", [pytest.approx(0.6)]),
])
def test_post_root_answers_as_the_served_models_route(asked: list, kind: str, pooling: str,
                                                      task: str | None, answer: list) -> None:
    client, _ = serve(task=task, kind=kind, pooling=pooling)
    body = ({"inputs": {"source_sentence": "s", "sentences": ["a"]}} if task else
            {"query": "q", "texts": ["a"]} if kind == "reranker" else {"inputs": "a"})
    for path in ("/", "/invocations"):
        response = client.post(path, json=body)
        assert ok(response) == answer
        assert response.headers["x-compute-tokens"] == "7"


def test_vertex_answers_each_instance_by_its_shape(asked: list) -> None:
    client, _ = serve(kind="reranker")
    instances = [{"query": "q", "texts": ["a", "b"]}, {"inputs": ["q", "a"]}]
    assert ok(client.post("/vertex", json={"instances": instances})) == {"predictions": [
        [{"index": 1, "score": 0.75}, {"index": 0, "score": 0.25}],
        [{"score": 0.875, "label": "yes"}, {"score": 0.125, "label": "no"}]]}
    assert [call[0] for call in asked] == ["rerank", "classify"]
    empty = client.post("/vertex", json={"instances": []})
    assert (empty.status_code, empty.json()) == (
        400, {"error": "`instances` cannot be empty", "error_type": "Empty"})


@pytest.mark.parametrize(("pooling", "answer"), [
    ("mean", [[[3.0, 4.0]]]),
    ("splade", [[[{"index": 2, "value": 0.5}, {"index": 5, "value": 1.5}]]]),
])
def test_vertex_embeds_whatever_post_root_answers(asked: list, pooling: str,
                                                  answer: list) -> None:
    # TASK picks what POST / and /invocations answer; TEI's /vertex sends an embedding model's
    # instances to /embed (/embed_sparse for SPLADE) whatever TASK says.
    client, _ = serve(task="sentence-similarity", pooling=pooling)
    assert ok(client.post("/vertex", json={"instances": [{"inputs": "a"}]})) == {
        "predictions": answer}


@pytest.mark.parametrize(("kind", "pooling", "instance"), [
    ("classifier", "cls", {"inputs": [["a", "b"], ["c"]]}),
    ("reranker", "cls", {"query": "q", "texts": ["a", "b"]}),
    ("embedding", "splade", {"inputs": "a"}),
    ("embedding", "mean", {"inputs": ["a", "b"]}),
])
def test_vertex_documents_the_served_models_instances(asked: list, kind: str, pooling: str,
                                                      instance: dict) -> None:
    import jsonschema

    client, _ = serve(kind=kind, pooling=pooling)
    document = ok(client.get("/openapi.json"))
    post = document["paths"]["/vertex"]["post"]
    body = {"instances": [instance]}
    jsonschema.validate(body, {**post["requestBody"]["content"]["application/json"]["schema"],
                               "components": document["components"]})
    jsonschema.validate(ok(client.post("/vertex", json=body)), {
        **post["responses"]["200"]["content"]["application/json"]["schema"],
        "components": document["components"]})


def test_vertex_refuses_more_instances_than_are_admitted_at_once(asked: list) -> None:
    client, _ = serve()  # (--max-concurrent-requests 512)
    instances = [{"inputs": "a"}] * 513
    answer = client.post("/vertex", json={"instances": instances})
    assert (answer.status_code, answer.json()["error"]) == (
        422, "batch size 513 > maximum concurrent inputs 512 (--max-concurrent-requests)")


def test_all_or_nothing_cancels_the_rest_on_a_failure() -> None:
    from router.routes.root import all_or_nothing

    async def fails() -> None:
        raise RuntimeError("no")

    async def main() -> tuple[str, bool]:
        waiting = asyncio.ensure_future(asyncio.sleep(60))
        with pytest.raises(RuntimeError) as raised:
            await all_or_nothing([waiting, fails()])
        await asyncio.sleep(0)
        return str(raised.value), waiting.cancelled()

    assert asyncio.run(main()) == ("no", True)
