"""GTE v1.5 / mGTE: model_type "new" (Alibaba's own code, e.g. Alibaba-NLP/gte-base-en-v1.5,
gte-multilingual-base, gte-multilingual-reranker-base) and model_type "gte" (transformers 5's
native port of the same architecture, e.g. alibaba-nlp-community/gte-multilingual-base).

Rotary positions, fused QKV with biases, a gated MLP whose fused up_gate_proj stores the value
half first, post-norm layers. The two model types share the checkpoint names (transformers
renames them at load and writes them back at save, only the encoder prefix differs: "new." or
"gte."); transformers' in-memory names (save_original_format=False) load too. They differ in
the rotary config: "new" has rope_theta and rope_scaling {"type": "ntk", "factor": f}, "gte"
has transformers' rope_parameters.
"""

from __future__ import annotations

from typing import Any, Self

import torch

from backend_worker.attention import Attention
from backend_worker.head_modules import (
    BERT_CLASSIFIER_KEYS,
    Either,
    FamilyHeads,
    HeadKeys,
    SpladeHead,
)
from backend_worker.layers import activation, rope_inv_freq
from backend_worker.loading import Rule, WeightMap
from backend_worker.models.config import refusal, required_keys
from backend_worker.models.registry import register
from backend_worker.models.rotary_encoder import EncoderSpec, RotaryEncoder
from shared.errors import ConfigError

FAMILY = "GTE"  # how config errors name it

WEIGHT_MAP = WeightMap(
    rules=(
        Rule("embeddings.word_embeddings.weight", "embeddings.word.weight"),
        Rule("embeddings.token_type_embeddings.weight", "embeddings.token_type.weight"),
        Rule("embeddings.LayerNorm.{w}", "embeddings.norm.{w}"),
        # The checkpoint names (Alibaba's code, and transformers' save_pretrained).
        Rule("encoder.layer.{i}.attention.qkv_proj.{w}", "layers.{i}.attention.qkv.{w}"),
        # Alibaba's code with pack_qkv=false.
        Rule("encoder.layer.{i}.attention.{part}.{w}", "layers.{i}.attention.qkv.{w}",
             fuse=("q_proj", "k_proj", "v_proj")),
        Rule("encoder.layer.{i}.attention.o_proj.{w}", "layers.{i}.attention.out.{w}"),
        Rule("encoder.layer.{i}.mlp.up_gate_proj.weight", "layers.{i}.mlp.gate_up.weight"),
        Rule("encoder.layer.{i}.mlp.down_proj.{w}", "layers.{i}.mlp.down.{w}"),
        Rule("encoder.layer.{i}.attn_ln.{w}", "layers.{i}.attention_norm.{w}"),
        Rule("encoder.layer.{i}.mlp_ln.{w}", "layers.{i}.mlp_norm.{w}"),
        # transformers' in-memory names (save_original_format=False).
        Rule("layers.{i}.self_attn.{part}.{w}", "layers.{i}.attention.qkv.{w}",
             fuse=("q_proj", "k_proj", "v_proj")),
        Rule("layers.{i}.self_attn.o_proj.{w}", "layers.{i}.attention.out.{w}"),
        # Fused in up_gate_proj's order (value half first).
        Rule("layers.{i}.mlp.{part}.weight", "layers.{i}.mlp.gate_up.weight",
             fuse=("up_proj", "gate_proj")),
        Rule("layers.{i}.mlp.down_proj.{w}", "layers.{i}.mlp.down.{w}"),
        Rule("layers.{i}.post_attention_layernorm.{w}", "layers.{i}.attention_norm.{w}"),
        Rule("layers.{i}.post_mlp_layernorm.{w}", "layers.{i}.mlp_norm.{w}"),
    ),
    # NewFor* keep the encoder under "new.", transformers' GteFor* under "gte.".
    prefixes=("new.", "gte."),
    ignore=(
        # Heads: backend_worker/heads.py loads the one a model serves.
        r"pooler\..*",
        r"classifier\..*",
        r"lm_head\..*",
    ),
)


def _make_mlm(config: dict[str, Any], hidden: int, vocab: int) -> SpladeHead:
    # NOTE: Alibaba's NewLMPredictionHead applies hidden_act; transformers' GteLMHead always
    # applies the exact GELU, whatever hidden_act says.
    act = "gelu" if config.get("model_type") == "gte" else str(config.get("hidden_act", "gelu"))
    return SpladeHead(hidden, vocab, act, float(config.get("layer_norm_eps", 1e-12)))


