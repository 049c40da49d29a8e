"""The token-budget queue: budget, request limit, no starvation, exactly-once, abandonment."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.queue import LOOKAHEAD, Entry, TokenBudgetQueue, batch_cost, request_ids
from shared.protocol import CostModel, OutputKind

COST_MODELS = [CostModel.PACKED, CostModel.PADDED]


@contextmanager
def event_loop() -> Iterator[asyncio.AbstractEventLoop]:
    # Entries only need futures to exist; the loop never runs.
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


def make_entry(loop: asyncio.AbstractEventLoop, request_id: int | str, length: int,
               output: OutputKind = OutputKind.POOLED) -> Entry:
    return Entry(
        # Most tests label entries with integers, to sort them by; the server's are x-request-ids.
        request_id=request_id,  # type: ignore[arg-type]
        input_ids=np.zeros(length, dtype=np.int32),
        token_type_ids=np.zeros(length, dtype=np.int32),
        position_offset=0,
        output=output,
        future=loop.create_future(),
    )


def abandon(entry: Entry, how: int) -> None:
    # A client that went away cancels; a sibling input's failure sets an exception or result.
    if how == 0:
        entry.future.cancel()
    elif how == 1:
        entry.future.set_exception(RuntimeError("sibling failed"))
    else:
        entry.future.set_result(None)


def filled_queue(loop: asyncio.AbstractEventLoop, scenario: dict
                 ) -> tuple[TokenBudgetQueue, list[Entry]]:
    queue = TokenBudgetQueue(
        scenario["max_tokens"], scenario["max_requests"], scenario["cost_model"])
    entries = [make_entry(loop, i, n) for i, n in enumerate(scenario["lengths"])]
    for entry in entries:
        queue.put(entry)
    return queue, entries


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    max_tokens = draw(st.integers(1, 64))
    return {
        "cost_model": draw(st.sampled_from(COST_MODELS)),
        "max_tokens": max_tokens,
        "max_requests": draw(st.one_of(st.none(), st.integers(1, 8))),
        "lengths": draw(st.lists(st.integers(1, max_tokens), max_size=40)),
        # (entry index, take round, how): abandon that entry just before that take.
        "abandons": draw(st.lists(
            st.tuples(st.integers(0, 39), st.integers(0, 40), st.integers(0, 2)), max_size=15)),
    }


def check_batch(batch: list[Entry], queue: TokenBudgetQueue) -> None:
    assert batch_cost([e.length for e in batch], queue.cost_model) <= queue.max_batch_tokens
    if queue.max_batch_requests is not None:
        assert len(batch) <= queue.max_batch_requests
    assert not any(e.abandoned for e in batch)


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_draining_answers_every_live_entry_exactly_once(scenario: dict) -> None:
    with event_loop() as loop:
        queue, entries = filled_queue(loop, scenario)
        plan: dict[int, list[tuple[int, int]]] = {}
        for index, when, how in scenario["abandons"]:
            if index < len(entries):
                plan.setdefault(when, []).append((index, how))

        returned: list[Entry] = []
        rounds = 0
        while len(queue):
            for index, how in plan.get(rounds, []):
                # Only entries still waiting: one already taken is the worker pool's business.
                if entries[index] not in returned and not entries[index].future.done():
                    abandon(entries[index], how)
            waiting = [e for e in entries if e not in returned and not e.abandoned]
            batch = queue.take()
            check_batch(batch, queue)
            if waiting:
                # No starvation: the oldest live entry always rides in the next batch.
                assert batch and batch[0] is waiting[0]
            else:
                assert batch == []
            returned.extend(batch)
            rounds += 1
            assert rounds <= len(entries) + 1, "queue does not drain"

        assert len({id(e) for e in returned}) == len(returned), "an entry was returned twice"
        assert {id(e) for e in returned} == {id(e) for e in entries if not e.abandoned}
        assert queue.take() == []


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_a_batch_leaves_out_only_what_would_not_fit(scenario: dict) -> None:
    with event_loop() as loop:
        queue, entries = filled_queue(loop, scenario)
        for index, _, how in scenario["abandons"]:
            if index < len(entries) and not entries[index].future.done():
                abandon(entries[index], how)
        batch = queue.take()
        check_batch(batch, queue)
        chosen = {id(e) for e in batch}
        # Order is kept: the batch lists entries oldest first.
        assert [e.request_id for e in batch] == sorted(e.request_id for e in batch)
        full = queue.max_batch_requests is not None and len(batch) >= queue.max_batch_requests
        for entry in entries:
            if id(entry) in chosen or entry.abandoned or full:
                continue
            lengths = [e.length for e in batch] + [entry.length]
            assert batch_cost(lengths, queue.cost_model) > queue.max_batch_tokens, (
                f"entry {entry.request_id} would have fit")
        # What was not taken and is still live stays queued, in order.
        left = [e for e in entries if id(e) not in chosen and not e.abandoned]
        assert len(queue) == len(left)


@pytest.mark.parametrize(
    ("lengths", "cost_model", "max_requests", "expected"),
    [
        # Packed: 6 + 5 > 10 is skipped; 3 and then 1 fill the budget exactly.
        ([6, 5, 3, 1], CostModel.PACKED, None, [0, 2, 3]),
        # Padded: 6 -> 6*2 = 12 > 10 for any second entry of length <= 6, so the oldest rides
        # alone.
        ([6, 5, 3, 1], CostModel.PADDED, None, [0]),
        # Padded: 3,3,3 = 9; 1 makes 3*4 = 12.
        ([3, 3, 3, 1], CostModel.PADDED, None, [0, 1, 2]),
        ([1, 1, 1, 1], CostModel.PACKED, 2, [0, 1]),
    ],
)
def test_first_batch_examples(
    lengths: list[int], cost_model: CostModel, max_requests: int | None, expected: list[int]
) -> None:
    with event_loop() as loop:
        queue = TokenBudgetQueue(10, max_requests, cost_model)
        for i, n in enumerate(lengths):
            queue.put(make_entry(loop, i, n))
        got = [e.request_id for e in queue.take()]
        assert got == expected


def test_batch_cost() -> None:
    assert batch_cost([], CostModel.PACKED) == 0
    assert batch_cost([], CostModel.PADDED) == 0
    assert batch_cost([3, 5, 2], CostModel.PACKED) == 10
    assert batch_cost([3, 5, 2], CostModel.PADDED) == 15


@pytest.mark.parametrize("cost_model", COST_MODELS)
def test_put_refuses_an_entry_over_the_budget(cost_model: CostModel) -> None:
    with event_loop() as loop:
        queue = TokenBudgetQueue(8, None, cost_model)
        queue.put(make_entry(loop, 0, 8))
        with pytest.raises(AssertionError, match="max_batch_tokens"):
            queue.put(make_entry(loop, 1, 9))
        assert len(queue) == 1


def test_abandoned_head_is_dropped_and_empty_batch_returned() -> None:
    with event_loop() as loop:
        queue = TokenBudgetQueue(100, None, CostModel.PACKED)
        entries = [make_entry(loop, i, 4) for i in range(3)]
        for entry in entries:
            queue.put(entry)
            entry.future.cancel()
        assert queue.take() == []
        assert len(queue) == 0


@pytest.mark.parametrize("cost_model", COST_MODELS)
def test_long_queue_beyond_lookahead_drains_in_order(cost_model: CostModel) -> None:
    with event_loop() as loop:
        queue = TokenBudgetQueue(4, None, cost_model)
        count = 3 * LOOKAHEAD
        # Mostly full-budget entries with short ones scattered behind them.
        lengths = [1 if i % 7 == 0 else 4 for i in range(count)]
        for i, n in enumerate(lengths):
            queue.put(make_entry(loop, i, n))
        seen: list[int] = []
        while len(queue):
            batch = queue.take()
            assert batch, "a live queue produced an empty batch"
            assert batch_cost([e.length for e in batch], cost_model) <= 4
            seen.extend(e.request_id for e in batch)
        assert sorted(seen) == list(range(count))


@settings(max_examples=200, deadline=None)
@given(kinds=st.lists(st.sampled_from(list(OutputKind)), min_size=1, max_size=30))
def test_a_batch_has_one_output_kind_and_the_oldest_goes_first(kinds):
    loop = asyncio.new_event_loop()
    try:
        queue = TokenBudgetQueue(64, None, CostModel.PACKED)
        entries = [make_entry(loop, i, 2, kind) for i, kind in enumerate(kinds)]
        for entry in entries:
            queue.put(entry)
        answered = []
        while len(queue):
            batch = queue.take()
            assert batch[0] is min((e for e in entries if e not in answered),
                                   key=lambda e: e.request_id)
            assert len({e.output for e in batch}) == 1
            answered.extend(batch)
        assert sorted(e.request_id for e in answered) == list(range(len(kinds)))
    finally:
        loop.close()


def test_a_run_of_abandoned_entries_at_the_head_does_not_pick_the_batch_kind() -> None:
    """The batch's output kind is the oldest *live* entry's: two abandoned POOLED entries
    ahead of a live SPARSE one must not leave the SPARSE one out of an empty batch."""
    with event_loop() as loop:
        queue = TokenBudgetQueue(100, None, CostModel.PACKED)
        dead = [make_entry(loop, i, 4) for i in range(2)]
        live = make_entry(loop, 2, 4, OutputKind.SPARSE)
        for entry in [*dead, live]:
            queue.put(entry)
        for entry in dead:
            entry.future.cancel()
        assert queue.take() == [live]


def test_clear_hands_back_only_live_entries() -> None:
    """clear() feeds entries to set_exception when no worker is up: a cancelled future among
    them would raise InvalidStateError there, so abandoned ones are dropped silently."""
    with event_loop() as loop:
        queue = TokenBudgetQueue(100, None, CostModel.PACKED)
        entries = [make_entry(loop, i, 4) for i in range(3)]
        for entry in entries:
            queue.put(entry)
        entries[1].future.cancel()
        assert queue.clear() == [entries[0], entries[2]]
        assert len(queue) == 0


def test_request_ids_names_each_request_once_in_order() -> None:
    loop = asyncio.new_event_loop()
    try:
        entries = [make_entry(loop, i, 1) for i in ("b", "a", "b", "", "c", "a")]
        assert request_ids(entries) == ["b", "a", "c"]
        assert request_ids([make_entry(loop, "", 1)]) == []
    finally:
        loop.close()
