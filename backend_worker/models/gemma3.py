"""Gemma 3 text (model_type gemma3_text), as EmbeddingGemma uses it: bidirectional attention
(`use_bidirectional_attention`), local sliding-window layers interleaved with global ones, each
with its own rotary base, and mean pooling plus Dense modules from sentence-transformers.

What sets it apart from the other decoders: RMSNorm scales by (1 + weight); norms both before
and after attention and MLP; q/k norms; scores scaled by query_pre_attn_scalar^-0.5 instead of
head_dim^-0.5; token embeddings multiplied by sqrt(hidden_size) rounded to the model dtype;
a GeGLU MLP (gelu_pytorch_tanh).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, Self

import torch
from torch import nn

from backend_worker.attention import Attention, MaskSpec
from backend_worker.head_modules import FamilyHeads
from backend_worker.layers import GatedMLP, RMSNorm, RopeTables, Rotary, SelfAttention, activation
from backend_worker.loading import Rule, WeightMap
from backend_worker.models.config import refusal, required_keys
from backend_worker.models.registry import register
from backend_worker.rope import rotary
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
        Rule("layers.{i}.input_layernorm.weight", "layers.{i}.pre_attention_norm.weight"),
        Rule("layers.{i}.post_attention_layernorm.weight",
             "layers.{i}.post_attention_norm.weight"),
        Rule("layers.{i}.pre_feedforward_layernorm.weight", "layers.{i}.pre_mlp_norm.weight"),
        Rule("layers.{i}.post_feedforward_layernorm.weight", "layers.{i}.post_mlp_norm.weight"),
        Rule("layers.{i}.mlp.{part}.{w}", "layers.{i}.mlp.gate_up.{w}",
             fuse=("gate_proj", "up_proj")),
        Rule("layers.{i}.mlp.down_proj.{w}", "layers.{i}.mlp.down.{w}"),
        Rule("norm.weight", "norm.weight"),
    ),
    # Gemma3ForCausalLM nests the model in "model.".
    prefixes=("model.",),
    ignore=(r"lm_head\..*",),  # the (tied) LM head: embedders never use it
)

_LAYER_TYPES = ("sliding_attention", "full_attention")
# transformers' defaults when config.json does not say.
_DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


def parse_layer_types(config: dict[str, Any], layers: int) -> list[str]:
    layer_types = config.get("layer_types")
    if layer_types is None:
        # Older configs: every `sliding_window_pattern`-th layer is global, the rest local.
        pattern = int(config.get("sliding_window_pattern", 6))
        return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                for i in range(layers)]
    if len(layer_types) != layers or not set(layer_types) <= set(_LAYER_TYPES):
        raise ConfigError(f"config.json: layer_types {layer_types!r} is not one of "
                          f"{' / '.join(_LAYER_TYPES)} per each of {layers} layers")
    return list(layer_types)


def _bidirectional(config: dict[str, Any]) -> bool:
    value = config.get("use_bidirectional_attention", False)
    if not isinstance(value, bool):
        raise ConfigError(f"config.json: use_bidirectional_attention {value!r} is not supported "
                          "(supported: true, false)")
    causal = config.get("is_causal")
    if causal is not None and (causal is not True or value):
        # transformers' generic is_causal=false switch widens Gemma 3's local window (to
        # |i - j| <= window, or window // 2 + 1 on top of use_bidirectional_attention), and
        # is_causal=true contradicts use_bidirectional_attention: one switch, one definition.
        raise ConfigError(f"config.json: gemma3_text with is_causal={causal!r} and "
                          f"use_bidirectional_attention={value} is not supported; "
                          "set use_bidirectional_attention only")
    return value


def _sliding_mask(window: int, bidirectional: bool, scale: float) -> MaskSpec:
    """transformers' Gemma 3 window, converted exactly. Causal: keys j with
    i - window < j <= i. Bidirectional (EmbeddingGemma): the config's window is halved into
    `window // 2 + 1`, then keys with |i - j| < that, i.e. |i - j| <= window // 2."""
    if window < 1:
        raise ConfigError(f"config.json: sliding_window {window} must be >= 1")
    if bidirectional:
        return MaskSpec(window=window // 2, scale=scale)
    return MaskSpec(causal=True, window=window - 1, scale=scale)


def _rope_settings(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Rope settings per layer type, as transformers assembles them: rope_parameters
    (transformers 5) or rope_theta / rope_local_base_freq (older configs), with rope_scaling
    merged into the global layers' settings in either case; a layer type's rope_theta, where
    its rope_parameters name none, from the older keys too."""
    params = config.get("rope_parameters")
    if params:
        if not isinstance(params, dict) or not all(
            isinstance(params.get(t), dict) for t in _LAYER_TYPES
        ):
            raise ConfigError(f"config.json: rope_parameters {params!r} must give "
                              f"{' and '.join(_LAYER_TYPES)} settings")
        settings = {t: dict(params[t]) for t in _LAYER_TYPES}
    else:
        settings = {t: {} for t in _LAYER_TYPES}
    settings["full_attention"].update(config.get("rope_scaling") or {})
    for layer_type, key in (("full_attention", "rope_theta"),
                            ("sliding_attention", "rope_local_base_freq")):
        if settings[layer_type].get("rope_theta") is None:
            settings[layer_type]["rope_theta"] = config.get(key)
    for layer_type, theta in _DEFAULT_THETA.items():
        if settings[layer_type].get("rope_theta") is None:
            settings[layer_type]["rope_theta"] = theta
        if config.get("partial_rotary_factor") is not None:
            settings[layer_type].setdefault("partial_rotary_factor",
                                            config["partial_rotary_factor"])
    return settings


def gemma_settings(config: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The constructor settings Gemma 2 and 3 read alike, with their configs' defaults (not
    other families': 4 key/value heads, not one per head); KeyError for a missing required key.
    """
    # Neither config class has hidden_act: transformers ignores one (Gemma 1's "gelu") and runs
    # hidden_activation, by default gelu_pytorch_tanh.
    act = str(config.get("hidden_activation") or "gelu_pytorch_tanh")
    activation(act, where="config.json: hidden_activation")
    # A null window is accepted by the config but fails transformers' forward (the local
    # layers' mask is built whatever layer_types say): no window to serve.
    if "sliding_window" in config and config["sliding_window"] is None:
        raise refusal(model_type, "sliding_window=None")
    return {
        "vocab_size": int(config["vocab_size"]),
        "hidden_size": int(config["hidden_size"]),
        "num_attention_heads": int(config["num_attention_heads"]),
        "num_key_value_heads": int(config.get("num_key_value_heads") or 4),
        "head_dim": int(config.get("head_dim") or 256),
        "intermediate_size": int(config["intermediate_size"]),
        "hidden_activation": act,
        "rms_norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "attention_bias": bool(config.get("attention_bias", False)),
        "query_pre_attn_scalar": float(config.get("query_pre_attn_scalar", 256)),
        "sliding_window": int(config.get("sliding_window", 4096)),
        "max_position_embeddings": config_max_positions(config),
    }


class Gemma3Layer(nn.Module):
    """x = x + post_norm(attention(pre_norm(x))); x = x + post_norm(mlp(pre_norm(x)))."""

    def __init__(self, hidden: int, intermediate: int, act: str, eps: float,
                 attention: SelfAttention) -> None:
        super().__init__()
        self.pre_attention_norm = RMSNorm(hidden, eps, offset=1.0)
        self.attention = attention
        self.post_attention_norm = RMSNorm(hidden, eps, offset=1.0)
        self.pre_mlp_norm = RMSNorm(hidden, eps, offset=1.0)
        self.mlp = GatedMLP(hidden, intermediate, act)
        self.post_mlp_norm = RMSNorm(hidden, eps, offset=1.0)

    def forward(self, x: torch.Tensor, meta: Any, rope: RopeTables) -> torch.Tensor:
        x = x + self.post_attention_norm(self.attention(self.pre_attention_norm(x), meta, rope))
        return x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x)))


