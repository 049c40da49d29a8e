"""What the inference service hands back: each input's row, the request's timings (the
response headers), and the post-processing of pooled vectors (normalizing, SPARSE rows written
out dense)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Timings:
    """What the response headers report (TEI: per-input means for batches, sums of counts)."""

    characters: int
    tokens: int
    tokenization_ms: float
    queue_ms: float
    inference_ms: float
    # perf_counter() once admitted (after any wait for permits): where TEI's gRPC total_time
    # starts, so a stream message's wait for other clients' permits is not in it.
    admitted_at: float


@dataclass(frozen=True)
class Outcome:
    """One result per input, in input order, and the request's timings."""

    rows: list[Any]
    timings: Timings

    def matrix(self) -> np.ndarray:
        """The rows (POOLED or LOGITS) as one 2-D array. A single row, one query's answer,
        becomes a read-only view instead of np.stack's copy (~15 us with cold caches)."""
        return self.rows[0][np.newaxis] if len(self.rows) == 1 else np.stack(self.rows)


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray  # float32 (n, dim)
    timings: Timings


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """L2-normalize each float32 row as sentence-transformers' Normalize (torch's
    F.normalize) does: x / max(||x||, 1e-12), in float32; a zero row stays zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.float32(1e-12))


def densify(rows: list[tuple[np.ndarray, np.ndarray]], width: int) -> np.ndarray:
    """SPARSE rows, (indices, values) each, as one float32 (n, width) matrix."""
    dense = np.zeros((len(rows), width), dtype=np.float32)
    for out, (indices, values) in zip(dense, rows, strict=True):
        out[indices] = values
    return dense
