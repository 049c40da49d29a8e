"""InferenceService's lifecycle with a stand-in worker pool: when it is ready, what a change in
the workers does to the queue and the scheduler, what stop ends, and the queue's size as the
metrics read it (mutation testing, round 8)."""

from __future__ import annotations

import asyncio

import numpy as np

from router.metrics import Metrics
from router.service import InferenceService
from router.tokenization import Encoded
from shared import logs, protocol
from shared.errors import EmbedServeError, backend
from tests.fixtures.prometheus import samples
from tests.unit.test_service_start import _OneWorker, _service, _Tokenizers, _Workers


class _BusyWorker(_OneWorker):
    """A pool whose one worker has no free slot until `free` is set."""

    def __init__(self) -> None:
        super().__init__(in_flight=1)
        self.free = False

    def pick(self) -> object:
        return self if self.free else None


class _ClosedTokenizers(_Tokenizers):
    def __init__(self) -> None:
        self.started = self.closed = False

    async def start(self) -> None:
        self.started = True

    def close(self) -> None:
        self.closed = True


def _encoded(*lengths: int) -> list[Encoded]:
    return [Encoded(np.arange(n, dtype=np.int32), np.zeros(n, dtype=np.int32))
            for n in lengths]


def test_the_width_without_dimensions_is_the_models_truncate_dim() -> None:
    def built(output_dim: int | None) -> int:
        return InferenceService(
            rules=_service(512, 512).rules, embedding_dim=32, max_concurrent_requests=8,
            max_batch_tokens=1024, max_batch_requests=None, auto_truncate=False,
            position_offset=0, model_kind="embedding", splade=False,
            tokenizers=_Tokenizers(), workers=_Workers(512),  # type: ignore[arg-type]
            metrics=Metrics(512), output_dim=output_dim).output_dim

    assert (built(16), built(None)) == (16, 32)


def test_ready_once_started_with_healthy_workers_and_not_draining() -> None:
    async def main() -> tuple[bool, bool, bool]:
        service = _service(max_input_length=512, max_positions=512)
        service.workers = _OneWorker(in_flight=0)  # type: ignore[assignment]
        before = service.ready  # the workers are healthy, but start is not over
        await service.start(1.0)
        started = service.ready
        await service.admission.drain(0.1)
        draining = service.ready
        await service.stop()
        return before, started, draining

    assert asyncio.run(main()) == (False, True, False)


def test_a_request_while_draining_is_refused_as_the_server_shutting_down() -> None:
    """Before any check of its inputs (33: past --max-client-batch-size)."""

    async def main() -> str:
        service = _service(max_input_length=512, max_positions=512)
        service.workers = _OneWorker(in_flight=0)  # type: ignore[assignment]
        await service.start(1.0)
        await service.admission.drain(0.1)
        try:
            await service.run(["a"] * 33, protocol.OutputKind.POOLED, truncate=None,
                              direction="right")
        except EmbedServeError as exc:
            return exc.message
        finally:
            await service.stop()
        return "answered"

    assert asyncio.run(main()) == "the server is shutting down"


def test_waiting_inputs_stay_queued_while_a_worker_is_up_and_go_once_a_slot_frees() -> None:
    """A change in the workers (here a slot freed) wakes the scheduler; only when no worker is
    up are the waiting inputs failed. The inputs carry their request's x-request-id."""

    async def main() -> tuple[int, int, list[int], bool, set[str]]:
        service = _service(max_input_length=512, max_positions=512)
        workers = service.workers = _BusyWorker()  # type: ignore[assignment]
        await service.start(1.0)
        logs.current_span.set(logs.LogSpan("POST /embed", "req-9"))  # as RequestIdMiddleware
        request = asyncio.ensure_future(
            service._infer(_encoded(3, 4), protocol.OutputKind.POOLED))
        for _ in range(3):
            await asyncio.sleep(0)
        metrics = samples(service.metrics.render().decode())
        service.on_workers_changed()  # a worker is still up: nothing failed
        await asyncio.sleep(0)
        waiting = len(service._queue or ())
        workers.free = True
        service.on_workers_changed()  # its slot freed
        for _ in range(3):
            await asyncio.sleep(0)
        done = request.done()
        request.cancel()
        await service.stop()
        return (int(metrics["te_queue_size"]), waiting, [len(b) for b in workers.batches],
                done, {e.request_id for b in workers.batches for e in b})

    assert asyncio.run(main()) == (2, 2, [2], False, {"req-9"})


def test_abandoned_inputs_give_a_worker_no_empty_batch() -> None:
    async def main() -> list[list]:
        service = _service(max_input_length=512, max_positions=512)
        workers = service.workers = _BusyWorker()  # type: ignore[assignment]
        await service.start(1.0)
        request = asyncio.ensure_future(
            service._infer(_encoded(3), protocol.OutputKind.POOLED))
        await asyncio.sleep(0)
        request.cancel()  # (its entries' futures with it)
        await asyncio.sleep(0)
        workers.free = True
        service._dispatch()
        await service.stop()
        return workers.batches

    assert asyncio.run(main()) == []


def test_start_starts_the_tokenizers_and_stop_ends_the_scheduler_and_closes_them() -> None:
    async def main() -> tuple[bool, bool, bool]:
        service = _service(max_input_length=512, max_positions=512)
        service.workers = _OneWorker(in_flight=0)  # type: ignore[assignment]
        tokenizers = service.tokenizers = _ClosedTokenizers()  # type: ignore[assignment]
        await service.start(1.0)
        started = tokenizers.started
        await service.stop()
        await asyncio.sleep(0)
        assert service._scheduler is not None
        return started, service._scheduler.cancelled(), tokenizers.closed

    assert asyncio.run(main()) == (True, True, True)


def test_a_failed_input_abandons_its_siblings() -> None:
    """All-or-nothing: the request fails, and its other inputs are dropped unseen. (Each
    input's entry carries the model's position offset.)"""

    async def main() -> tuple[str, list[bool]]:
        service = _service(max_input_length=512, max_positions=512)
        workers = service.workers = _OneWorker(in_flight=0)  # type: ignore[assignment]
        service.position_offset = 2  # (RoBERTa's padding_idx + 1)
        await service.start(1.0)
        request = asyncio.ensure_future(
            service._infer(_encoded(3, 4), protocol.OutputKind.POOLED))
        await asyncio.sleep(0)
        [batch] = workers.batches
        assert [(e.position_offset, e.output) for e in batch] == [
            (2, protocol.OutputKind.POOLED)] * 2
        batch[0].future.set_exception(backend("boom"))
        try:
            await request
            message = "answered"
        except EmbedServeError as exc:
            message = exc.message
        await service.stop()
        return message, [entry.future.cancelled() for entry in batch]

    assert asyncio.run(main()) == ("boom", [False, True])
