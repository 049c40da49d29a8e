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
