"""Decoder configs (qwen2, qwen3, mistral, llama) that leave a key out: the model we build is
the one transformers builds from the same config.json, with its config class's default for the
key (which is not always what another family or another key would suggest)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from backend_worker.attention import PaddedSDPA
from backend_worker.models.decoder import DecoderModel

GIVEN: dict[str, Any] = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 2, "num_attention_heads": 4,
                         "num_key_value_heads": 2}


def built(model_type: str, **keys: Any) -> tuple[Any, DecoderModel]:
    """(transformers' config, our model on the meta device) for one config.json (GIVEN with
    `keys`, a None deleting one)."""
    from transformers import AutoConfig

    config = {"model_type": model_type, **GIVEN, **keys}
    config = {key: value for key, value in config.items() if value is not None}
    ref = AutoConfig.for_model(**config)
    with torch.device("meta"):
        return ref, DecoderModel.from_config(config, PaddedSDPA())


@pytest.mark.parametrize(("model_type", "keys"), [
    ("mistral", {}),
    ("qwen2", {"use_sliding_window": True, "max_window_layers": 1}),
    ("qwen3", {"use_sliding_window": True, "max_window_layers": 1, "head_dim": 8}),
])
def test_an_omitted_sliding_window_is_the_config_class_default(model_type: str,
                                                               keys: dict) -> None:
    """MistralConfig and Qwen's use a 4096-token window when config.json names none (null is
    no window): inputs past 4096 tokens attend through it."""
    ref, model = built(model_type, **keys)
    assert ref.sliding_window == 4096
    last = model.layers[-1].attention
    if model_type != "mistral":  # (MistralConfig has no layer_types: every layer)
        assert ref.layer_types[-1] == "sliding_attention"
    assert last.mask.window == ref.sliding_window - 1


@pytest.mark.parametrize(("model_type", "heads"),
                         [("qwen2", 64), ("qwen3", 64), ("mistral", 16), ("llama", 8)])
def test_omitted_head_sizes_are_the_config_class_defaults(model_type: str, heads: int) -> None:
    """num_key_value_heads left out is 32 for Qwen and 8 for Mistral (not the head count), and
    Qwen3's head_dim 128 (not hidden / heads): the checkpoint's q/k/v shapes are those."""
    ref, model = built(model_type, hidden_size=128, num_attention_heads=heads,
                       num_key_value_heads=None)
    attention = model.layers[0].attention
    assert (attention.kv_heads, attention.head_dim) == (
        ref.num_key_value_heads, getattr(ref, "head_dim", None) or 128 // heads)
