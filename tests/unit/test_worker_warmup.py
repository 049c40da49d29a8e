"""Warm-up failures that are configuration problems say which flag to change."""

from __future__ import annotations

import pytest

from backend_worker.main import _out_of_memory_says_which_flag, warmup_arrays
from shared.errors import ConfigError


@pytest.mark.parametrize("error", [
    RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"),  # torch.OutOfMemoryError
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
    MemoryError(),
])
def test_out_of_memory_in_warm_up_names_max_batch_tokens(error: BaseException) -> None:
    expected = r"cuda:0.*--max-batch-tokens 65536: lower --max-batch-tokens"
    with pytest.raises(ConfigError, match=expected), \
            _out_of_memory_says_which_flag(65536, "cuda:0"):
        raise error


def test_other_warm_up_errors_pass_through() -> None:
    with pytest.raises(RuntimeError, match="shape mismatch"), \
            _out_of_memory_says_which_flag(65536, "cpu"):
        raise RuntimeError("shape mismatch")


@pytest.mark.parametrize(("budget", "max_len", "packed"), [(16384, 512, True), (1000, 512, True),
                                                           (1000, 512, False), (100, 512, False)])
def test_warm_up_batch_costs_exactly_the_budget(budget: int, max_len: int, packed: bool) -> None:
    arrays = warmup_arrays(budget, max_len, packed)
    lengths = arrays.cu_seqlens[1:] - arrays.cu_seqlens[:-1]
    assert lengths.max() <= max_len
    if packed:
        assert lengths.sum() == budget
    else:  # padded cost: longest * count, never above the budget
        assert lengths.max() * len(lengths) <= budget


@pytest.mark.parametrize(("budget", "max_len"), [(1000, 512), (1023, 512), (1500, 512),
                                                 (2561, 512), (16384, 512), (700, 256)])
def test_padded_warm_up_costs_what_the_router_may_send(budget: int, max_len: int) -> None:
    """The router fills a padded batch up to longest * count <= the budget with sequences of
    any length (two of 500 tokens under 1000, max_len 512): the warm-up batch, which must be
    the largest it sends (memory, and the router's hang yardstick), costs as much, within one
    token per sequence; one 512-token sequence, half of it, was what warm-up ran."""
    arrays = warmup_arrays(budget, max_len, False)
    lengths = arrays.cu_seqlens[1:] - arrays.cu_seqlens[:-1]
    cost = int(lengths.max()) * len(lengths)
    assert lengths.max() <= max_len
    assert budget - len(lengths) <= cost <= budget
    assert lengths.sum() == cost  # equal lengths: every padded row is a real token