HEADS = FamilyHeads(
    encoder=WEIGHT_MAP,
    # NewForSequenceClassification and GteForSequenceClassification are BERT's shape:
    # classifier(tanh(pooler(h[CLS]))).
    classifier=BERT_CLASSIFIER_KEYS,
    mlm=HeadKeys(
        rules=(
            Rule("lm_head.dense.{w}", "dense.{w}"),
            Rule("lm_head.norm.{w}", "norm.{w}"),
            Rule("lm_head.layer_norm.{w}", "norm.{w}"),  # transformers' in-memory name
            Rule("lm_head.decoder.bias", "decoder.bias"),
        ),
        owns=(r"lm_head\.",),
    ),
    mlm_tied=(Either(Rule("lm_head.decoder.weight", "decoder.weight"),
                     Rule("embeddings.word_embeddings.weight", "decoder.weight")),),
    make_mlm=_make_mlm,
)


def _new_inv_freq(config: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Alibaba's rotary frequencies: plain, or its fixed NTK scaling."""
    theta = float(config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if scaling is None:
        return rope_inv_freq(head_dim, theta)
    kind = scaling.get("type") or scaling.get("rope_type")
    if kind != "ntk":
        raise refusal(FAMILY, f"rope_scaling type {kind!r} (supported: ntk)")
    if scaling.get("mixed_b") is not None:
        raise refusal(FAMILY, f"rope_scaling mixed_b={scaling['mixed_b']!r} (mixed NTK)")
    factor = float(scaling["factor"])
    if factor <= 1:
        # NTKScalingRotaryEmbedding only rescales when its table (max_position_embeddings *
        # factor rows) is longer than max_position_embeddings.
        return rope_inv_freq(head_dim, theta)
    # NTKScalingRotaryEmbedding without mixed_b: base * factor, every frequency divided by
    # factor^(2/d), for every position (its table is built scaled in __init__, never unscaled).
    return rope_inv_freq(head_dim, theta * factor) / factor ** (2 / head_dim)


def _native_inv_freq(config: dict[str, Any], head_dim: int) -> torch.Tensor:
    """transformers' GteConfig: rope_parameters, default type only."""
    if config.get("rope_scaling") is not None:
        raise refusal(FAMILY, f"rope_scaling {config['rope_scaling']!r} in a model_type 'gte' "
                              "config (transformers reads rope_parameters)")
    rope = config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))  # "type": legacy spelling
    if rope_type != "default":
        raise refusal(FAMILY, f"rope_parameters rope_type {rope_type!r} (supported: default)")
    theta = rope.get("rope_theta", config.get("rope_theta", 160_000.0))  # GteConfig's default
    return rope_inv_freq(head_dim, float(theta))


# Settings of Alibaba's NewConfig under which this implementation would compute something else.
_NEW_REQUIRED: dict[str, Any] = {
    "position_embedding_type": "rope", "layer_norm_type": "layer_norm",
    "logn_attention_scale": False, "logn_attention_clip1": False,
}


def _spec(config: dict[str, Any]) -> EncoderSpec:
    native = config.get("model_type") == "gte"
    if not native:
        for key, wanted in _NEW_REQUIRED.items():
            value = config.get(key, wanted)
            if value != wanted:
                raise refusal(FAMILY, f"{key}={value!r} (supported: {wanted!r})")
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    if hidden % heads:
        raise ConfigError(f"config.json: hidden_size {hidden} is not divisible by "
                          f"num_attention_heads {heads}")
    head_dim = hidden // heads
    act = str(config.get("hidden_act", "gelu"))
    activation(act, where="config.json: hidden_act")
    inv_freq = _native_inv_freq(config, head_dim) if native else _new_inv_freq(config, head_dim)
    return EncoderSpec(
        vocab_size=int(config["vocab_size"]), hidden_size=hidden,
        num_layers=int(config["num_hidden_layers"]), num_heads=heads, head_dim=head_dim,
        intermediate_size=int(config["intermediate_size"]),
        # Where config.json leaves them out, the config classes' defaults: GteConfig's, and
        # NewConfig's (Alibaba's remote code, which sentence-transformers runs: 2048 and 1).
        max_positions=int(config.get("max_position_embeddings", 8192 if native else 2048)),
        type_vocab_size=int(config.get("type_vocab_size", 1)),
        eps=float(config.get("layer_norm_eps", 1e-12)), inv_freq=inv_freq, act=act,
        gated=True, gate_first=False, qkv_bias=True, out_bias=True, up_bias=False,
        down_bias=True,
    )


@register(model_types=("new", "gte"))
class GteModel(RotaryEncoder):
    weight_map = WEIGHT_MAP
    heads = HEADS

    @classmethod
    def from_config(cls, config: dict[str, Any], attention: Attention) -> Self:
        with required_keys(FAMILY):
            return cls(_spec(config), attention)
