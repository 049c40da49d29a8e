"""CUDA graphs for small batches: the latency path.

A one-query forward on a GPU is dominated by kernel launches (about 4.5 ms eager against 0.73 ms
replayed for a bge-base-sized model in float16 on one H100). A graph replays a fixed sequence of
kernels on fixed buffers, so every captured graph is one *bucket*: a number of tokens and a
number of sequences. A batch that fits a bucket is padded up to it with filler sequences, copied
into the bucket's static inputs, replayed, and its first n pooled rows are the answer. Larger
batches run eagerly, where launches are a small part of the time.

Padding keeps every filler sequence at least one token long, so no pooling or attention kernel
ever sees an empty sequence, and packed (varlen) attention keeps the fillers out of the real
sequences: the answer for a real sequence does not depend on the bucket it was replayed in (the
CPU tests check that with the eager stand-in below, since graphs themselves need CUDA).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from backend_worker.staging import StagingBuffer
from shared.protocol import BatchArrays

log = logging.getLogger(__name__)

# Buckets: (tokens, sequences). Short queries arrive one to a few dozen at a time; 512 tokens
# covers a batch of 63 eight-token queries. A bucket always keeps room for one filler sequence
# (see Bucket.fits), so the smallest sequence count is 2 and counts stay below the tokens.
GRAPH_TOKENS: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
GRAPH_SEQUENCES: tuple[int, ...] = (2, 8, 32, 64)


@dataclass(frozen=True, order=True)
class Bucket:
    tokens: int
    sequences: int

    def fits(self, tokens: int, sequences: int) -> bool:
        # Each unused sequence slot becomes a filler sequence of >= 1 token, and there must be
        # at least one (it takes the spare tokens).
        return sequences < self.sequences and tokens + (self.sequences - sequences) <= self.tokens


def graph_buckets(
    max_tokens: int, tokens: Sequence[int] = GRAPH_TOKENS,
    sequences: Sequence[int] = GRAPH_SEQUENCES,
) -> list[Bucket]:
    """The buckets worth capturing under a token budget, cheapest first."""
    return sorted(
        Bucket(t, s) for t in tokens if t <= max_tokens for s in sequences if s < t
    )


def choose_bucket(buckets: Sequence[Bucket], tokens: int, sequences: int) -> Bucket | None:
    """The cheapest bucket (fewest tokens, then fewest sequences) the batch fits, if any."""
    for bucket in buckets:  # sorted cheapest first
        if bucket.fits(tokens, sequences):
            return bucket
    return None


def pad_to_bucket(arrays: BatchArrays, bucket: Bucket) -> BatchArrays:
    """`arrays` followed by filler sequences up to exactly bucket.tokens / bucket.sequences.

    The first filler takes every spare token but one per remaining filler; fillers are token 0
    at position 0 (valid in every vocabulary and position table, however long the filler: packed
    attention keeps them out of the real sequences, so their content does not matter).
    """
    n = arrays.cu_seqlens.shape[0] - 1
    total = int(arrays.cu_seqlens[-1])
    if not bucket.fits(total, n):
        raise ValueError(f"{total} tokens in {n} sequences do not fit {bucket}")
    fillers = bucket.sequences - n
    lengths = [bucket.tokens - total - (fillers - 1)] + [1] * (fillers - 1)
    extra = sum(lengths)
    cu = np.empty(bucket.sequences + 1, dtype=np.int32)
    cu[: n + 1] = arrays.cu_seqlens
    cu[n + 1 :] = total + np.cumsum(lengths, dtype=np.int64)
    zeros = np.zeros(extra, dtype=np.int32)
    return BatchArrays(
        input_ids=np.concatenate([arrays.input_ids, zeros]),
        position_ids=np.concatenate([arrays.position_ids, zeros]),
        token_type_ids=np.concatenate([arrays.token_type_ids, zeros]),
        cu_seqlens=cu,
    )


class Replay(Protocol):
    """A captured computation: `replay()` reruns it on the same buffers."""

    def replay(self) -> None: ...


# Capture `run` (which reads the static inputs and writes its result into the returned tensor)
# and give back something to replay plus that output tensor.
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Replay, torch.Tensor]]


class _Eager:
    """Replay by calling again: the CPU stand-in for a CUDA graph (tests, and any device
    without graphs), with exactly the static-buffer discipline a graph imposes."""

    def __init__(self, run: Callable[[], torch.Tensor], out: torch.Tensor) -> None:
        self.run, self.out = run, out

    def replay(self) -> None:
        self.out.copy_(self.run())


def eager_capture(run: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
    out = run().clone()
    return _Eager(run, out), out


def cuda_capture(pool: Any = None) -> Capture:
    """Capture with torch.cuda.CUDAGraph, all graphs sharing one memory pool (they never run at
    the same time, so their intermediates can share memory)."""
    shared_pool = pool if pool is not None else torch.cuda.graph_pool_handle()

    def capture(run: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
        # Warm up on a side stream first, as torch requires (lazy inits, autotuning).
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=shared_pool):
            out = run()
        return graph, out

    return capture


@dataclass
class _Captured:
    replay: Replay
    out: torch.Tensor
    # The bucket's static inputs: ids, positions, token types and cu_seqlens back to back.
    inputs: StagingBuffer


# (input_ids, position_ids, token_type_ids, cu_seqlens) int64 device tensors and the bucket's
# max sequence length -> float32 [sequences, dim] (pooled vectors or logits).
PooledForward = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor
]


class GraphedPooling:
    """Per-sequence rows of small batches (pooled embeddings, or a classifier's logits)
    through captured graphs, one per bucket."""

    def __init__(
        self, forward: PooledForward, buckets: Sequence[Bucket], device: torch.device,
        capture: Capture = eager_capture,
    ) -> None:
        self.buckets = sorted(buckets)
        self.device = device
        self._graphs: dict[Bucket, _Captured] = {}
        # Largest first: later (smaller) captures reuse the pool the largest one sized.
        for bucket in reversed(self.buckets):
            inputs = StagingBuffer(3 * bucket.tokens + bucket.sequences + 1, device)
            ids, positions, types, cu = inputs.write(*pad_to_bucket(_empty_batch(), bucket))

            def run(ids=ids, positions=positions, types=types, cu=cu,
                    max_len=bucket.tokens) -> torch.Tensor:
                return forward(ids, positions, types, cu, max_len)

            replay, out = capture(run)
            self._graphs[bucket] = _Captured(replay, out, inputs)
        log.info("captured %d graphs: %s", len(self._graphs),
                 ", ".join(f"{b.tokens}x{b.sequences}" for b in self.buckets))

    def bucket_for(self, arrays: BatchArrays) -> Bucket | None:
        return choose_bucket(self.buckets, int(arrays.cu_seqlens[-1]),
                             arrays.cu_seqlens.shape[0] - 1)

    def __call__(self, arrays: BatchArrays, bucket: Bucket) -> torch.Tensor:
        """[n, dim] for a batch that fits `bucket` (a view of the static output: copy it or
        move it to the host before the next call)."""
        captured = self._graphs[bucket]
        # A padded batch has the bucket's lengths: it lands where the graph reads.
        captured.inputs.write(*pad_to_bucket(arrays, bucket))
        captured.replay.replay()
        return captured.out[: arrays.cu_seqlens.shape[0] - 1]


def _empty_batch() -> BatchArrays:
    none = np.empty(0, dtype=np.int32)
    return BatchArrays(none, none, none, np.zeros(1, dtype=np.int32))

