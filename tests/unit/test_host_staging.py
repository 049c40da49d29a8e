"""The worker's host-to-device staging (backend_worker/staging.py): on CUDA one pinned buffer and
one transfer per batch, reused batch after batch. Its buffer logic runs here unpinned."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend_worker.staging import HostStaging


def batch(rng: np.random.Generator, tokens: int, sequences: int) -> list[np.ndarray]:
    ids = rng.integers(0, 30_000, tokens, dtype=np.int32)
    positions = rng.integers(0, 512, tokens, dtype=np.int32)
    types = rng.integers(0, 2, tokens, dtype=np.int32)
    cu = np.sort(rng.integers(1, tokens, sequences + 1)).astype(np.int32)
    cu[0], cu[-1] = 0, tokens
    return [ids, positions, types, cu]


@pytest.mark.parametrize("staged", [True, False], ids=["staged", "plain"])
def test_every_batch_arrives_whole_through_growth_and_reuse(staged: bool) -> None:
    staging = HostStaging(torch.device("cpu"), staged=staged)
    rng = np.random.default_rng(0)
    # Small, then past the initial 2^16 slots (the buffers grow), then small again: a reused
    # buffer still holds the big batch's values beyond the small one's.
    for tokens, sequences in [(40, 3), (50_000, 100), (12, 2), (90_000, 7), (5, 1)]:
        arrays = batch(rng, tokens, sequences)
        tensors = staging.to_device(*arrays)
        assert [t.dtype for t in tensors] == [torch.int64] * 4
        for tensor, array in zip(tensors, arrays, strict=True):
            np.testing.assert_array_equal(tensor.numpy(), array)


def test_wire_buffers_are_never_written() -> None:
    """The worker hands read-only views of ZeroMQ frames: staging copies, never converts them
    in place."""
    arrays = batch(np.random.default_rng(1), 64, 4)
    originals = [a.copy() for a in arrays]
    for array in arrays:
        array.flags.writeable = False
    for staged in (True, False):
        tensors = HostStaging(torch.device("cpu"), staged=staged).to_device(*arrays)
        for tensor in tensors:
            tensor.add_(1)  # what a model may do to its inputs does not reach the wire
        for array, original in zip(arrays, originals, strict=True):
            np.testing.assert_array_equal(array, original)


def test_an_engine_embeds_the_same_through_the_staged_path(tmp_path) -> None:
    from backend_worker.engine import Engine
    from shared.modelinfo import load_model_info
    from tests.fixtures.tiny import MIXED_TEXTS, make_tiny_bert, pack

    model_dir = make_tiny_bert(tmp_path / "tiny", pooling="mean")
    engine = Engine.load(load_model_info(model_dir))
    plain = [engine.embed(pack(model_dir, MIXED_TEXTS[:n])[0]) for n in (5, 2)]
    engine._staging = HostStaging(engine.device, staged=True)
    for n, want in zip((5, 2), plain, strict=True):
        np.testing.assert_array_equal(engine.embed(pack(model_dir, MIXED_TEXTS[:n])[0]), want)
