"""InferenceService.run / embed's bookkeeping, with a stand-in worker: the timings a request
reports (per input means), the tokens it counts, and what `accepted` refuses and counts."""

from __future__ import annotations

import asyncio
import dataclasses
import types
from typing import Any

import numpy as np
import pytest

from router import service as service_module
from router.inputs import InputRules
from router.tokenization import Encoded
from shared import protocol
from shared.errors import EmbedServeError
from tests.fixtures.prometheus import samples
from tests.unit.test_service_start import _service, started_stand_in


class _Done:
    """An entry as the service reads it once answered: when it was queued and dispatched."""

    def __init__(self, enqueued_at: float, dispatched_at: float) -> None:
        self.enqueued_at, self.dispatched_at = enqueued_at, dispatched_at


def clock(monkeypatch: pytest.MonkeyPatch, *times: float) -> None:
    """The service's perf_counter answers `times` in turn (admitted, tokenized, done)."""
    ticks = iter(times)
    monkeypatch.setattr(service_module, "time",
                        types.SimpleNamespace(perf_counter=lambda: next(ticks)))


def tokenized_as(monkeypatch: pytest.MonkeyPatch, *lengths: int) -> None:
    async def tokenize_inputs(inputs, **_):
        return [Encoded(np.arange(n, dtype=np.int32), np.zeros(n, dtype=np.int32))
                for n in lengths], 7

    monkeypatch.setattr(service_module, "tokenize_inputs", tokenize_inputs)


def test_queue_and_inference_times_are_means_over_the_inputs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    tokenized_as(monkeypatch, 3, 4)

    async def main() -> Any:
        service = await started_stand_in()
        finished = {_Done(10.5, 11.0): 12.0, _Done(10.5, 12.0): 14.0}

        async def infer(encoded, output):
            return [np.ones(32, dtype=np.float32)] * 2, finished

        service._infer = infer  # type: ignore[method-assign]
        clock(monkeypatch, 10.0, 10.5, 14.0)
        try:
            outcome = await service.run(["a", "b"], protocol.OutputKind.POOLED, truncate=None,
                                        direction="right")
            return outcome.timings, service.metrics.render().decode()
        finally:
            await service.stop()

    timings, metrics = asyncio.run(main())
    assert (timings.characters, timings.tokens) == (7, 7)
    assert timings.tokenization_ms == pytest.approx(500.0)
    assert timings.queue_ms == pytest.approx(1000.0)  # (0.5 s + 1.5 s) / 2
    assert timings.inference_ms == pytest.approx(1500.0)  # (1 s + 2 s) / 2
    assert timings.admitted_at == 10.0
    # The request's queue time in the metrics is the same mean.
    assert samples(metrics)["te_request_queue_duration_sum"] == pytest.approx(1.0)


def test_an_answer_computed_here_counts_from_tokenization_to_done(
        monkeypatch: pytest.MonkeyPatch) -> None:
    tokenized_as(monkeypatch, 3)

    async def main() -> Any:
        service = await started_stand_in()  # its inference gives no entries
        clock(monkeypatch, 10.0, 10.25, 11.0)
        try:
            return (await service.run(["a"], protocol.OutputKind.POOLED, truncate=None,
                                      direction="right")).timings
        finally:
            await service.stop()

    timings = asyncio.run(main())
    assert timings.tokenization_ms == pytest.approx(250.0)
    assert timings.inference_ms == pytest.approx(750.0)
    assert timings.queue_ms == 0


def test_an_empty_bag_is_no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    async def tokenize_inputs(inputs, **_):
        bag = Encoded(np.array([99], dtype=np.int32), np.zeros(1, dtype=np.int32))
        return [bag, Encoded(np.array([5, 6], dtype=np.int32), np.zeros(2, dtype=np.int32))], 2

    monkeypatch.setattr(service_module, "tokenize_inputs", tokenize_inputs)

    async def main() -> int:
        service = await started_stand_in()
        service.empty_bag_id = 99
        try:
            return (await service.run(["", "ab"], protocol.OutputKind.POOLED, truncate=None,
                                      direction="right")).timings.tokens
        finally:
            await service.stop()

    assert asyncio.run(main()) == 2


