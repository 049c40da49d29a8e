"""The typed wire protocol between the router and the backend workers.

A worker starts with its `WorkerConfig`, JSON on its command line; everything after goes over
its ZeroMQ socket.

A message is one msgpack header frame (a tagged msgspec Struct, so its kind is explicit) followed
by raw buffer frames: numpy arrays sent without copying and read back with `np.frombuffer`. There
is no pickle anywhere on this path.

  router -> worker:  Batch  + [input_ids, position_ids, token_type_ids, cu_seqlens]  (int32)
  worker -> router:  Ready  (once, after the model is loaded and warmed up)
                     Result + [float32 (rows, dim)]: pooled vectors, logits, or every
                              token's hidden state (ALL_TOKENS); a SPARSE Result carries
                              [offsets (n+1), indices, values] instead
                     Failed (the batch could not be computed; the worker lives on)
                     Heartbeat (idle, about once a second)
                     Fatal  (the worker cannot start; it exits right after)
"""

from __future__ import annotations

import enum
import itertools
from typing import NamedTuple

import msgspec
import numpy as np


class WorkerConfig(msgspec.Struct, frozen=True):
    """What a backend worker process needs, handed to it as JSON on its command line."""

    worker_id: str
    endpoint: str
    model_dir: str
    pooling: str | None
    dense_path: str | None
    device: str
    dtype: str | None
    max_batch_tokens: int
    parent_pid: int
    json_output: bool
    threads: int | None = None  # torch intra-op threads; None: torch's default
    cuda_graphs: bool = True


class OutputKind(enum.IntEnum):
    """What an entry of a batch asks the worker for."""

    POOLED = 0  # one vector per entry (pooling, Dense)
    ALL_TOKENS = 1  # the last hidden state of every token
    SPARSE = 2  # non-zero entries only: SPLADE's MLM head, a CSR head, BGE-M3's lexical weights
    LOGITS = 3  # a classification head's scores


class CostModel(enum.Enum):
    """How the worker pays for a batch, which is how the router must budget it."""

    PACKED = "packed"  # sum of lengths: no padding anywhere
    PADDED = "padded"  # max_len * n: attention runs on a padded rectangle


