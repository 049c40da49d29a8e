"""The token-budget queue: entries wait here until a worker slot frees up.

A batch is formed late (when a worker can take it) so that it collects as much work as the
budget allows. The oldest entry always goes into the next batch, so nothing starves; later
entries of the same output kind fill whatever budget remains, skipping the ones that would not
fit. The cost of a batch
is what the worker declared in READY: the sum of lengths when it packs, `max_len * n` when its
attention runs on a padded rectangle.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field

import numpy as np

from shared.protocol import CostModel, OutputKind

# How far past the oldest entry a batch looks for entries that still fit. Bounds the work of one
# `take` when the head of the queue is full of long entries.
LOOKAHEAD = 256


@dataclass(frozen=True, slots=True)
class Dispatch:
    """The batch an entry went into: what its trace's inference span reports."""

    worker: str
    batch_id: int
    size: int  # entries of the batch
    tokens: int  # tokens of the batch


@dataclass(eq=False, slots=True)
class Entry:
    """One input of one request, tokenized and waiting for its result."""

    request_id: str  # its request's (or gRPC call's) x-request-id ("" outside one)
    input_ids: np.ndarray  # int32, special tokens included
    token_type_ids: np.ndarray  # int32
    position_offset: int
    output: OutputKind
    future: asyncio.Future
    pool_from: int = 0  # leading tokens its pooling leaves out (an excluded prompt)
    enqueued_at: float = field(default_factory=time.perf_counter)
    dispatched_at: float = 0.0
    batch: Dispatch | None = None  # set with dispatched_at

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def abandoned(self) -> bool:
        # The request gave up (client went away, or a sibling input failed the request).
        return self.future.done()


def request_ids(entries: list[Entry]) -> list[str]:
    """The requests a batch holds, each once, in order (entries without one left out)."""
    return [i for i in dict.fromkeys(e.request_id for e in entries) if i]


def batch_cost(lengths: list[int], cost_model: CostModel) -> int:
    if not lengths:
        return 0
    if cost_model is CostModel.PACKED:
        return sum(lengths)
    return max(lengths) * len(lengths)


class TokenBudgetQueue:
    def __init__(
        self, max_batch_tokens: int, max_batch_requests: int | None, cost_model: CostModel
    ) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests
        self.cost_model = cost_model
        self._entries: collections.deque[Entry] = collections.deque()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, entry: Entry) -> None:
        if entry.length > self.max_batch_tokens:
            # The router refuses such inputs at validation; reaching here is a bug, not a 4xx.
            raise AssertionError(
                f"entry of {entry.length} tokens exceeds max_batch_tokens={self.max_batch_tokens}"
            )
        self._entries.append(entry)

    def clear(self) -> list[Entry]:
        """Remove and return every waiting entry (to fail them when no worker can serve)."""
        entries = [e for e in self._entries if not e.abandoned]
        self._entries.clear()
        return entries

    def take(self) -> list[Entry]:
        """Form the next batch (possibly empty when every waiting entry was abandoned)."""
        entries = self._entries
        while entries and entries[0].abandoned:
            entries.popleft()
        if not entries:
            return []
        limit = self.max_batch_requests or len(entries)
        # One output kind per batch (pooled, per-token, sparse, logits): the worker computes
        # one head for the whole batch; other kinds wait for a batch of their own.
        output = entries[0].output
        chosen: list[int] = []
        total = 0
        longest = 0
        for index, entry in enumerate(entries):
            if index > LOOKAHEAD or len(chosen) >= limit:
                break
            if entry.abandoned or entry.output is not output:
                continue
            if self.cost_model is CostModel.PACKED:
                cost = total + entry.length
            else:
                cost = max(longest, entry.length) * (len(chosen) + 1)
            if cost > self.max_batch_tokens:
                continue  # a shorter entry further on may still fit
            chosen.append(index)
            total += entry.length
            longest = max(longest, entry.length)
        picked = set(chosen)
        batch = [entries[i] for i in chosen]
        self._entries = collections.deque(
            e for i, e in enumerate(entries) if i not in picked and not e.abandoned
        )
        return batch
