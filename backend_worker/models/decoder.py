"""Decoder-only embedders (model_type qwen2, qwen3, mistral, llama): pre-norm layers with
RMSNorm, grouped-query rotary attention and a SwiGLU MLP, then a final RMSNorm.

The four types differ in a handful of switches (which projections carry a bias, per-head q/k
norms, which layers use a sliding window), kept as data in `FLAVOURS`; everything else is one
implementation. They are served as embedders (last-token or mean pooling from
sentence-transformers' 1_Pooling), as *ForSequenceClassification classifiers, and as LogitScore
re-rankers (*ForCausalLM; backend_worker/logit_score_head.py turns two rows of the LM head into a
one-label score, which is where tie_word_embeddings matters).

Attention is causal unless config.json says otherwise (shared/decoders.py is_causal, which
the router reads too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self

import torch
from torch import nn

from backend_worker.attention import Attention, MaskSpec
from backend_worker.head_modules import FamilyHeads, HeadKeys, LogitsHead
from backend_worker.layers import (
    GatedMLP,
    RMSNorm,
    RopeTables,
    Rotary,
    SelfAttention,
    activation,
)
from backend_worker.loading import Rule, WeightMap
from backend_worker.models.config import refusal, required_keys
from backend_worker.models.registry import register
from backend_worker.rope import flat_rope_settings, rotary
from shared.decoders import DECODER_TYPES, is_causal
from shared.errors import ConfigError
from shared.model_limits import config_max_positions

WEIGHT_MAP = WeightMap(
    rules=(
        Rule("embed_tokens.weight", "embed.weight"),
        Rule("layers.{i}.self_attn.{part}.{w}", "layers.{i}.attention.qkv.{w}",
             fuse=("q_proj", "k_proj", "v_proj")),
        Rule("layers.{i}.self_attn.o_proj.{w}", "layers.{i}.attention.out.{w}"),
        Rule("layers.{i}.self_attn.q_norm.weight", "layers.{i}.attention.q_norm.weight"),
        Rule("layers.{i}.self_attn.k_norm.weight", "layers.{i}.attention.k_norm.weight"),
        Rule("layers.{i}.input_layernorm.weight", "layers.{i}.attention_norm.weight"),
        Rule("layers.{i}.mlp.{part}.{w}", "layers.{i}.mlp.gate_up.{w}",
             fuse=("gate_proj", "up_proj")),
        Rule("layers.{i}.mlp.down_proj.{w}", "layers.{i}.mlp.down.{w}"),
        Rule("layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
        Rule("norm.weight", "norm.weight"),
    ),
    # *ForCausalLM and *ForSequenceClassification nest the decoder in "model.".
    prefixes=("model.",),
    ignore=(
        # The LM head of *ForCausalLM checkpoints: embedders never use it; a LogitScore
        # re-ranker reads its two rows itself (backend_worker/logit_score_head.py).
        r"lm_head\..*",
        r"score\..*",  # the classifier head, loaded by backend_worker/heads.py when served
        r"(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",  # buffers older transformers saved
    ),
)


class LastTokenClassifier(LogitsHead):
    """*ForSequenceClassification of the decoders: score (no bias) on each sequence's last
    token.

    transformers takes the rightmost token whose id is not pad_token_id; the worker takes the
    last token: the router drops a trailing run of the pad id first (a tokenizer that appends
    the token the config names as padding; shared/classifier.py scored_before).
    """

    def __init__(self, hidden: int, labels: int) -> None:
        super().__init__()
        self.score = nn.Linear(hidden, labels, bias=False)

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        return self.score(hidden.index_select(0, cu_seqlens[1:] - 1).float())


def _classifier(config: dict[str, Any], hidden: int, labels: int) -> nn.Module:
    return LastTokenClassifier(hidden, labels)


HEADS = FamilyHeads(
    encoder=WEIGHT_MAP,
    classifier=HeadKeys(rules=(Rule("score.weight", "score.weight"),), owns=(r"score\.",)),
    make_classifier=_classifier,
)

# A bias switch: fixed for the type, or the config key that decides it (absent = False).
Bias = bool | str


@dataclass(frozen=True)
class Flavour:
    """What tells one decoder model type from another, as transformers builds it."""

    qkv_bias: Bias
    out_bias: Bias
    mlp_bias: Bias
    qk_norm: bool  # per-head RMSNorm of q and k before rotary (Qwen3)
    # Which layers use config.sliding_window: none; every layer (Mistral); or Qwen's rule
    # (use_sliding_window, then layer_types or the layers from max_window_layers on).
    sliding: Literal["none", "every_layer", "qwen"]
    # transformers' tie_word_embeddings default for the type (its config class's field), used
    # when config.json leaves the key out: whether the LM head is the embedding matrix.
    tied: bool
    # The type's config class defaults when config.json leaves the key out (null, or None
    # here: the head count, hidden_size / heads).
    kv_heads: int | None = None
    head_dim: int | None = None

    def bias(self, which: Bias, config: dict[str, Any]) -> bool:
        return bool(config.get(which, False)) if isinstance(which, str) else which


FLAVOURS: dict[str, Flavour] = {
    "qwen2": Flavour(qkv_bias=True, out_bias=False, mlp_bias=False, qk_norm=False,
                     sliding="qwen", tied=False, kv_heads=32),
    "qwen3": Flavour(qkv_bias="attention_bias", out_bias="attention_bias", mlp_bias=False,
                     qk_norm=True, sliding="qwen", tied=False, kv_heads=32, head_dim=128),
    "mistral": Flavour(qkv_bias=False, out_bias=False, mlp_bias=False, qk_norm=False,
                       sliding="every_layer", tied=False, kv_heads=8),
    "llama": Flavour(qkv_bias="attention_bias", out_bias="attention_bias", mlp_bias="mlp_bias",
                     qk_norm=False, sliding="none", tied=False),
}
assert FLAVOURS.keys() == DECODER_TYPES, "shared/decoders.py names the same types"


def _window(config: dict[str, Any]) -> int | None:
    """config.sliding_window; left out, MistralConfig's and Qwen's default, 4096 (null is none)."""
    window = config.get("sliding_window", 4096)
    return int(window) if window is not None else None


def _windowed_layers(config: dict[str, Any], flavour: Flavour, layers: int) -> list[bool]:
    """Per layer, whether it attends through config.sliding_window (transformers' rules)."""
    model_type = config.get("model_type")
    layer_types = config.get("layer_types")
    window = _window(config)
    if flavour.sliding == "every_layer":
        if layer_types is not None:
            # transformers' MistralModel ignores layer_types (Ministral's alternating layers).
            raise refusal(str(model_type), "layer_types")
        return [window is not None] * layers
    if flavour.sliding == "none":
        return [False] * layers
    if not config.get("use_sliding_window", False) or window is None:
        if layer_types is not None and "sliding_attention" in layer_types:
            raise ConfigError(f"config.json: {model_type} layer_types name sliding_attention "
                              "layers but use_sliding_window is false or sliding_window unset")
        return [False] * layers
    if layer_types is None:
        first = int(config.get("max_window_layers", 28))  # transformers' default
        return [i >= first for i in range(layers)]
    if len(layer_types) != layers or not set(layer_types) <= {"full_attention",
                                                                "sliding_attention"}:
        raise ConfigError(f"config.json: layer_types {layer_types!r} is not one of "
                          f"full_attention / sliding_attention per each of {layers} layers")
    return [kind == "sliding_attention" for kind in layer_types]


def _mask(causal: bool, window: int | None) -> MaskSpec:
    if window is None:
        return MaskSpec(causal=causal)
    if window < 1:
        raise ConfigError(f"config.json: sliding_window {window} must be >= 1")
    # transformers: causal layers see keys j with i - window < j <= i (the window counts the
    # query itself); bidirectional ones (is_causal false) see |i - j| <= window.
    return MaskSpec(causal=True, window=window - 1) if causal else MaskSpec(window=window)


class DecoderLayer(nn.Module):
    """Pre-norm: x = x + attention(norm(x)); x = x + mlp(norm(x))."""

    def __init__(self, hidden: int, intermediate: int, act: str, eps: float,
                 attention: SelfAttention, mlp_bias: bool) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(hidden, eps)
        self.attention = attention
        self.mlp_norm = RMSNorm(hidden, eps)
        self.mlp = GatedMLP(hidden, intermediate, act, bias=mlp_bias)

    def forward(self, x: torch.Tensor, meta: Any, rope: RopeTables) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), meta, rope)
        return x + self.mlp(self.mlp_norm(x))


