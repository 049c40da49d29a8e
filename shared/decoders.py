"""What the router and the worker both read of a decoder's config.json (model_type qwen2, qwen3,
mistral, llama; the layers are backend_worker/models/decoder.py): which types these are, and
whether attention is causal.

Attention is causal, as in transformers, unless config.json says otherwise: `is_causal: false`
(transformers 5's switch for decoder-only models) or `use_bidirectional_attention: true` (what
bidirectional Qwen3 embedders such as voyage-4-nano set, and what TEI reads) make it
bidirectional.
"""

from __future__ import annotations

from typing import Any

from shared.errors import ConfigError

DECODER_TYPES = frozenset({"qwen2", "qwen3", "mistral", "llama"})


def is_causal(config: dict[str, Any]) -> bool:
    """Whether attention is causal, from the two switches checkpoints use (see the module
    docstring); ConfigError when they disagree or when custom code leaves it unsaid."""
    causal = config.get("is_causal")
    bidirectional = config.get("use_bidirectional_attention")
    for key, value in (("is_causal", causal), ("use_bidirectional_attention", bidirectional)):
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"config.json: {key} must be true or false, found {value!r}")
    if causal is not None and bidirectional is not None and causal == bidirectional:
        raise ConfigError(f"config.json: is_causal={causal} contradicts "
                          f"use_bidirectional_attention={bidirectional}")
    if bidirectional is not None:
        return not bidirectional
    if causal is not None:
        return causal
    auto_model = (config.get("auto_map") or {}).get("AutoModel")
    if auto_model:
        # gte-Qwen2's own modeling code (trust_remote_code) attends bidirectionally while the
        # stock architecture is causal; serving either guess could be silently wrong.
        raise ConfigError(
            f"config.json: {config.get('model_type')} with custom modeling code "
            f"(auto_map AutoModel {auto_model!r}) does not say whether its attention is causal; "
            'add "is_causal": false (bidirectional, as gte-Qwen2\'s code does) or '
            '"is_causal": true to config.json'
        )
    return True
