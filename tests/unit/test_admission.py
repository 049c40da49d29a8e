"""Admission: permits per pool, refused at once over HTTP, waited for within `patiently` (the
gRPC streams), and the drain."""

from __future__ import annotations

import asyncio

import pytest

from router.admission import SHUT_DOWN, Admission, patiently
from shared.errors import EmbedServeError, ErrorType


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


async def holding(admission: Admission, inputs: int, release: asyncio.Event,
                  pool: str = "inference") -> None:
    async with admission.admitted(inputs, pool):  # type: ignore[arg-type]
        await release.wait()


async def started(task: asyncio.Task) -> None:
    """Until `task` has run up to its first wait."""
    for _ in range(3):
        await asyncio.sleep(0)
    assert not task.done()


async def two_holding(admission: Admission, first_needs: int, second_needs: int
                      ) -> tuple[asyncio.Event, asyncio.Event, list[asyncio.Task]]:
    """Two requests holding permits until their events are set; the first one admitted."""
    first, second = asyncio.Event(), asyncio.Event()
    holders = [asyncio.ensure_future(holding(admission, first_needs, first)),
               asyncio.ensure_future(holding(admission, second_needs, second))]
    await started(holders[0])
    return first, second, holders


def test_past_the_permits_a_request_is_refused_at_once() -> None:
    async def main() -> None:
        admission, release = Admission(4), asyncio.Event()
        holder = asyncio.ensure_future(holding(admission, 3, release))
        await started(holder)
        assert admission.free() == 1
        with pytest.raises(EmbedServeError) as info:
            async with admission.admitted(2):
                pass
        assert info.value.error_type is ErrorType.OVERLOADED
        async with admission.admitted(1):  # what is left is handed out
            assert admission.free() == 0
        # The tokenizer's pool is its own: full while inference holds most of its permits.
        async with admission.admitted(4, "tokenizer"):
            pass
        with pytest.raises(EmbedServeError) as info:  # more than could ever fit: 422, not 429
            async with admission.admitted(5):
                pass
        assert info.value.error_type is ErrorType.VALIDATION
        release.set()
        await holder
        assert admission.free() == admission.free("tokenizer") == 4

    run(main())


def test_patiently_a_request_waits_for_the_permits_others_hold() -> None:
    order: list[str] = []

    async def main() -> None:
        admission, release = Admission(2), asyncio.Event()
        holders = [asyncio.ensure_future(holding(admission, 1, release)) for _ in range(2)]
        await started(holders[0])

        async def answer() -> str:
            async with admission.admitted(2):
                order.append("admitted")
                assert admission.free() == 0
            return "answered"

        waiter = asyncio.ensure_future(patiently(answer))
        await started(waiter)  # no permit free: waiting, not refused
        order.append("released")
        release.set()
        assert await waiter == "answered"
        # Outside `patiently` the same request is refused again.
        for task in holders:
            task.cancel()
        release.clear()
        holder = asyncio.ensure_future(holding(admission, 1, release))
        await started(holder)
        with pytest.raises(EmbedServeError, match="overloaded"):
            await answer()
        release.set()

    run(main())
    assert order == ["released", "admitted"]


def test_a_waiting_request_keeps_waiting_while_the_return_is_too_small() -> None:
    """A waiting request is handed its permits only once enough are back."""
    async def main() -> None:
        admission = Admission(3)
        first, second, holders = await two_holding(admission, 1, 2)

        async def answer() -> int:
            async with admission.admitted(3):
                return admission.free()

        waiter = asyncio.ensure_future(patiently(answer))
        await started(waiter)
        first.set()
        await holders[0]
        await started(waiter)  # 1 of 3 back: still waiting
        second.set()
        assert await waiter == 0

    run(main())


@pytest.mark.parametrize("pool", ["inference", "tokenizer"])
def test_a_drain_refuses_the_requests_waiting_for_permits(pool: str) -> None:
    async def main() -> None:
        admission, release = Admission(1), asyncio.Event()
        holder = asyncio.ensure_future(holding(admission, 1, release, pool))
        await started(holder)

        async def answer() -> None:
            async with admission.admitted(1, pool):  # type: ignore[arg-type]
                raise AssertionError("admitted during the drain")

        waiter = asyncio.ensure_future(patiently(answer))
        await started(waiter)
        drain = asyncio.ensure_future(admission.drain(60))
        await started(drain)
        assert waiter.done()  # refused at once, each pool's waiters alike
        release.set()
        await asyncio.wait_for(drain, 2)  # done as the last one ends, not after the grace
        with pytest.raises(EmbedServeError) as info:
            await waiter
        assert info.value.error_type is ErrorType.UNHEALTHY
        assert admission.free(pool) == 1  # (a refused waiter took no permit)

    run(main())


def test_a_waiter_handed_its_permits_as_the_drain_begins_is_refused() -> None:
    """Its permits were handed over, but the drain began before it ran: refused as the
    drain refuses every new request, its permits given back."""
    async def main() -> None:
        admission = Admission(1)

        async def answer() -> None:
            async with admission.admitted(1):
                raise AssertionError("admitted during the drain")

        async with admission.admitted(1):
            waiter = asyncio.ensure_future(patiently(answer))
            await started(waiter)
        admission.draining = True  # (as `drain` begins) before the waiter runs
        with pytest.raises(EmbedServeError) as info:
            await waiter
        assert info.value.error_type is ErrorType.UNHEALTHY
        await admission.drain(1)
        assert admission.free() == 1

    run(main())


