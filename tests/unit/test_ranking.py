"""Best-first orders of /rerank and /predict: TEI's, equal scores included (TEI sorts ascending,
stably, then reverses the list, so of two equal scores the later input comes first)."""

from __future__ import annotations

import numpy as np

from router.operations import best_first
from router.scores import ranked_labels


def test_rerank_order_is_teis_ties_included() -> None:
    scores = np.array([0.5, 0.9, 0.5, 0.5, 0.1], dtype=np.float32)
    assert best_first(scores).tolist() == [1, 3, 2, 0, 4]


def test_label_order_is_teis_ties_included() -> None:
    scores = np.array([0.25, 0.5, 0.25], dtype=np.float32)
    ranked = ranked_labels(scores, {"0": "a", "1": "b", "2": "c"})
    assert [label for _, label in ranked] == ["b", "c", "a"]


def test_scores_equal_in_float32_are_a_tie() -> None:
    # sigmoid(21) and sigmoid(20) differ in float64 but are both 1.0 in the float32 sent.
    scores = 1.0 / (1.0 + np.exp(-np.array([21.0, 20.0, 3.0])))
    assert best_first(scores).tolist() == [1, 0, 2]
    assert [label for _, label in ranked_labels(scores, {"0": "a", "1": "b", "2": "c"})] == \
        ["b", "a", "c"]
