"""Best-first orders of /rerank and /predict: TEI's, equal scores included (TEI sorts ascending,
stably, then reverses the list, so of two equal scores the later input comes first)."""

from __future__ import annotations

import numpy as np
import pytest

from router.operations import best_first
from router.scores import activate, ranked_labels
from shared.errors import EmbedServeError, ErrorType


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


def test_many_tied_labels_keep_teis_order() -> None:
    """Past a handful of labels numpy's default sort is not stable: ties must still come
    later label first (a classifier of many labels, most scored alike)."""
    scores = np.zeros(40, dtype=np.float32)
    scores[::3] = 0.5
    labels = [label for _, label in ranked_labels(scores, {})]
    high = [f"LABEL_{i}" for i in range(39, -1, -1) if i % 3 == 0]
    assert labels[:len(high)] == high
    assert labels[len(high):] == [f"LABEL_{i}" for i in range(39, -1, -1) if i % 3]


def test_each_activation_is_the_function_it_names() -> None:
    """Per row: a sigmoid rises with the logit, softmax sums to 1 across a row's labels (not
    down a column of inputs), tanh and identity keep the sign; raw_scores skips them all."""
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 3.0]], dtype=np.float32)
    np.testing.assert_allclose(activate(logits, "sigmoid", False), 1 / (1 + np.exp(-logits)))
    soft = activate(logits, "softmax", False)
    np.testing.assert_allclose(soft.sum(axis=1), [1.0, 1.0])
    np.testing.assert_allclose(soft[0], np.exp(logits[0]) / np.exp(logits[0]).sum())
    np.testing.assert_allclose(activate(logits, "tanh", False), np.tanh(logits))
    np.testing.assert_array_equal(activate(logits, "identity", False), logits)
    np.testing.assert_array_equal(activate(logits, "softmax", True), logits)


def test_softmax_of_huge_logits_does_not_overflow() -> None:
    """The row's max is subtracted before exp, so a logit of 1000 gives 1.0, not inf/inf."""
    scores = activate(np.array([[1000.0, 0.0, -5.0]], dtype=np.float32), "softmax", False)
    np.testing.assert_allclose(scores, [[1.0, 0.0, 0.0]], atol=1e-12)


def test_a_nan_logit_is_a_backend_error() -> None:
    """A NaN would sort anywhere and serialize as invalid JSON: it fails the request."""
    with pytest.raises(EmbedServeError) as info:
        activate(np.array([[0.5, np.nan]], dtype=np.float32), "sigmoid", False)
    assert info.value.error_type is ErrorType.BACKEND