def test_a_waiter_refused_by_the_drain_and_cancelled_gives_back_nothing() -> None:
    """Refused (its future False), then cancelled before it ran: it took no permit, so it
    returns none (the pool would then hand out more permits than it has)."""
    async def main() -> None:
        admission, release = Admission(1), asyncio.Event()
        holder = asyncio.ensure_future(holding(admission, 1, release))
        await started(holder)
        waiter = asyncio.ensure_future(patiently(lambda: holding(admission, 1, release)))
        await started(waiter)
        drain = asyncio.ensure_future(admission.drain(5))
        await asyncio.sleep(0)  # the drain refuses the waiter, which has not run since
        assert not waiter.done()
        waiter.cancel()
        release.set()
        await drain
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert admission.free() == 1

    run(main())


def test_no_permit_is_free_while_a_request_waits_for_more() -> None:
    """One permit is back but the waiting head needs two: it is the head's, not free."""
    async def main() -> None:
        admission = Admission(2)
        first, second, holders = await two_holding(admission, 1, 1)
        head = asyncio.ensure_future(patiently(lambda: holding(admission, 2, second)))
        await started(head)
        first.set()
        await holders[0]
        assert admission.free() == 0
        second.set()
        await asyncio.gather(head, holders[1])
        assert admission.free() == 2

    run(main())


def test_past_the_grace_the_admitted_are_answered_503() -> None:
    async def main() -> None:
        admission, never = Admission(2), asyncio.Event()
        holder = asyncio.ensure_future(holding(admission, 1, never))
        await started(holder)
        await admission.drain(0.05)
        with pytest.raises(EmbedServeError) as info:
            await holder
        assert info.value.error_type is ErrorType.UNHEALTHY
        assert info.value.message == SHUT_DOWN
        assert admission.free() == 2
        with pytest.raises(EmbedServeError, match="shutting down"):  # and no new ones
            async with admission.admitted(1):
                pass

    run(main())


def test_returned_permits_go_to_the_waiter_not_to_a_request_handled_first() -> None:
    """TEI's semaphore is FIFO: a returned permit is the first waiter's; a request that
    would not wait (HTTP, unary gRPC) cannot take it before the waiter runs, else steady
    unary load at capacity starves the streams."""
    async def main() -> None:
        admission = Admission(1)

        async def answer() -> str:
            async with admission.admitted(1):
                return "answered"

        async with admission.admitted(1):
            waiter = asyncio.ensure_future(patiently(answer))
            await started(waiter)
        # Returned, and the waiter has not run yet: the next request must not take it.
        with pytest.raises(EmbedServeError) as info:
            async with admission.admitted(1):
                pass
        assert info.value.error_type is ErrorType.OVERLOADED
        assert admission.free() == 0
        assert await waiter == "answered"
        assert admission.free() == 1

    run(main())


def test_waiting_messages_are_admitted_first_come_first_served() -> None:
    """A message that arrives while others wait queues behind them, even when the permits
    it alone needs are free (tokio's Semaphore is fair, acquire_many included)."""
    order: list[str] = []

    async def main() -> None:
        admission = Admission(2)
        first, second, holders = await two_holding(admission, 1, 1)

        def answer(name: str, inputs: int):
            async def admitted() -> None:
                async with admission.admitted(inputs):
                    order.append(name)
            return admitted

        head = asyncio.ensure_future(patiently(answer("head", 2)))
        await started(head)
        first.set()
        await holders[0]  # 1 back: the head's, which needs 2
        late = asyncio.ensure_future(patiently(answer("late", 1)))
        await started(late)  # queued behind the head, not admitted with the free permit
        assert order == []
        second.set()
        await asyncio.gather(head, late)
        assert admission.free() == 2

    run(main())
    assert order == ["head", "late"]


def test_a_cancelled_waiter_leaves_the_queue_and_its_permits() -> None:
    async def main() -> None:
        admission = Admission(2)
        first, second, holders = await two_holding(admission, 1, 1)
        admitted = asyncio.Event()

        async def answer(inputs: int) -> None:
            async with admission.admitted(inputs):
                admitted.set()
                await asyncio.sleep(3600)

        head = asyncio.ensure_future(patiently(lambda: answer(2)))
        await started(head)
        behind = asyncio.ensure_future(patiently(lambda: answer(1)))
        await started(behind)
        first.set()
        await holders[0]  # 1 back, kept for the head
        assert not admitted.is_set()
        head.cancel()  # the permit it was waiting for goes to the next waiter
        await asyncio.wait_for(admitted.wait(), 1)
        behind.cancel()
        second.set()
        await asyncio.wait([head, behind, holders[1]])
        assert admission.free() == 2

    run(main())


def test_a_waiter_cancelled_once_handed_its_permits_gives_them_back() -> None:
    async def main() -> None:
        admission = Admission(1)

        async def answer() -> str:
            async with admission.admitted(1):
                return "answered"

        async with admission.admitted(1):
            handed = asyncio.ensure_future(patiently(answer))
            await started(handed)
            behind = asyncio.ensure_future(patiently(answer))
            await started(behind)
        handed.cancel()  # the permit is its own now, and it has not run yet
        assert await behind == "answered"
        with pytest.raises(asyncio.CancelledError):
            await handed
        assert admission.free() == 1

    run(main())


def test_a_drain_with_nothing_in_flight_is_over_at_once_without_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    """--shutdown-grace 0 with no request in flight: nothing to answer 503, nothing to warn
    of (asyncio.wait_for with a timeout of 0 times out even on a set event)."""

    async def main() -> bool:
        admission = Admission(2)
        loop = asyncio.get_running_loop()
        started_at = loop.time()
        await admission.drain(0)
        return admission._expired or loop.time() - started_at > 0.5

    with caplog.at_level("WARNING", logger="router.admission"):
        assert run(main()) is False
    assert caplog.records == []
