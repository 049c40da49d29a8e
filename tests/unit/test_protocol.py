"""The wire protocol: every message kind round-trips, arrays arrive intact over real zmq."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from shared import protocol
from shared.protocol import (
    Batch,
    BatchArrays,
    CostModel,
    Failed,
    Fatal,
    Heartbeat,
    OutputKind,
    Ready,
    Result,
    batch_arrays,
    decode,
    encode,
    result_array,
)

READY = Ready(worker_id="w0", pid=1234, device="cuda:0", dtype="float16", hidden_size=384,
              embedding_dim=384, vocab_size=30522, max_positions=512,
              cost_model=CostModel.PADDED, outputs=[OutputKind.POOLED], warmup_ms=812.5)
BATCH = Batch(batch_id=7, request_ids=["r3", "r4"], outputs=[OutputKind.POOLED] * 3, max_len=4)
RESULT = Result(batch_id=7, rows=3, dim=2, compute_ms=1.25)
FAILED = Failed(batch_id=7, message="CUDA out of memory")
FATAL = Fatal(worker_id="w1", message="no such architecture")
HEARTBEAT = Heartbeat()

MESSAGES = [READY, BATCH, RESULT, FAILED, FATAL, HEARTBEAT]


def batch_payload() -> BatchArrays:
    return BatchArrays(
        input_ids=np.array([101, 7, 102, 101, 102, 101, 9, 9, 102], dtype=np.int32),
        position_ids=np.array([0, 1, 2, 0, 1, 0, 1, 2, 3], dtype=np.int32),
        token_type_ids=np.zeros(9, dtype=np.int32),
        cu_seqlens=np.array([0, 3, 5, 9], dtype=np.int32),
    )


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: protocol.Message) -> None:
    frames = encode(message)
    assert len(frames) == 1
    decoded, buffers = decode(frames)
    assert type(decoded) is type(message)
    assert decoded == message
    assert buffers == []


def test_kind_is_explicit_not_guessed() -> None:
    # Failed and Result share a leading batch_id; the tag alone must tell them apart.
    assert type(decode(encode(Failed(batch_id=1, message="x")))[0]) is Failed
    assert type(decode(encode(Result(batch_id=1, rows=0, dim=0, compute_ms=0.0)))[0]) is Result


def test_decode_rejects_garbage() -> None:
    import msgspec

    with pytest.raises(msgspec.DecodeError):
        decode([b"\x93\xa7unknown\x01\x02"])


def test_ready_enums_survive() -> None:
    decoded, _ = decode(encode(READY))
    assert isinstance(decoded, Ready)
    assert decoded.cost_model is CostModel.PADDED
    assert decoded.outputs == [OutputKind.POOLED]


def test_batch_arrays_from_bytes_frames() -> None:
    arrays = batch_payload()
    frames = [f if isinstance(f, bytes) else f.tobytes() for f in encode(BATCH, *arrays)]
    message, buffers = decode(frames)
    assert message == BATCH
    got = batch_arrays(buffers)
    for name, want in zip(BatchArrays._fields, arrays, strict=True):
        np.testing.assert_array_equal(getattr(got, name), want)
        assert getattr(got, name).dtype == np.int32
    np.testing.assert_array_equal(got.lengths, [3, 2, 4])


def test_encode_refuses_non_contiguous_arrays() -> None:
    strided = np.arange(10, dtype=np.int32)[::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        encode(BATCH, strided)
    with pytest.raises(ValueError, match="C-contiguous"):
        encode(RESULT, np.zeros((2, 3), dtype=np.float32).T)


def _as_buffers(*arrays: np.ndarray) -> list[memoryview]:
    return [memoryview(a.tobytes()) for a in arrays]


def test_batch_arrays_wants_four_arrays() -> None:
    ids, pos, types, _ = batch_payload()
    with pytest.raises(ValueError, match="4 arrays"):
        batch_arrays(_as_buffers(ids, pos, types))


def test_batch_arrays_rejects_mismatched_lengths() -> None:
    ids, pos, types, cu = batch_payload()
    with pytest.raises(ValueError, match="inconsistent"):
        batch_arrays(_as_buffers(ids, pos[:-1], types, cu))
    with pytest.raises(ValueError, match="inconsistent"):
        batch_arrays(_as_buffers(ids, pos, types[1:], cu))


def test_batch_arrays_rejects_cu_seqlens_not_covering_the_tokens() -> None:
    ids, pos, types, cu = batch_payload()
    bad_cu = cu.copy()
    bad_cu[-1] = 8
    with pytest.raises(ValueError, match="inconsistent"):
        batch_arrays(_as_buffers(ids, pos, types, bad_cu))


@pytest.mark.parametrize("cu", [[1, 3, 5, 9], [0, 5, 3, 9], []],
                         ids=["not-from-zero", "decreasing", "empty"])
def test_batch_arrays_rejects_cu_seqlens_that_skip_or_reread_tokens(cu: list[int]) -> None:
    """Offsets that end at the token count but start past 0 (the first tokens of no entry) or
    go back (an entry of negative length, the next rereading tokens) are malformed, as a
    sparse Result's offsets are; an empty one was an IndexError."""
    ids, pos, types, _ = batch_payload()
    with pytest.raises(ValueError, match=r"^inconsistent Batch arrays$"):
        batch_arrays(_as_buffers(ids, pos, types, np.array(cu, dtype=np.int32)))


