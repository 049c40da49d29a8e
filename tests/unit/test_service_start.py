"""InferenceService: start checks the first READY against the router's input limit, and a request
reaches an idle worker at once."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from router.inputs import InputRules
from router.metrics import Metrics
from router.service import InferenceService
from shared import protocol
from shared.errors import ConfigError


class _Tokenizers:
    async def start(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Workers:
    """Just enough of a WorkerPool to answer READY."""

    def __init__(self, max_positions: int) -> None:
        self.ready = protocol.Ready(
            worker_id="0", pid=1, device="cpu", dtype="float32", hidden_size=32,
            embedding_dim=32, vocab_size=100, max_positions=max_positions,
            cost_model=protocol.CostModel.PADDED, outputs=[protocol.OutputKind.POOLED],
            warmup_ms=1.0)

    async def start(self, timeout: float) -> protocol.Ready:
        return self.ready

    async def stop(self) -> None:
        pass


def _service(max_input_length: int, max_positions: int) -> InferenceService:
    return InferenceService(
        rules=InputRules(max_input_length, 32, 100, {}, None), embedding_dim=32,
        max_concurrent_requests=8, max_batch_tokens=1024, max_batch_requests=None,
        auto_truncate=False, position_offset=0, model_kind="embedding", splade=False,
        tokenizers=_Tokenizers(), workers=_Workers(max_positions),  # type: ignore[arg-type]
        metrics=Metrics(max_input_length))


def test_inputs_longer_than_the_models_positions_stop_the_start() -> None:
    async def start() -> None:
        await _service(max_input_length=512, max_positions=128).start(1.0)

    with pytest.raises(ConfigError, match=r"at most 128 tokens per input.*512"):
        asyncio.run(start())


@pytest.mark.parametrize("max_positions", [512, 8192])
def test_a_model_that_takes_the_inputs_starts(max_positions: int) -> None:
    async def start() -> bool:
        service = _service(max_input_length=512, max_positions=max_positions)
        await service.start(1.0)
        try:
            return service._queue is not None
        finally:
            await service.stop()

    assert asyncio.run(start())


class _OneWorker(_Workers):
    """A pool whose one worker always has a free slot (and `in_flight` batches already);
    records the batches it is given."""

    any_ready = healthy = True

    def __init__(self, in_flight: int) -> None:
        super().__init__(max_positions=512)
        self.in_flight = dict.fromkeys(range(in_flight))
        self.batches: list[list] = []

    def pick(self) -> object:
        return self

    def submit(self, worker: object, entries: list) -> None:
        self.batches.append(entries)


async def _batches_after_one_step(in_flight: int) -> tuple[list[list], list[list]]:
    """The batches given to the worker in the step that queued a request of two inputs, and
    once the scheduler had its turn."""
    from router.tokenization import Encoded

    service = _service(max_input_length=512, max_positions=512)
    workers = service.workers = _OneWorker(in_flight)  # type: ignore[assignment]
    await service.start(1.0)
    encoded = [Encoded(np.arange(5, dtype=np.int32), np.zeros(5, dtype=np.int32))] * 2
    request = asyncio.ensure_future(service._infer(encoded, protocol.OutputKind.POOLED))
    await asyncio.sleep(0)  # the request's first step (ahead of the scheduler's wake-up)
    at_once = list(workers.batches)
    for _ in range(3):
        await asyncio.sleep(0)
    request.cancel()
    await service.stop()
    return at_once, workers.batches


def test_an_idle_worker_gets_a_request_without_a_turn_of_the_event_loop() -> None:
    """A query's latency: the entries go to the idle worker in the step that queued them."""
    at_once, in_the_end = asyncio.run(_batches_after_one_step(in_flight=0))
    assert [len(batch) for batch in at_once] == [2]
    assert [len(batch) for batch in in_the_end] == [2]


def test_a_busy_worker_gets_requests_batched_by_the_scheduler() -> None:
    """Under load the batch forms on the scheduler's turn, with whatever else arrived."""
    at_once, in_the_end = asyncio.run(_batches_after_one_step(in_flight=1))
    assert at_once == []
    assert [len(batch) for batch in in_the_end] == [2]


def tokenized_as_three_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request tokenizes to one input of three tokens (no tokenizer pool needed)."""
    from router import service as service_module
    from router.tokenization import Encoded

    async def tokenize_inputs(inputs, **_):
        return [Encoded(np.arange(3, dtype=np.int32), np.zeros(3, dtype=np.int32))], 1

    monkeypatch.setattr(service_module, "tokenize_inputs", tokenize_inputs)


async def started_stand_in() -> InferenceService:
    """A started service whose worker is a stand-in and whose inference answers at once (a
    32-wide vector of ones): what is left to time is admission and tokenization."""
    service = _service(max_input_length=512, max_positions=512)
    service.workers = _OneWorker(in_flight=0)  # type: ignore[assignment]
    await service.start(1.0)

    async def infer(encoded, output):
        return [np.ones(32, dtype=np.float32)], {}

    service._infer = infer  # type: ignore[method-assign]
    return service


async def holding_every_permit(service: InferenceService, release: asyncio.Event) -> None:
    async with service.admission.admitted(8):
        await release.wait()


def test_a_wait_for_permits_is_not_counted_as_tokenization(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """A gRPC stream message that waits for its permits (`patiently`) starts its clock once
    admitted, as TEI's does: the wait is neither tokenization time nor request duration."""
    from router.admission import patiently

    tokenized_as_three_tokens(monkeypatch)

    async def main() -> float:
        service = await started_stand_in()
        release = asyncio.Event()
        holder = asyncio.ensure_future(holding_every_permit(service, release))
        await asyncio.sleep(0)
        waiter = asyncio.ensure_future(patiently(lambda: service.run(
            ["x"], protocol.OutputKind.POOLED, truncate=None, direction="right")))
        await asyncio.sleep(0.5)  # waiting for a permit all along
        release.set()
        outcome = await waiter
        await holder
        await service.stop()
        return outcome.timings.tokenization_ms

    assert asyncio.run(main()) < 250  # not the 500 ms spent waiting


def test_inputs_tokenized_after_the_last_worker_died_are_refused_not_queued() -> None:
    """The pool's death notice emptied the queue while the request was tokenizing: its entries
    must not then wait in the queue for a restart that may take long or never succeed."""
    from router.tokenization import Encoded
    from shared.errors import EmbedServeError

    async def main() -> None:
        service = _service(max_input_length=512, max_positions=512)
        workers = service.workers = _OneWorker(in_flight=0)  # type: ignore[assignment]
        await service.start(1.0)
        workers.any_ready = workers.healthy = False  # type: ignore[misc]
        workers.pick = lambda: None  # type: ignore[method-assign]
        service.on_workers_changed()  # what the pool calls on the death
        encoded = [Encoded(np.arange(5, dtype=np.int32), np.zeros(5, dtype=np.int32))]
        try:
            with pytest.raises(EmbedServeError, match="no backend worker"):
                await asyncio.wait_for(service._infer(encoded, protocol.OutputKind.POOLED), 1.0)
            assert len(service._queue or ()) == 0
        finally:
            await service.stop()

    asyncio.run(main())