@register(model_types=("gemma3_text",))
class Gemma3TextModel(nn.Module):
    """Gemma3TextModel's last hidden state, flat."""

    weight_map: ClassVar[WeightMap] = WEIGHT_MAP
    heads: ClassVar[FamilyHeads | None] = None

    def __init__(
        self, *, vocab_size: int, hidden_size: int, layer_types: list[str],
        num_attention_heads: int, num_key_value_heads: int, head_dim: int,
        intermediate_size: int, hidden_activation: str, rms_norm_eps: float, attention_bias: bool,
        query_pre_attn_scalar: float, sliding_window: int, bidirectional: bool,
        max_position_embeddings: int, rotaries: dict[str, Rotary], attention: Attention,
        qk_norm: bool = True, softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.max_positions = max_position_embeddings
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.embed_scale = hidden_size**0.5
        self._scales: dict[torch.dtype, float] = {}
        scale = query_pre_attn_scalar**-0.5
        masks = {"full_attention": MaskSpec(causal=not bidirectional, scale=scale),
                 "sliding_attention": _sliding_mask(sliding_window, bidirectional, scale)}
        masks = {t: replace(spec, softcap=softcap) for t, spec in masks.items()}
        self.layer_types = layer_types
        self.layers = nn.ModuleList(
            Gemma3Layer(
                hidden_size, intermediate_size, hidden_activation, rms_norm_eps,
                SelfAttention(
                    hidden_size, num_attention_heads, attention, bias=attention_bias,
                    kv_heads=num_key_value_heads, head_dim=head_dim,
                    qk_norm=(lambda dim: RMSNorm(dim, rms_norm_eps, offset=1.0)) if qk_norm
                    else None,
                    mask=masks[layer_type],
                ),
            )
            for layer_type in layer_types
        )
        self.norm = RMSNorm(hidden_size, rms_norm_eps, offset=1.0)
        # Not submodules: no weights; only the layer types in use get a table per batch.
        self.rotaries = {t: rotaries[t] for t in dict.fromkeys(layer_types)}

    @classmethod
    def from_config(cls, config: dict[str, Any], attention: Attention) -> Self:
        if config.get("attn_logit_softcapping") is not None:
            raise refusal("gemma3_text", "attn_logit_softcapping="
                          f"{config['attn_logit_softcapping']!r}")
        # final_logit_softcapping caps the LM head's logits, which an embedder never computes.
        with required_keys("gemma3_text"):
            settings = gemma_settings(config, "gemma3_text")
            rope = _rope_settings(config)
            return cls(
                **settings,
                layer_types=parse_layer_types(config, int(config["num_hidden_layers"])),
                bidirectional=_bidirectional(config),
                rotaries={t: rotary(rope[t], settings["head_dim"],
                                    settings["max_position_embeddings"],
                                    where=f"config.json: rope ({t})") for t in _LAYER_TYPES},
                attention=attention,
            )

    def _embed_scale(self, dtype: torch.dtype) -> float:
        """sqrt(hidden_size) rounded to the model dtype, as transformers multiplies by it (in
        bfloat16 sqrt(768) = 27.71 becomes 27.75). A Python number: no host-to-device copy per
        forward, which a CUDA graph capture would refuse."""
        scale = self._scales.get(dtype)
        if scale is None:
            scale = self._scales[dtype] = torch.tensor(self.embed_scale).to(dtype).item()
        return scale

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor,
        meta: Any,
    ) -> torch.Tensor:
        x = self.embed(input_ids)
        x = x * self._embed_scale(x.dtype)
        tables = {t: r.tables(position_ids, x.dtype) for t, r in self.rotaries.items()}
        for layer_type, layer in zip(self.layer_types, self.layers, strict=True):
            x = layer(x, meta, tables[layer_type])
        return self.norm(x)