@pytest.mark.parametrize(("rows", "dim"), [(-1, 2), (3, -1)])
def test_result_array_refuses_a_negative_shape(rows: int, dim: int) -> None:
    """numpy reads -1 in a shape as "whatever fits": a Result declaring -1 rows (or columns)
    was read as the buffer's 3 x 2 instead of refused as malformed."""
    message = Result(batch_id=7, rows=rows, dim=dim, compute_ms=1.25)
    buffers = _as_buffers(np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(ValueError, match=rf"^a Result of {rows} x {dim}$"):
        result_array(message, buffers)
    with pytest.raises(ValueError, match=rf"^a Result of {rows} x {dim}$"):
        protocol.result_rows(message, buffers, OutputKind.POOLED, [1, 1, 1])


def test_result_array_reshapes() -> None:
    rows = np.arange(6, dtype=np.float32).reshape(3, 2)
    message, buffers = decode(encode(RESULT, rows))
    assert isinstance(message, Result)
    got = result_array(message, buffers)
    assert got.shape == (3, 2)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, rows)


def test_result_array_wants_one_array_of_the_declared_shape() -> None:
    rows = np.zeros((3, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="1 array"):
        result_array(RESULT, _as_buffers(rows, rows))
    with pytest.raises(ValueError):
        result_array(RESULT, _as_buffers(np.zeros((3, 3), dtype=np.float32)))


def test_result_rows_match_the_batch_or_refuse() -> None:
    """A worker's Result that does not fit its batch is a ValueError (its own batch's loss,
    router/workers.py), never rows sliced wrong."""
    all_tokens = Result(batch_id=1, rows=5, dim=2, compute_ms=1.0)
    block = np.zeros((5, 2), dtype=np.float32)
    pieces = protocol.result_rows(all_tokens, _as_buffers(block), OutputKind.ALL_TOKENS, [2, 3])
    assert [p.shape[0] for p in pieces] == [2, 3]
    with pytest.raises(ValueError, match="token rows"):
        protocol.result_rows(all_tokens, _as_buffers(block), OutputKind.ALL_TOKENS, [2, 2])
    sparse = Result(batch_id=1, rows=2, dim=10, compute_ms=1.0)
    good = protocol.sparse_arrays([(np.array([1]), np.array([0.5])), (np.array([2, 3]),
                                                                       np.array([1.0, 2.0]))])
    assert len(protocol.result_rows(sparse, _as_buffers(*good), OutputKind.SPARSE, [1, 1])) == 2
    offsets, indices, values = good
    for bad in ([offsets[:-1], indices, values],                    # a row short of its rows
                [offsets, indices[:-1], values[:-1]],              # fewer entries than said
                [np.array([0, 2, 1], np.int32), indices, values]):  # not ascending
        with pytest.raises(ValueError, match="offsets"):
            protocol.result_rows(sparse, _as_buffers(*bad), OutputKind.SPARSE, [1, 1])


@pytest.mark.parametrize("frames", [
    [[1, 2, 3], [4, 5, 6], [0.5, 1.0, 1.5]],
    [[0, 4, 3], [4, 5, 6], [0.5, 1.0, 1.5]],
    [[0, 1, 3], [4, 5, 6], [0.5, 1.0]],
    [[0, 1, 3], [4, 5, 6], [0.5, 1.0, 1.5], [7]],
], ids=["offsets-not-from-0", "a-row-of-negative-length", "a-value-short", "a-fourth-frame"])
def test_a_sparse_result_that_does_not_add_up_is_refused(frames: list) -> None:
    """Each malformation alone (the rest consistent: 2 rows, 3 entries) is a ValueError, never
    rows read from the wrong entries."""
    sparse = Result(batch_id=1, rows=2, dim=10, compute_ms=1.0)
    arrays = [np.array(f, np.float32 if i == 2 else np.int32) for i, f in enumerate(frames)]
    with pytest.raises(ValueError, match=r"^(sparse Result offsets do not match its rows and "
                                         r"entries|a sparse Result carries 3 arrays, got 4)$"):
        protocol.result_rows(sparse, _as_buffers(*arrays), OutputKind.SPARSE, [1, 1])


def test_sparse_arrays_are_the_wire_dtypes_whatever_the_rows_are() -> None:
    """int64 indices and float64 values (numpy's defaults) go out as int32 and float32, the
    dtypes result_rows reads them as; no rows: three empty frames of those dtypes."""
    offsets, indices, values = protocol.sparse_arrays(
        [(np.array([4, 9], np.int64), np.array([0.25, 2.5])), (np.array([], np.int64),
                                                              np.array([])),
         (np.array([1], np.int64), np.array([1.5]))])
    assert (offsets.dtype, indices.dtype, values.dtype) == (np.int32, np.int32, np.float32)
    assert offsets.tolist() == [0, 2, 2, 3]
    assert indices.tolist() == [4, 9, 1]
    assert values.tolist() == [0.25, 2.5, 1.5]
    empty = protocol.sparse_arrays([])
    assert [(a.dtype, a.shape) for a in empty] == [(np.int32, (1,)), (np.int32, (0,)),
                                                  (np.float32, (0,))]


def test_a_sparse_result_of_negative_rows_is_refused_as_malformed() -> None:
    """rows -1 with empty offsets fits the offsets' length check (0 == -1 + 1): reading the
    first offset then raised an IndexError, which the router's receive loop does not take for
    its batch's loss (ValueError) and which stopped the whole server."""
    negative = Result(batch_id=1, rows=-1, dim=10, compute_ms=1.0)
    empty = [np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32)]
    with pytest.raises(ValueError, match="offsets"):
        protocol.result_rows(negative, _as_buffers(*empty), OutputKind.SPARSE, [1])


