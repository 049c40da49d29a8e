"""What a sequence classifier is: a classifier or a re-ranker, its labels, and the activation
sentence-transformers' CrossEncoder applies to its scores. Pure data, read from the files."""

from __future__ import annotations

import logging
from typing import Any, Literal

from shared.decoders import DECODER_TYPES, is_causal
from shared.errors import ConfigError
from shared.st_modules import module_kind

log = logging.getLogger(__name__)

ModelKind = Literal["embedding", "classifier", "reranker"]


def model_kind_of(config: dict[str, Any]) -> tuple[ModelKind, dict[str, str]]:
    """A *ForSequenceClassification model is a classifier, or a re-ranker with one label; its
    labels by index (transformers' LABEL_i where config.json names none)."""
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        return "embedding", {}
    try:  # keys as transformers reads them: integers ("01" is label 1)
        id2label = {str(int(k)): str(v) for k, v in (config.get("id2label") or {}).items()}
    except ValueError as exc:
        raise ConfigError(f"config.json: id2label keys must be integers ({exc})") from None
    # transformers sizes the head by len(id2label) and names output row i id2label[i]: a gap
    # leaves a row unnamed (its pipeline fails on it) and a label past the end never answered.
    for i in range(len(id2label)):
        if str(i) not in id2label:
            raise ConfigError(
                f"config.json: id2label names no label for output {i} (its keys must be 0.."
                f"{len(id2label) - 1}, one per output of the classifier; found "
                f"{sorted(int(k) for k in id2label)})")
    if not id2label:
        count = int(config.get("num_labels", 2))
        id2label = {str(i): f"LABEL_{i}" for i in range(count)}
    return ("reranker" if len(id2label) == 1 else "classifier"), id2label


def scored_before(config: dict[str, Any], kind: str) -> int | None:
    """transformers scores a decoder's *ForSequenceClassification (CrossEncoder with it) on
    each sequence's rightmost token that is not pad_token_id, so a tokenizer that appends that
    very id (Qwen3-Embedding's appends <|endoftext|>, which fine-tunes name as padding) has the
    token before it scored. That id, for the router to drop a sequence's trailing run of it:
    under causal attention the states before it do not change. None where the last token is
    the scored one (no pad id, no decoder classifier) or attention is bidirectional (dropping
    tokens would change every state; that config is served as TEI serves it)."""
    pad = config.get("pad_token_id")
    if (kind == "embedding" or config.get("model_type") not in DECODER_TYPES
            or not isinstance(pad, int) or not is_causal(config)):
        return None
    return pad


ScoreActivation = Literal["sigmoid", "softmax", "identity", "tanh"]
_SCORE_ACTIVATIONS: dict[str, ScoreActivation] = {
    "Sigmoid": "sigmoid", "Identity": "identity", "Softmax": "softmax", "Tanh": "tanh"}


def score_activation(config: dict[str, Any], labels: int,
                     st_config: dict[str, Any]) -> ScoreActivation:
    """sentence-transformers' CrossEncoder choice: config_sentence_transformers.json's
    `activation_fn` (where v6 saves it; `st_config` is empty where it reads no such file),
    else config.json's (v4-v5, else its pre-v4 key), else sigmoid for one label. Like it, a path
    outside torch is not trusted (it would be the repository's own code): the next decides.

    With several labels, Identity is CrossEncoder's default, which it saves like a choice: it
    decides nothing here, and the scores are probabilities as TEI's /predict gives them:
    a sigmoid per label for a multi-label model (config.json's problem_type, as transformers'
    text-classification pipeline reads it), else softmax (CrossEncoder's apply_softmax)."""
    legacy = config.get("sbert_ce_default_activation_function")
    for path in (st_config.get("activation_fn"),
                 (config.get("sentence_transformers") or {}).get("activation_fn", legacy)):
        if not path:
            continue
        if not str(path).startswith("torch."):
            log.warning("score activation %r is not torch's: not run here, as "
                        "sentence-transformers does not without trust_remote_code", path)
            continue
        name = _SCORE_ACTIVATIONS.get(module_kind(str(path)))
        if name is None:
            raise ConfigError(f"score activation {path!r} is not supported "
                              f"(supported: {', '.join(_SCORE_ACTIVATIONS)})")
        if name == "identity" and labels > 1:
            break
        return name
    if labels == 1 or config.get("problem_type") == "multi_label_classification":
        return "sigmoid"
    return "softmax"
