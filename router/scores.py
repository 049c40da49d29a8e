"""From a classification head's logits to the scores a client sees."""

from __future__ import annotations

import numpy as np

from shared.errors import backend


def activate(logits: np.ndarray, activation: str, raw_scores: bool) -> np.ndarray:
    """Rows of logits -> scores: raw, sigmoid, tanh or softmax (with the true max subtracted)."""
    scores = logits.astype(np.float64)
    if np.isnan(scores).any():
        raise backend("the model produced a NaN score")
    if raw_scores or activation == "identity":
        return scores
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-scores))
    if activation == "tanh":
        return np.tanh(scores)
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def ranked_labels(scores: np.ndarray, id2label: dict[str, str]) -> list[tuple[float, str]]:
    """(score, label) for every label, best first (equal scores: the later label first, as
    TEI orders them; compared in the float32 the client is sent)."""
    order = np.argsort(scores.astype(np.float32), kind="stable")[::-1]
    return [(float(scores[i]), id2label.get(str(i), f"LABEL_{i}")) for i in order]