def test_the_clients_count_is_the_one_bounded_and_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-rank pieces: 6 inputs made of one client input pass --max-client-batch-size (4)
    and count as a single request."""
    tokenized_as(monkeypatch, 3)

    async def main() -> str:
        service = await started_stand_in()
        service.rules = InputRules(512, 4, 100, {}, None)
        try:
            await service.run(["piece"] * 6, protocol.OutputKind.POOLED, truncate=None,
                              direction="right", client_inputs=1)
            with pytest.raises(EmbedServeError, match="batch size 6 > maximum"):
                await service.run(["piece"] * 6, protocol.OutputKind.POOLED, truncate=None,
                                  direction="right")
            return service.metrics.render().decode()
        finally:
            await service.stop()

    values = samples(asyncio.run(main()))
    assert values['te_request_count{method="single"}'] == 1
    assert values['te_request_success{method="single"}'] == 1
    assert values['te_request_count{method="batch"}'] == 1


def test_a_prompt_name_with_token_ids_is_refused() -> None:
    async def main() -> None:
        service = await started_stand_in()
        service.rules = InputRules(512, 32, 100, {"query": "q: "}, None)
        try:
            with pytest.raises(EmbedServeError, match="cannot be used with token-id inputs"):
                await service.run([[1, 2, 3]], protocol.OutputKind.POOLED, truncate=None,
                                  direction="right", prompt_name="query")
        finally:
            await service.stop()

    asyncio.run(main())


def test_an_oversized_batch_counts_as_received_and_failed() -> None:
    service = _service(max_input_length=512, max_positions=512)
    with pytest.raises(EmbedServeError, match="batch size 33"):
        service.accepted(["a"] * 33, list, "embedding")
    values = samples(service.metrics.render().decode())
    assert values['te_request_count{method="batch"}'] == 1
    # TEI's label for this refusal, apart from the other validation errors.
    assert values['te_request_failure{err="batch_size"}'] == 1
    assert values['te_request_failure{err="validation"}'] == 0


def test_a_route_the_model_does_not_serve_is_refused_after_the_inputs_are_read() -> None:
    service = _service(max_input_length=512, max_positions=512)
    service.model_kind = "classifier"
    with pytest.raises(EmbedServeError, match="Model is not an embedding model"):
        service.accepted(["a"], list, "embedding")


def test_dimensions_asked_for_win_over_the_models_truncate_dim(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from router.schemas import EmbedRequest

    tokenized_as(monkeypatch, 3)

    async def main() -> tuple[np.ndarray, np.ndarray]:
        service = await started_stand_in()  # (its vectors: 32 ones)
        service.output_dim = 16  # the model's truncate_dim
        try:
            asked = await service.embed(EmbedRequest(inputs="a", dimensions=24))
            default = await service.embed(EmbedRequest(inputs="a"))
            return asked.vectors, default.vectors
        finally:
            await service.stop()

    asked, default = asyncio.run(main())
    assert (asked.shape, default.shape) == ((1, 24), (1, 16))
    # Cut, then normalized.
    np.testing.assert_allclose(np.linalg.norm(asked, axis=1), 1.0, rtol=1e-6)


# TEI's words, its TextEmbeddingsError::Backend's "Backend error: " first (a live TEI 1.9.3
# answers /embed_sparse of a dense model "Backend error: Model is not an embedding model with
# SPLADE pooling").
@pytest.mark.parametrize(("kind", "model", "refusal"), [
    ("hidden states", "static", "Backend error: `embed_all` is not available for static "
     "embedding models (no token embeddings)"),
    ("hidden states", "splade", "Backend error: `embed_all` is not available for SPLADE models"),
    ("sparse", "csr", None),
    ("sparse", "lexical", None),
    ("sparse", "embedding", "Backend error: Model is not an embedding model with SPLADE pooling"),
    ("classifier", "reranker", None),
    ("classifier", "embedding", "Backend error: Model is not a classifier model"),
    ("reranker", "classifier", "Backend error: model is not a re-ranker model"),
])
def test_a_route_is_refused_as_tei_refuses_it_and_counted_as_the_model_type(
        kind: str, model: str, refusal: str | None) -> None:
    service = _service(max_input_length=512, max_positions=512)
    if model in ("reranker", "classifier"):
        service.model_kind = model
    elif model != "embedding":
        setattr(service, model, True)
    try:
        service.require(kind)
        message = None
    except EmbedServeError as exc:
        message = exc.message
    assert message == refusal
    values = samples(service.metrics.render().decode())
    assert values['te_request_failure{err="model_type"}'] == (refusal is not None)


def test_a_refusal_in_run_is_counted_by_its_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    tokenized_as(monkeypatch, 3)

    async def main() -> str:
        service = await started_stand_in()
        try:
            with pytest.raises(EmbedServeError, match="batch size 33 > maximum"):
                await service.run(["a"] * 33, protocol.OutputKind.POOLED, truncate=None,
                                  direction="right")
            return service.metrics.render().decode()
        finally:
            await service.stop()

    values = samples(asyncio.run(main()))
    assert values['te_request_failure{err="batch_size"}'] == 1
    assert values['te_request_success{method="batch"}'] == 0


def test_a_request_cancelled_before_its_answer_is_counted_as_dropped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    tokenized_as(monkeypatch, 3)

    async def main() -> str:
        service = await started_stand_in()

        async def infer(encoded, output):
            await asyncio.Event().wait()  # never answered

        service._infer = infer  # type: ignore[method-assign]
        request = asyncio.ensure_future(service.run(
            ["a"], protocol.OutputKind.POOLED, truncate=None, direction="right"))
        for _ in range(3):
            await asyncio.sleep(0)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await service.stop()
        return service.metrics.render().decode()

    values = samples(asyncio.run(main()))
    assert values['te_request_failure{err="dropped"}'] == 1
    assert values['te_request_success{method="single"}'] == 0


def test_only_scored_inputs_lose_their_trailing_pad_ids() -> None:
    service = _service(max_input_length=512, max_positions=512)
    service.rules = dataclasses.replace(service.rules, scored_before=0)
    padded = [Encoded(np.array([5, 6, 0, 0], dtype=np.int32), np.zeros(4, dtype=np.int32))]
    assert service._scored(padded, protocol.OutputKind.POOLED) is padded
    scored = service._scored(padded, protocol.OutputKind.LOGITS)
    assert [enc.ids.tolist() for enc in scored] == [[5, 6]]


def test_only_an_input_of_the_bag_id_alone_is_an_empty_bag() -> None:
    service = _service(max_input_length=512, max_positions=512)
    service.empty_bag_id = 99
    inputs = [Encoded(np.array(ids, dtype=np.int32), np.zeros(len(ids), dtype=np.int32))
              for ids in ([99], [99, 5], [5])]
    assert service._empty_bags(inputs) == 1


@pytest.mark.parametrize(("inputs", "prompt_name", "refusal"), [
    ([[1] * 600], None, "must have less than 512 tokens"),
    (["a"], "nope", "not found in the Sentence Transformers prompts"),
])
def test_what_tokenization_refuses_counts_as_tokenization(inputs: list, prompt_name: str | None,
                                                          refusal: str) -> None:
    """TEI's Infer counts whatever its encode refuses (an input past the limit without
    truncation, a prompt name the model lacks) as err="tokenization", not validation."""
    async def main() -> str:
        service = await started_stand_in()
        service.rules = InputRules(512, 32, 100, {"query": "q: "}, None)
        try:
            with pytest.raises(EmbedServeError, match=refusal):
                await service.run(inputs, protocol.OutputKind.POOLED, truncate=False,
                                  direction="right", prompt_name=prompt_name)
            return service.metrics.render().decode()
        finally:
            await service.stop()

    values = samples(asyncio.run(main()))
    assert values['te_request_failure{err="tokenization"}'] == 1
    assert values['te_request_failure{err="validation"}'] == 0
