"""shared/classifier.py on config dicts alone: a classifier's labels and the activation its
scores get (the model-backed cases, against transformers and CrossEncoder, are in
tests/parity/test_heads.py)."""

from __future__ import annotations

import pytest

from shared.classifier import model_kind_of, score_activation
from shared.errors import ConfigError

CLASSIFIER = {"architectures": ["BertForSequenceClassification"]}
IDENTITY = "torch.nn.modules.linear.Identity"
SIGMOID = "torch.nn.modules.activation.Sigmoid"


def test_an_id2label_missing_only_its_last_output_is_refused() -> None:
    """Five labels keyed 0..3 and 5: transformers sizes the head by the count (5 rows), so
    row 4 has no name and label 5 is never answered, as with a gap further in."""
    config = CLASSIFIER | {"id2label": {str(k): f"l{k}" for k in (0, 1, 2, 3, 5)}}
    with pytest.raises(ConfigError, match="names no label for output 4 "):
        model_kind_of(config)


def test_labels_numbered_from_zero_are_a_classifier() -> None:
    config = CLASSIFIER | {"id2label": {"0": "neg", "1": "pos"}}
    assert model_kind_of(config) == ("classifier", {"0": "neg", "1": "pos"})


def test_an_identity_saved_beside_the_weights_decides_before_config_json() -> None:
    """config_sentence_transformers.json's activation_fn (v6) is the one CrossEncoder reads:
    its Identity (a several-label CrossEncoder's saved default) leaves the probabilities to
    softmax, and a Sigmoid left in config.json by an older save does not come back."""
    config = CLASSIFIER | {"sentence_transformers": {"activation_fn": SIGMOID}}
    assert score_activation(config, 3, {"activation_fn": IDENTITY}) == "softmax"
    assert score_activation(config, 3, {}) == "sigmoid"
    assert score_activation(config, 1, {"activation_fn": IDENTITY}) == "identity"