@register(model_types=tuple(FLAVOURS))
class DecoderModel(nn.Module):
    """Qwen2Model / Qwen3Model / MistralModel / LlamaModel's last hidden state, flat."""

    weight_map: ClassVar[WeightMap] = WEIGHT_MAP
    heads: ClassVar[FamilyHeads | None] = HEADS

    def __init__(
        self, *, vocab_size: int, hidden_size: int, masks: list[MaskSpec],
        num_attention_heads: int, num_key_value_heads: int, head_dim: int,
        intermediate_size: int, hidden_act: str, rms_norm_eps: float, qkv_bias: bool,
        out_bias: bool, mlp_bias: bool, qk_norm: bool, max_position_embeddings: int,
        rotary: Rotary, attention: Attention,
    ) -> None:
        super().__init__()
        self.max_positions = max_position_embeddings
        self.embed = nn.Embedding(vocab_size, hidden_size)
        norm = (lambda dim: RMSNorm(dim, rms_norm_eps)) if qk_norm else None
        self.layers = nn.ModuleList(
            DecoderLayer(
                hidden_size, intermediate_size, hidden_act, rms_norm_eps,
                SelfAttention(hidden_size, num_attention_heads, attention, bias=qkv_bias,
                              out_bias=out_bias, kv_heads=num_key_value_heads,
                              head_dim=head_dim, qk_norm=norm, mask=mask),
                mlp_bias=mlp_bias,
            )
            for mask in masks
        )
        self.norm = RMSNorm(hidden_size, rms_norm_eps)
        # Not a submodule: no weights, and its table is computed per batch.
        self.rotary = rotary

    @classmethod
    def from_config(cls, config: dict[str, Any], attention: Attention) -> Self:
        model_type = str(config.get("model_type"))
        flavour = FLAVOURS[model_type]
        hidden_act = str(config.get("hidden_act", "silu"))
        activation(hidden_act, where="config.json: hidden_act")  # fail with the setting's name
        with required_keys(model_type):
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            head_dim = int(config.get("head_dim", flavour.head_dim) or 0)
            if not head_dim:
                if hidden % heads:
                    raise ConfigError(f"config.json: hidden_size {hidden} is not divisible by "
                                      f"{heads} heads and head_dim is unset")
                head_dim = hidden // heads
            causal = is_causal(config)
            window_size = _window(config)
            windowed = _windowed_layers(config, flavour, int(config["num_hidden_layers"]))
            max_positions = config_max_positions(config)
            return cls(
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                masks=[_mask(causal, window_size if w else None) for w in windowed],
                num_attention_heads=heads,
                num_key_value_heads=int(config.get("num_key_value_heads", flavour.kv_heads)
                                        or heads),
                head_dim=head_dim,
                intermediate_size=int(config["intermediate_size"]),
                hidden_act=hidden_act,
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                qkv_bias=flavour.bias(flavour.qkv_bias, config),
                out_bias=flavour.bias(flavour.out_bias, config),
                mlp_bias=flavour.bias(flavour.mlp_bias, config),
                qk_norm=flavour.qk_norm,
                max_position_embeddings=max_positions,
                rotary=rotary(flat_rope_settings(config, default_theta=10000.0), head_dim,
                              max_positions, where="config.json: rope"),
                attention=attention,
            )

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor,
        meta: Any,
    ) -> torch.Tensor:
        x = self.embed(input_ids)
        rope = self.rotary.tables(position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, meta, rope)
        return self.norm(x)
