"""normalize=true: the router's L2 normalisation is sentence-transformers' Normalize module."""

from __future__ import annotations

import numpy as np
import torch

from router.results import Outcome, Timings, densify, normalize_rows


def test_rows_are_normalized_as_sentence_transformers_does() -> None:
    vectors = np.random.default_rng(0).standard_normal((5, 384)).astype(np.float32) * 7
    want = torch.nn.functional.normalize(torch.from_numpy(vectors), p=2, dim=1).numpy()
    got = normalize_rows(vectors)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)  # the norm's summation order


def test_a_zero_row_stays_zero() -> None:
    vectors = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 4.0]], dtype=np.float32)
    got = normalize_rows(vectors)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, [[0, 0, 0], [0.6, 0, 0.8]], rtol=1e-6)


def test_sparse_rows_densify_to_vocabulary_wide_float32() -> None:
    rows = [(np.array([1, 4], dtype=np.int32), np.array([0.5, 2.0], dtype=np.float32)),
            (np.array([], dtype=np.int32), np.array([], dtype=np.float32))]
    dense = densify(rows, 6)
    assert dense.dtype == np.float32
    np.testing.assert_array_equal(dense, [[0, 0.5, 0, 0, 2.0, 0], [0] * 6])


def test_one_row_is_still_a_matrix() -> None:
    """A single input's row comes back as a 1 x dim matrix (its fast path skips np.stack),
    so callers index rows the same way for one input as for many."""
    row = np.arange(4, dtype=np.float32)
    timings = Timings(1, 1, 0.0, 0.0, 0.0, 0.0)
    one = Outcome([row], timings).matrix()
    assert one.shape == (1, 4)
    np.testing.assert_array_equal(one[0], row)
    assert Outcome([row, row * 2], timings).matrix().shape == (2, 4)
