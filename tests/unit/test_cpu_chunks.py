"""On the CPU a large batch runs as consecutive chunks of whole sequences (cache-sized
activations): the split keeps every sequence whole and in order, and the vectors are the
unchunked ones."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backend_worker.engine import Engine, cpu_chunk_tokens, split_by_tokens
from shared.modelinfo import load_model_info
from shared.protocol import BatchArrays
from tests.fixtures.tiny import make_tiny_bert


def batch(lengths: list[int]) -> BatchArrays:
    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    total = int(cu[-1])
    positions = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
    return BatchArrays(np.arange(total, dtype=np.int32), positions,
                       np.ones(total, dtype=np.int32), cu)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(1, 64))
def test_split_keeps_sequences_whole_in_order_and_within_the_limit(
        lengths: list[int], limit: int) -> None:
    arrays = batch(lengths)
    parts = split_by_tokens(arrays, limit)
    assert [n for part in parts for n in part.lengths.tolist()] == lengths
    for part in parts:
        assert part.cu_seqlens[0] == 0 and part.cu_seqlens[-1] == part.input_ids.shape[0]
        assert part.input_ids.shape == part.position_ids.shape == part.token_type_ids.shape
        # Over the limit only as a single sequence longer than it.
        assert part.cu_seqlens[-1] <= limit or len(part.lengths) == 1
    for name in ("input_ids", "position_ids", "token_type_ids"):
        joined = np.concatenate([getattr(part, name) for part in parts])
        np.testing.assert_array_equal(joined, getattr(arrays, name))
    # Greedy: no part could have taken the next part's first sequence.
    for part, following in itertools.pairwise(parts):
        assert part.cu_seqlens[-1] + following.lengths[0] > limit


def test_a_batch_that_fits_is_not_copied() -> None:
    arrays = batch([3, 4])
    assert split_by_tokens(arrays, 7)[0] is arrays


@pytest.mark.parametrize(("hidden", "dtype", "tokens"), [
    (384, torch.float32, 4096), (384, torch.bfloat16, 8192),  # all-MiniLM-L6-v2
    (768, torch.float32, 2048), (768, torch.bfloat16, 4096),  # bge-base
    (32, torch.float32, 65536),
    (8192, torch.float32, 512),  # the floor: smaller chunks lose to per-layer overhead
])
def test_chunk_size_follows_the_activation_size(hidden: int, dtype: torch.dtype,
                                                tokens: int) -> None:
    assert cpu_chunk_tokens(hidden, dtype) == tokens


def test_chunked_vectors_are_the_unchunked_ones(tmp_path) -> None:
    engine = Engine.load(load_model_info(make_tiny_bert(tmp_path / "m", pooling="mean")))
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 60, size=40).tolist()
    arrays = batch(lengths)
    arrays = arrays._replace(input_ids=rng.integers(1, 100, size=arrays.input_ids.shape[0],
                                                    dtype=np.int32),
                             token_type_ids=np.zeros_like(arrays.token_type_ids))
    engine.chunk_tokens = None
    whole, whole_hidden = engine.embed(arrays), engine.hidden_states(arrays).numpy()
    engine.chunk_tokens = 100
    chunks = len(split_by_tokens(arrays, 100))
    assert chunks > 10
    forwards: list[int] = []
    engine.model.register_forward_hook(lambda module, args, out: forwards.append(1))
    np.testing.assert_allclose(engine.embed(arrays), whole, rtol=1e-5, atol=1e-6)
    assert len(forwards) == chunks  # one forward per chunk, none of the whole batch
    np.testing.assert_allclose(engine.hidden_states(arrays).numpy(), whole_hidden,
                               rtol=1e-5, atol=1e-5)
