"""JSON answers (router/routes.json_response): numpy float32 arrays anywhere in a body are
written in float32's shortest form, which parses back to exactly the same float32."""

from __future__ import annotations

import json

import msgspec
import numpy as np

from router.routes import json_response
from router.schemas import OpenAIEmbedding


def body(value) -> object:
    return json.loads(json_response(value).body)


def test_float32_rows_are_short_and_exact() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((4, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    text = json_response(vectors).body
    # 0.0045407615 rather than float64's 0.0045407614670693874 for the same float32.
    assert len(text) < 0.7 * len(msgspec.json.encode(vectors.tolist()))
    np.testing.assert_array_equal(np.array(json.loads(text), dtype=np.float32), vectors)


def test_arrays_inside_lists_and_structs_and_views() -> None:
    rows = np.arange(12, dtype=np.float32).reshape(3, 4) / 3
    first, rest = body([rows[0], rows[1:]])
    np.testing.assert_array_equal(np.array(first, dtype=np.float32), rows[0])
    np.testing.assert_array_equal(np.array(rest, dtype=np.float32), rows[1:])
    columns = rows[:, ::2]  # not contiguous
    np.testing.assert_array_equal(np.array(body(columns), dtype=np.float32), columns)
    item = body(OpenAIEmbedding(embedding=rows[2], index=2))
    assert item["object"] == "embedding" and item["index"] == 2
    np.testing.assert_array_equal(np.array(item["embedding"], dtype=np.float32), rows[2])
    assert body({"score": np.float32(0.5), "n": np.int64(3)}) == {"score": 0.5, "n": 3}


def test_float32_scalars_are_written_as_float32() -> None:
    # Scores and sparse values: TEI writes its f32 as "0.29404664", not float64's digits.
    score = np.float32(0.29404663593708064)
    assert json_response([score]).body == b"[0.29404664]"
    assert np.float32(body({"score": score})["score"]) == score
