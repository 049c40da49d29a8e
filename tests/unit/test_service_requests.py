"""InferenceService.run with a stand-in worker and tokenizer: what it asks the tokenizer for
(truncation, side, rules and special tokens of the route taken), what it counts for each
request's inputs, and its refusal while no worker is ready (mutation testing, round 8)."""

from __future__ import annotations

import asyncio
import dataclasses
import types
from typing import Any

import numpy as np
import pytest

from router import service as service_module
from router.tokenization import Encoded
from shared import protocol
from shared.errors import EmbedServeError
from tests.fixtures.prometheus import samples
from tests.unit.test_service_start import started_stand_in


def asked_of_tokenizer(monkeypatch: pytest.MonkeyPatch, *lengths: int) -> list[dict]:
    """Each call's keyword arguments; every call tokenizes to inputs of `lengths` tokens."""
    calls: list[dict] = []

    async def tokenize_inputs(inputs, **kwargs):
        calls.append(kwargs)
        return [Encoded(np.arange(n, dtype=np.int32), np.zeros(n, dtype=np.int32))
                for n in lengths], 7

    monkeypatch.setattr(service_module, "tokenize_inputs", tokenize_inputs)
    return calls


class _QueryRoute:
    """A stand-in QueryVectors that every request takes: one sparse row per input."""

    def __init__(self, rules: Any) -> None:
        self.rules = rules

    def choose(self, prompt_name: str | None) -> tuple[Any, str | None]:
        return self, None

    def vectors(self, encoded: list[Encoded]) -> list:
        return [(np.array([1], dtype=np.int32), np.array([0.5], dtype=np.float32))
                for _ in encoded]


async def _run(service: Any, **kwargs: Any) -> Any:
    try:
        return await service.run(["a", "b"], kwargs.pop("output", protocol.OutputKind.POOLED),
                                 **{"truncate": None, "direction": "right", **kwargs})
    finally:
        await service.stop()


@pytest.mark.parametrize(("auto_truncate", "truncate", "expected"), [
    (True, None, True), (True, False, False), (False, True, True), (False, None, False)])
def test_a_requests_truncate_wins_over_auto_truncate(
        monkeypatch: pytest.MonkeyPatch, auto_truncate: bool, truncate: bool | None,
        expected: bool) -> None:
    calls = asked_of_tokenizer(monkeypatch, 3)

    async def main() -> None:
        service = await started_stand_in()
        service.auto_truncate = auto_truncate
        await _run(service, truncate=truncate, direction="Left")

    asyncio.run(main())
    assert calls[0]["truncate"] is expected
    assert calls[0]["direction"] == "left"
    assert calls[0]["special_tokens"] is True