class _Message(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class Ready(_Message, tag="ready"):
    worker_id: str
    pid: int
    device: str
    dtype: str
    hidden_size: int
    embedding_dim: int
    vocab_size: int
    max_positions: int
    cost_model: CostModel
    outputs: list[OutputKind]
    # How long one full batch (--max-batch-tokens) took at warm-up: the router's yardstick for
    # telling a slow batch from a hung worker.
    warmup_ms: float


class Batch(_Message, tag="batch"):
    batch_id: int
    # The x-request-ids of its entries' requests, each once: the worker's log names them when
    # the batch fails, so that the clients' failed requests can be found there.
    request_ids: list[str]
    outputs: list[OutputKind]
    max_len: int
    # Per entry, the leading tokens (a prompt) its pooling leaves out; empty: none anywhere.
    pool_from: list[int] = []


class Result(_Message, tag="result"):
    batch_id: int
    rows: int
    dim: int
    compute_ms: float


class Failed(_Message, tag="failed"):
    batch_id: int
    message: str


# An idle worker's Heartbeats come at least this far apart (it looks between its waits for a
# batch, so somewhat later): the router's shortest silence that can mean a hang is above it.
HEARTBEAT_S = 1.0


class Heartbeat(_Message, tag="heartbeat"):
    """Sent by an idle worker about once a second: silence means it is stuck or stopped."""


class Fatal(_Message, tag="fatal"):
    """The worker cannot serve at all (e.g. the model does not load); it exits after this."""

    worker_id: str
    message: str


Message = Ready | Batch | Result | Failed | Heartbeat | Fatal

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class BatchArrays(NamedTuple):
    """A packed batch: entry i owns tokens cu_seqlens[i]:cu_seqlens[i+1] of each flat array."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    token_type_ids: np.ndarray
    cu_seqlens: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.cu_seqlens)


def encode(message: Message, *arrays: np.ndarray) -> list[bytes | np.ndarray]:
    """Frames for `socket.send_multipart(frames, copy=False)`."""
    for array in arrays:
        if not array.flags.c_contiguous:
            raise ValueError("wire arrays must be C-contiguous")
    return [_encoder.encode(message), *arrays]


def decode(frames: list) -> tuple[Message, list[memoryview]]:
    """Split received frames (zmq Frames or bytes) into the header and raw buffers."""
    header = frames[0].buffer if hasattr(frames[0], "buffer") else frames[0]
    rest = [f.buffer if hasattr(f, "buffer") else memoryview(f) for f in frames[1:]]
    return _decoder.decode(header), rest


def batch_arrays(buffers: list[memoryview]) -> BatchArrays:
    if len(buffers) != 4:
        raise ValueError(f"a Batch carries 4 arrays, got {len(buffers)}")
    ids, pos, types, cu = (np.frombuffer(b, dtype=np.int32) for b in buffers)
    # (cu_seqlens from 0, never decreasing: otherwise the entries would silently skip or
    # reread tokens; empty, it has no last offset to read)
    if (not (ids.shape == pos.shape == types.shape) or cu.shape[0] == 0 or cu[0] != 0
            or cu[-1] != ids.shape[0] or (np.diff(cu) < 0).any()):
        raise ValueError("inconsistent Batch arrays")
    return BatchArrays(ids, pos, types, cu)


def result_array(message: Result, buffers: list[memoryview]) -> np.ndarray:
    if len(buffers) != 1:
        raise ValueError(f"a Result carries 1 array, got {len(buffers)}")
    if message.rows < 0 or message.dim < 0:  # reshape would read -1 as "whatever fits"
        raise ValueError(f"a Result of {message.rows} x {message.dim}")
    return np.frombuffer(buffers[0], dtype=np.float32).reshape(message.rows, message.dim)


def sparse_arrays(rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """Frames of a SPARSE Result: offsets (n+1), indices, values of every row's non-zeros."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(i) for i, _ in rows], out=offsets[1:])
    indices = np.concatenate([i for i, _ in rows]).astype(np.int32) if rows else offsets[:0]
    values = (np.concatenate([v for _, v in rows]).astype(np.float32) if rows
              else np.zeros(0, np.float32))
    return offsets, indices, values


def result_rows(
    message: Result, buffers: list[memoryview], output: OutputKind, lengths: list[int]
) -> list:
    """One result per entry of the batch, in order.

    POOLED / LOGITS: a float32 row each. ALL_TOKENS: a (length, dim) block each, the frame
    holding every token of the batch. SPARSE: (indices, values) each, from three frames.
    """
    if output is OutputKind.SPARSE:
        if len(buffers) != 3:
            raise ValueError(f"a sparse Result carries 3 arrays, got {len(buffers)}")
        offsets = np.frombuffer(buffers[0], dtype=np.int32)
        indices = np.frombuffer(buffers[1], dtype=np.int32)
        values = np.frombuffer(buffers[2], dtype=np.float32)
        # (rows < 0 first: -1 rows would pass the length check with no offsets to read)
        if (message.rows < 0 or offsets.shape[0] != message.rows + 1 or offsets[0] != 0
                or (np.diff(offsets) < 0).any()
                or not offsets[-1] == indices.shape[0] == values.shape[0]):
            raise ValueError("sparse Result offsets do not match its rows and entries")
        return [(indices[a:b], values[a:b]) for a, b in itertools.pairwise(offsets.tolist())]
    array = result_array(message, buffers)
    if output is OutputKind.ALL_TOKENS:
        if array.shape[0] != sum(lengths):
            raise ValueError(f"{array.shape[0]} token rows for {sum(lengths)} tokens")
        return np.split(array, np.cumsum(lengths)[:-1])
    return list(array)