@pytest.fixture(params=["inproc", "ipc"])
def socket_pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[
        tuple[zmq.Socket, zmq.Socket]]:
    context = zmq.Context()
    endpoint = ("inproc://protocol-test" if request.param == "inproc"
                else f"ipc://{tmp_path / 'sock'}")
    router = context.socket(zmq.ROUTER)
    dealer = context.socket(zmq.DEALER)
    for sock in (router, dealer):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
    dealer.setsockopt(zmq.IDENTITY, b"w0")
    router.bind(endpoint)
    dealer.connect(endpoint)
    yield router, dealer
    router.close()
    dealer.close()
    context.term()


def test_batch_over_zmq_zero_copy(socket_pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    router, dealer = socket_pair
    # Large enough that zmq hands the receiver a real zero-copy frame, not a small message.
    n = 50_000
    arrays = BatchArrays(
        input_ids=np.arange(n, dtype=np.int32),
        position_ids=(np.arange(n, dtype=np.int32) % 512),
        token_type_ids=(np.arange(n, dtype=np.int32) % 2),
        cu_seqlens=np.array([0, 1, n // 2, n], dtype=np.int32),
    )
    dealer.send_multipart(encode(BATCH, *arrays), copy=False)
    frames = router.recv_multipart(copy=False)
    assert frames[0].bytes == b"w0"
    message, buffers = decode(frames[1:])
    assert message == BATCH
    got = batch_arrays(buffers)
    for name, want in zip(BatchArrays._fields, arrays, strict=True):
        np.testing.assert_array_equal(getattr(got, name), want)


def test_result_over_zmq_zero_copy(socket_pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    router, dealer = socket_pair
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((300, 384)).astype(np.float32)
    message = Result(batch_id=9, rows=300, dim=384, compute_ms=3.5)
    # A ROUTER drops what it cannot route yet: let the worker announce itself first.
    dealer.send_multipart(encode(READY))
    identity, *_ = router.recv_multipart()
    assert identity == b"w0"
    router.send_multipart([b"w0", *encode(message, rows)], copy=False)
    got_message, buffers = decode(dealer.recv_multipart(copy=False))
    assert got_message == message
    assert isinstance(got_message, Result)
    np.testing.assert_array_equal(result_array(got_message, buffers), rows)


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_header_only_messages_over_zmq(
    socket_pair: tuple[zmq.Socket, zmq.Socket], message: protocol.Message
) -> None:
    router, dealer = socket_pair
    dealer.send_multipart(encode(message), copy=False)
    frames = router.recv_multipart(copy=False)
    decoded, buffers = decode(frames[1:])
    assert decoded == message
    assert buffers == []
