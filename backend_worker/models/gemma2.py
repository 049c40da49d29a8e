"""Gemma 2 (model_type gemma2), as BAAI/bge-multilingual-gemma2 uses it: Gemma 3's layers
(backend_worker/models/gemma3.py: (1 + weight) RMSNorms before and after attention and MLP,
query_pre_attn_scalar, sqrt(hidden_size) embedding scale, GeGLU) without q/k norms, with one
rotary base for every layer, causal attention, local sliding-window layers alternating with
global ones (the first local), and attention scores capped at +-attn_logit_softcapping.

The cap (softcap * tanh(score / softcap), default 50) is applied by flash-attn's varlen kernel
where installed; torch's own kernels have no cap, so elsewhere these layers write the scores
out (backend_worker/attention/spec.py `sdpa`), as transformers' Gemma 2 does (it has no SDPA
path for the same reason).
"""

from __future__ import annotations

from typing import Any, Self

from backend_worker.attention import Attention
from backend_worker.models.config import refusal, required_keys
from backend_worker.models.gemma3 import Gemma3TextModel, gemma_settings, parse_layer_types
from backend_worker.models.registry import register
from backend_worker.rope import flat_rope_settings, rotary


def _alternating(layers: int) -> list[str]:
    """Gemma2Config's default: local, global, local, ..."""
    return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]


@register(model_types=("gemma2",))
class Gemma2Model(Gemma3TextModel):
    """Gemma2Model's last hidden state, flat (Gemma2ForCausalLM's under "model.")."""

    @classmethod
    def from_config(cls, config: dict[str, Any], attention: Attention) -> Self:
        # transformers' Gemma 2 builds its masks causal whatever these say; a checkpoint that
        # sets them expects something else.
        if config.get("use_bidirectional_attention"):
            raise refusal("gemma2", "use_bidirectional_attention=true")
        if config.get("is_causal") is False:
            raise refusal("gemma2", "is_causal=false")
        softcap = config.get("attn_logit_softcapping", 50.0)
        if softcap is not None and (isinstance(softcap, bool)
                                    or not (isinstance(softcap, int | float) and softcap > 0)):
            raise refusal("gemma2", f"attn_logit_softcapping={softcap!r}")
        # final_logit_softcapping caps the LM head's logits, which an embedder never computes.
        with required_keys("gemma2"):
            settings = gemma_settings(config, "gemma2")
            layers = int(config["num_hidden_layers"])
            shared = rotary(flat_rope_settings(config, default_theta=10000.0),
                            settings["head_dim"], settings["max_position_embeddings"],
                            where="config.json: rope")
            return cls(
                **settings,
                layer_types=(parse_layer_types(config, layers) if config.get("layer_types")
                             else _alternating(layers)),
                bidirectional=False,
                rotaries={"full_attention": shared, "sliding_attention": shared},
                attention=attention,
                qk_norm=False,
                softcap=None if softcap is None else float(softcap),
            )