def test_the_query_route_tokenizes_by_its_rules_without_special_tokens(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = asked_of_tokenizer(monkeypatch, 3, 4)

    async def main() -> tuple[Any, Any, str]:
        service = await started_stand_in()
        route = _QueryRoute(dataclasses.replace(service.rules, max_input_length=64))
        service.queries = route  # type: ignore[assignment]
        clock = iter((10.0, 10.25, 11.0))
        monkeypatch.setattr(service_module, "time",
                            types.SimpleNamespace(perf_counter=lambda: next(clock)))
        outcome = await _run(service)
        return route, outcome, service.metrics.render().decode()

    route, outcome, metrics = asyncio.run(main())
    assert calls[0]["rules"] is route.rules
    assert calls[0]["special_tokens"] is False
    assert len(outcome.rows) == 2
    values = samples(metrics)
    assert (values["te_embed_count"], values["te_embed_success"]) == (2, 2)
    assert values["te_request_input_length_count"] == 2
    assert values["te_request_input_length_sum"] == 7
    assert values["te_request_inference_duration_sum"] == pytest.approx(0.75)


def test_scored_inputs_count_as_predict(monkeypatch: pytest.MonkeyPatch) -> None:
    asked_of_tokenizer(monkeypatch, 3, 4)

    async def main() -> str:
        service = await started_stand_in()
        await _run(service, output=protocol.OutputKind.LOGITS)
        return service.metrics.render().decode()

    values = samples(asyncio.run(main()))
    assert (values["te_predict_count"], values["te_embed_count"]) == (2, 0)


def test_server_made_inputs_count_each_as_an_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-rank pieces: one client input, three inputs admitted and counted."""
    asked_of_tokenizer(monkeypatch, 3)

    async def main() -> str:
        service = await started_stand_in()
        try:
            await service.run(["p"] * 3, protocol.OutputKind.POOLED, truncate=None,
                              direction="right", client_inputs=1)
        finally:
            await service.stop()
        return service.metrics.render().decode()

    assert samples(asyncio.run(main()))["te_embed_count"] == 3


def test_a_request_while_no_worker_is_ready_is_refused_as_unhealthy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    asked_of_tokenizer(monkeypatch, 3)

    async def main() -> str:
        service = await started_stand_in()
        service.workers.any_ready = False  # type: ignore[misc]
        try:
            await _run(service)
        except EmbedServeError as exc:
            return exc.message
        return "answered"

    assert asyncio.run(main()) == "no backend worker is ready (the model is loading or restarting)"


def test_a_traced_request_records_its_phases(monkeypatch: pytest.MonkeyPatch) -> None:
    asked_of_tokenizer(monkeypatch, 3)
    recorded: list[tuple] = []
    monkeypatch.setattr(service_module, "record_phases", lambda *args: recorded.append(args))
    tracer = object()

    async def main() -> None:
        service = await started_stand_in()
        service.tracer = tracer  # type: ignore[assignment]
        await _run(service)

    asyncio.run(main())
    assert [args[0] for args in recorded] == [tracer]


def _embed(monkeypatch: pytest.MonkeyPatch, request: Any, **model: Any) -> tuple[Any, list, str]:
    """(embed's answer or refusal message, the output kinds inferred, the metrics): a model
    whose inference gives every input the sparse row {1: 0.5}."""
    asked_of_tokenizer(monkeypatch, 3)
    kinds: list = []

    async def main() -> tuple[Any, str]:
        service = await started_stand_in()
        for name, value in model.items():
            setattr(service, name, value)

        async def infer(encoded, output):
            kinds.append(output)
            return [(np.array([1], dtype=np.int32), np.array([0.5], dtype=np.float32))], {}

        service._infer = infer  # type: ignore[method-assign]
        try:
            answer = (await service.embed(request)).vectors
        except EmbedServeError as exc:
            answer = exc.message
        finally:
            await service.stop()
        return answer, service.metrics.render().decode()

    answer, metrics = asyncio.run(main())
    return answer, kinds, metrics


def test_a_csr_models_vectors_are_its_sparse_rows_written_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from router.schemas import EmbedRequest

    vectors, kinds, metrics = _embed(monkeypatch, EmbedRequest(inputs=["a"], normalize=False),
                                     csr=True)
    expected = np.zeros((1, 32), dtype=np.float32)
    expected[0, 1] = 0.5
    np.testing.assert_array_equal(vectors, expected)
    assert kinds == [protocol.OutputKind.SPARSE]
    # A list of one input is a batch, as TEI counts it.
    assert samples(metrics)['te_request_count{method="batch"}'] == 1


@pytest.mark.parametrize(("request_fields", "model", "refusal", "err"), [
    ({"normalize": True}, {"csr": True},
     "Backend error: `normalize` is not available for sparse (CSR) models", "model_type"),
    ({"dimensions": 33}, {}, "Input validation error: `dimensions` should be smaller than "
     "the maximum embedding dimension.", "validation"),
])
def test_embeds_refusals_are_counted(monkeypatch: pytest.MonkeyPatch, request_fields: dict,
                                     model: dict, refusal: str, err: str) -> None:
    from router.schemas import EmbedRequest

    message, kinds, metrics = _embed(monkeypatch, EmbedRequest(inputs="a", **request_fields),
                                     **model)
    assert (message, kinds) == (refusal, [])
    assert samples(metrics)[f'te_request_failure{{err="{err}"}}'] == 1
