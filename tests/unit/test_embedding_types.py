"""The packed types Cohere's and Jina's routes answer (router/embedding_types.py) are
sentence-transformers' quantize_embeddings, on the values an e2e model seldom gives: exact
zeros (a 0 bit, as `> 0` makes it), negative zero, and widths that are not a multiple of 8."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from sentence_transformers.util.quantization import quantize_embeddings

from router.embedding_types import WRITERS


@pytest.mark.parametrize("width", [8, 20, 384, 3])
@pytest.mark.parametrize("kind", ["binary", "ubinary"])
def test_packed_signs_are_quantize_embeddings(kind: str, width: int) -> None:
    vectors = np.random.default_rng(width).standard_normal((4, width)).astype(np.float32)
    vectors[0] = 0.0  # all zero: every bit 0
    vectors[1, ::2] = -0.0
    vectors[2, :] = np.abs(vectors[2])  # all positive: every bit 1 (the padding stays 0)
    got = WRITERS[kind](vectors)
    want = quantize_embeddings(vectors, precision=kind)
    assert got.dtype == want.dtype and got.shape == (4, (width + 7) // 8)
    np.testing.assert_array_equal(got, want)


def test_base64_is_little_endian_float32() -> None:
    vectors = np.array([[1.5, -0.0, 3e-39], [0.0, -2.25, 1e30]], dtype=np.float32)
    rows = WRITERS["base64"](vectors)
    decoded = np.stack([np.frombuffer(base64.b64decode(row), dtype="<f4") for row in rows])
    np.testing.assert_array_equal(decoded, vectors)
    assert decoded.tobytes() == vectors.astype("<f4").tobytes()  # -0.0 and subnormals kept
