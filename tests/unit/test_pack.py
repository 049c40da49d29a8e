"""`pack`: entries -> the flat int32 arrays of a Batch."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.packing import pack
from router.queue import Entry
from shared.protocol import Batch, BatchArrays, OutputKind, batch_arrays, decode, encode

_LOOP = asyncio.new_event_loop()  # futures only need a loop to belong to; it never runs


def entry(ids: list[int], types: list[int] | None = None, offset: int = 0,
          dtype: type = np.int32) -> Entry:
    return Entry(
        request_id="",
        input_ids=np.asarray(ids, dtype=dtype),
        token_type_ids=np.asarray(types if types is not None else [0] * len(ids), dtype=dtype),
        position_offset=offset,
        output=OutputKind.POOLED,
        future=_LOOP.create_future(),
    )


def teardown_module() -> None:
    _LOOP.close()


def test_pack_example() -> None:
    arrays = pack([entry([101, 7, 102]), entry([101, 102], [0, 1]), entry([5, 6, 7, 8])])
    assert arrays.input_ids.tolist() == [101, 7, 102, 101, 102, 5, 6, 7, 8]
    assert arrays.position_ids.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert arrays.token_type_ids.tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert arrays.cu_seqlens.tolist() == [0, 3, 5, 9]
    assert arrays.lengths.tolist() == [3, 2, 4]


def test_positions_start_at_each_entrys_offset() -> None:
    # RoBERTa family: positions run from pad_token_id + 1.
    arrays = pack([entry([0, 5, 2], offset=2), entry([0, 2], offset=2), entry([9], offset=0)])
    assert arrays.position_ids.tolist() == [2, 3, 4, 2, 3, 0]


def test_single_entry() -> None:
    arrays = pack([entry([4, 5, 6], offset=1)])
    assert arrays.cu_seqlens.tolist() == [0, 3]
    assert arrays.position_ids.tolist() == [1, 2, 3]


@pytest.mark.parametrize("specs", [[[1, 2], [3]], [[1, 2, 3]]], ids=["two", "one"])
def test_every_array_is_int32_and_contiguous_even_from_int64_entries(
        specs: list[list[int]]) -> None:
    # One entry takes its own (shorter) path: it must give the same wire arrays.
    arrays = pack([entry(ids, dtype=np.int64) for ids in specs])
    for array in arrays:
        assert array.dtype == np.int32
        assert array.flags.c_contiguous
    assert arrays.input_ids.tolist() == [1, 2, 3]
    assert arrays.position_ids.tolist() == [i for ids in specs for i in range(len(ids))]


def transformers_positions(e: Entry) -> np.ndarray:
    """What transformers' create_position_ids_from_input_ids gives one sequence of an offset
    family (padding_idx = offset - 1): the pad id's own tokens at padding_idx, the others
    numbered from padding_idx + 1 without them; 0, 1, ... for a family without an offset."""
    if not e.position_offset:
        return np.arange(e.length)
    pad = e.position_offset - 1
    real = e.input_ids != pad
    return np.cumsum(real) * real + pad


@pytest.mark.parametrize("together", [False, True], ids=["alone", "in-a-batch"])
def test_a_pad_id_inside_a_sequence_is_numbered_as_transformers_numbers_it(
        together: bool) -> None:
    # RoBERTa's pad id 1 typed inside a text ("<pad>"), and a config whose pad_token_id is
    # <s> (0), which every sequence starts with.
    inner, at_start = entry([0, 5, 1, 6, 2], offset=2), entry([0, 7, 8, 2], offset=1)
    batches = [[inner, at_start]] if together else [[inner], [at_start]]
    positions = np.concatenate([pack(batch).position_ids for batch in batches]).tolist()
    assert positions == [2, 3, 1, 4, 5, 0, 1, 2, 3]
    assert positions == np.concatenate([transformers_positions(inner),
                                        transformers_positions(at_start)]).tolist()


entries_strategy = st.lists(
    st.tuples(
        # (small ids often: an offset family's pad id, offset - 1, inside a sequence)
        st.lists(st.one_of(st.integers(0, 3), st.integers(0, 2**31 - 1)), min_size=1,
                 max_size=20),
        st.integers(0, 3),
        st.integers(0, 1),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(entries_strategy)
def test_pack_slices_back_into_the_entries(spec: list[tuple[list[int], int, int]]) -> None:
    entries = [entry(ids, [t] * len(ids), offset) for ids, offset, t in spec]
    arrays = pack(entries)
    cu = arrays.cu_seqlens
    assert cu.dtype == np.int32
    assert cu.shape == (len(entries) + 1,)
    assert cu[0] == 0
    for i, e in enumerate(entries):
        span = slice(int(cu[i]), int(cu[i + 1]))
        np.testing.assert_array_equal(arrays.input_ids[span], e.input_ids)
        np.testing.assert_array_equal(arrays.token_type_ids[span], e.token_type_ids)
        np.testing.assert_array_equal(arrays.position_ids[span], transformers_positions(e))
    # What pack makes is what the worker accepts.
    header = Batch(batch_id=0, request_ids=[],
                   outputs=[OutputKind.POOLED] * len(entries), max_len=int(arrays.lengths.max()))
    _, buffers = decode([f if isinstance(f, bytes) else f.tobytes()
                         for f in encode(header, *arrays)])
    got = batch_arrays(buffers)
    for name in BatchArrays._fields:
        np.testing.assert_array_equal(getattr(got, name), getattr(arrays, name))

