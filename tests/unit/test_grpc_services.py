"""router/grpc/services.py: each servicer passes its message's fields to router.operations as
they are named, and shapes the reply (Info, Metadata, ranks) field by field."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from router import operations
from router.grpc import services
from router.grpc.protos import pb
from router.results import Outcome, Timings
from router.tokenization import Token
from shared.errors import EmbedServeError, ErrorType


class _Aborted(Exception):
    pass


class _Context:
    async def send_initial_metadata(self, headers) -> None:
        pass

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


def _state(kind: str = "embedding", service: object = None, payload_limit: int = 2_000_000,
           info: object = None) -> SimpleNamespace:
    return SimpleNamespace(
        service=service, model=SimpleNamespace(kind=kind), compute_type="cpu",
        live_info=lambda: info,
        config=SimpleNamespace(max_concurrent_requests=8, grpc_max_parallel_stream_requests=None,
                               payload_limit=payload_limit))


def _timings(admitted_at: float | None = None) -> Timings:
    return Timings(characters=5, tokens=3, tokenization_ms=1.5, queue_ms=2.25,
                   inference_ms=4.0,
                   admitted_at=time.perf_counter() if admitted_at is None else admitted_at)


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize(("kind", "model_type"), [
    ("embedding", pb.MODEL_TYPE_EMBEDDING), ("classifier", pb.MODEL_TYPE_CLASSIFIER),
    ("reranker", pb.MODEL_TYPE_RERANKER)])
def test_info_answers_every_field_of_the_live_info(kind: str, model_type: int) -> None:
    info = SimpleNamespace(
        version="1.2.3", sha="abc", docker_label="label", model_id="org/model",
        model_sha="def", model_dtype="float16", max_concurrent_requests=11,
        max_input_length=12, max_batch_tokens=13, max_batch_requests=14,
        max_client_batch_size=15, tokenization_workers=16)
    servicer = services.InfoServicer(_state(kind, info=info))  # type: ignore[arg-type]
    reply = run(servicer.Info(pb.InfoRequest(), _Context()))
    assert reply.model_type == model_type
    for field in ("version", "sha", "docker_label", "model_id", "model_sha", "model_dtype",
                  "max_concurrent_requests", "max_input_length", "max_batch_tokens",
                  "max_batch_requests", "max_client_batch_size", "tokenization_workers"):
        assert getattr(reply, field) == getattr(info, field), field


def test_metadata_carries_each_timing_in_nanoseconds() -> None:
    admitted = time.perf_counter() - 0.05
    metadata = services.metadata(_timings(admitted))
    assert (metadata.compute_chars, metadata.compute_tokens) == (5, 3)
    assert (metadata.tokenization_time_ns, metadata.queue_time_ns,
            metadata.inference_time_ns) == (1_500_000, 2_250_000, 4_000_000)
    assert 50_000_000 <= metadata.total_time_ns < 5_000_000_000  # from the admission
    started = time.perf_counter() - 0.5
    assert services.metadata(_timings(admitted), started).total_time_ns >= 500_000_000


def test_truncation_directions_and_prompt_names_as_the_proto_sends_them() -> None:
    assert services._direction(pb.TRUNCATION_DIRECTION_RIGHT) == "right"
    assert services._direction(pb.TRUNCATION_DIRECTION_LEFT) == "left"
    with pytest.raises(EmbedServeError) as info:
        services._direction(7)
    assert info.value.error_type == ErrorType.VALIDATION
    assert info.value.message == (
        "Input validation error: `truncation_direction` 7 is not one of "
        "TRUNCATION_DIRECTION_RIGHT (0) and TRUNCATION_DIRECTION_LEFT (1)")
    # `optional`: unset is no prompt; an empty name sent is a name (refused as unknown).
    assert services._prompt_name(pb.EmbedRequest(inputs="a")) is None
    assert services._prompt_name(pb.EmbedRequest(inputs="a", prompt_name="")) == ""
    assert services._prompt_name(pb.EmbedRequest(inputs="a", prompt_name="q")) == "q"


def _recording(monkeypatch: pytest.MonkeyPatch, name: str, result: object) -> list[dict]:
    calls: list[dict] = []

    async def fake(service, *args, **kwargs):
        calls.append({"args": args, **kwargs})
        return result

    monkeypatch.setattr(operations, name, fake)
    return calls


def test_embed_servicers_pass_truncate_direction_and_prompt(monkeypatch) -> None:
    sparse = _recording(monkeypatch, "embed_sparse", Outcome(
        [(np.array([2, 5]), np.array([0.5, 0.25], dtype=np.float32))], _timings()))
    every = _recording(monkeypatch, "embed_all", Outcome(
        [np.ones((2, 3), dtype=np.float32)], _timings()))
    servicer = services.EmbedServicer(_state())  # type: ignore[arg-type]
    wanted = {"truncate": True, "direction": "left", "prompt_name": "q"}
    for truncate in (True, False):
        wanted["truncate"] = truncate
        reply = run(servicer.EmbedSparse(pb.EmbedSparseRequest(
            inputs="a", truncate=truncate, truncation_direction=pb.TRUNCATION_DIRECTION_LEFT,
            prompt_name="q"), _Context()))
        assert [(v.index, v.value) for v in reply.sparse_embeddings] == [(2, 0.5), (5, 0.25)]
        assert reply.metadata.compute_tokens == 3
        reply = run(servicer.EmbedAll(pb.EmbedAllRequest(
            inputs="a", truncate=truncate, truncation_direction=pb.TRUNCATION_DIRECTION_LEFT,
            prompt_name="q"), _Context()))
        assert [list(t.embeddings) for t in reply.token_embeddings] == [[1.0] * 3] * 2
        assert sparse.pop() == every.pop() == {"args": ("a",), **wanted}


def test_embed_passes_its_fields_to_the_service() -> None:
    requests: list = []

    async def embed(request):
        requests.append(request)
        return SimpleNamespace(vectors=np.array([[0.5, 2.0]], dtype=np.float32),
                               timings=_timings())

    servicer = services.EmbedServicer(_state(service=SimpleNamespace(embed=embed)))  # type: ignore[arg-type]
    for flag in (True, False):
        reply = run(servicer.Embed(pb.EmbedRequest(
            inputs="a", truncate=flag, normalize=flag, prompt_name="q",
            truncation_direction=pb.TRUNCATION_DIRECTION_LEFT), _Context()))
        assert list(reply.embeddings) == [0.5, 2.0]
        [request] = requests
        assert (request.inputs, request.truncate, request.normalize, request.prompt_name,
                request.truncation_direction) == ("a", flag, flag, "q", "left")
        requests.clear()


@pytest.mark.parametrize("count", [0, 3])
def test_predict_pair_takes_one_or_two_texts(monkeypatch, count: int) -> None:
    classify = _recording(monkeypatch, "classify", ([[(0.75, "yes")]], _timings()))
    servicer = services.PredictServicer(_state("classifier"))  # type: ignore[arg-type]
    for inputs in (["a"], ["a", "b"]):
        run(servicer.PredictPair(pb.PredictPairRequest(inputs=inputs), _Context()))
        assert classify.pop()["args"] == (servicer.model, inputs)
    with pytest.raises(_Aborted) as info:
        run(servicer.PredictPair(pb.PredictPairRequest(inputs=["t"] * count), _Context()))
    assert info.value.args == (grpc.StatusCode.INVALID_ARGUMENT, "`inputs` must have a single "
                               f"or two elements. Given: {count}")


def test_predict_and_tokenize_servicers_pass_their_fields(monkeypatch) -> None:
    classify = _recording(monkeypatch, "classify", ([[(0.75, "yes")]], _timings()))
    tokenize = _recording(monkeypatch, "tokenize", [[Token(7, "hé", False, 2, 5),
                                                     Token(1, "[CLS]", True, None, None)]])
    decode = _recording(monkeypatch, "decode", ["text"])
    predictor = services.PredictServicer(_state("classifier"))  # type: ignore[arg-type]
    for truncate in (True, False):
        reply = run(predictor.Predict(pb.PredictRequest(
            inputs="a", truncate=truncate, raw_scores=True,
            truncation_direction=pb.TRUNCATION_DIRECTION_LEFT), _Context()))
        assert [(p.score, p.label) for p in reply.predictions] == [(0.75, "yes")]
        assert classify.pop() == {"args": (predictor.model, "a"), "truncate": truncate,
                                  "direction": "left", "raw_scores": True}
    tokenizer = services.TokenizeServicer(_state())  # type: ignore[arg-type]
    for flag in (True, False):
        reply = run(tokenizer.Tokenize(pb.EncodeRequest(inputs="a", add_special_tokens=flag,
                                                        prompt_name="q"), _Context()))
        assert [(t.id, t.text, t.special, t.start if t.HasField("start") else None,
                 t.stop if t.HasField("stop") else None) for t in reply.tokens] == [
            (7, "hé", False, 2, 5), (1, "[CLS]", True, None, None)]
        assert tokenize.pop() == {"args": (["a"],), "add_special_tokens": flag,
                                  "prompt_name": "q"}
        assert run(tokenizer.Decode(pb.DecodeRequest(ids=[4, 2], skip_special_tokens=flag),
                                    _Context())).text == "text"
        assert decode.pop() == {"args": ([[4, 2]],), "skip_special_tokens": flag}


def _reranker(monkeypatch, payload_limit: int = 2_000_000,
              delay: float = 0.0) -> tuple[services.RerankServicer, list[dict]]:
    """A RerankServicer whose scores are 0.1, 0.2, ... in the texts' order; each scoring
    takes `delay` before its admission (a wait for permits)."""
    calls: list[dict] = []

    async def rerank(service, model, query, texts, **kwargs):
        first = sum(len(c["texts"]) for c in calls)
        calls.append({"query": query, "texts": list(texts), **kwargs})
        await asyncio.sleep(delay)
        scores = np.array([0.1 * (first + i + 1) for i in range(len(texts))])
        return scores, _timings()

    monkeypatch.setattr(operations, "rerank", rerank)
    service = SimpleNamespace(require=lambda kind: None)
    state = _state("reranker", service, payload_limit)
    return services.RerankServicer(state), calls  # type: ignore[arg-type]


async def _stream(*texts: str, **first: object) -> AsyncIterator[pb.RerankStreamRequest]:
    for i, text in enumerate(texts):
        yield pb.RerankStreamRequest(query="q", text=text, **(first if i == 0 else {}))


def test_rerank_passes_its_fields_and_times_from_the_call(monkeypatch) -> None:
    servicer, calls = _reranker(monkeypatch, delay=0.3)
    for truncate in (True, False):
        reply = run(servicer.Rerank(pb.RerankRequest(
            query="q", texts=["a", "b"], truncate=truncate, raw_scores=True,
            truncation_direction=pb.TRUNCATION_DIRECTION_LEFT), _Context()))
        assert [r.index for r in reply.ranks] == [1, 0]
        # TEI's Rerank times from the call: the wait for the texts' permits is in it.
        assert reply.metadata.total_time_ns >= 300_000_000
        assert calls.pop() == {"query": "q", "texts": ["a", "b"], "truncate": truncate,
                               "direction": "left", "raw_scores": True}


def test_rerank_stream_takes_the_first_messages_flags_and_times_from_the_call(
        monkeypatch) -> None:
    servicer, calls = _reranker(monkeypatch, delay=0.3)
    messages = _stream("a", "b", "c", raw_scores=True, return_text=True, truncate=True,
                       truncation_direction=pb.TRUNCATION_DIRECTION_LEFT)
    reply = run(servicer.RerankStream(messages, _Context()))
    assert [(r.index, r.text) for r in reply.ranks] == [(2, "c"), (1, "b"), (0, "a")]
    assert reply.metadata.total_time_ns >= 300_000_000
    assert reply.metadata.compute_chars == 15  # the three messages' counts added up
    # Each message's own truncate and direction; the first message's raw_scores for all.
    assert [(c["texts"], c["truncate"], c["direction"], c["raw_scores"]) for c in calls] == [
        (["a"], True, "left", True), (["b"], False, "right", True),
        (["c"], False, "right", True)]


@pytest.mark.parametrize(("limit", "refused"), [(5, True), (6, False)])
def test_rerank_stream_bounds_returned_texts_in_bytes(monkeypatch, limit: int,
                                                      refused: bool) -> None:
    servicer, _ = _reranker(monkeypatch, payload_limit=limit)
    call = servicer.RerankStream(_stream("éé", "a", "b", return_text=True), _Context())
    if not refused:  # 6 bytes (4 characters) are within a 6-byte limit
        assert len(run(call).ranks) == 3
        return
    with pytest.raises(_Aborted) as info:
        run(call)
    assert info.value.args == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "the stream's texts, returned with return_text, "
        "exceed the payload limit of 5 bytes")


def test_an_empty_rerank_stream_is_refused_as_empty_texts(monkeypatch) -> None:
    servicer, calls = _reranker(monkeypatch)
    with pytest.raises(_Aborted) as info:
        run(servicer.RerankStream(_stream(), _Context()))
    assert info.value.args == (grpc.StatusCode.INVALID_ARGUMENT,
                               "`texts` cannot be empty: the stream sent no message")
    assert calls == []
