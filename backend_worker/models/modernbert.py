"""ModernBERT (model_type "modernbert"): pre-norm layers, rotary positions, GeGLU MLP, and
attention that alternates between global layers and local (sliding-window) layers, each kind
with its own rotary base.

The embeddings are the token table and a norm (no positions, no token types); layer 0 has no
attention norm (the embedding norm plays that part); a final norm follows the last layer. Every
LayerNorm, linear layer and head takes its bias from a config flag (`norm_bias`,
`attention_bias`, `mlp_bias`, `classifier_bias`, `decoder_bias`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch
from torch import nn

from backend_worker.attention import BIDIRECTIONAL, Attention, MaskSpec
from backend_worker.head_modules import Either, FamilyHeads, HeadKeys, LogitsHead, SpladeHead
from backend_worker.layers import (
    GatedMLP,
    RopeTables,
    Rotary,
    SelfAttention,
    activation,
    rope_inv_freq,
)
from backend_worker.loading import Rule, WeightMap
from backend_worker.models.config import required_keys
from backend_worker.models.registry import register
from backend_worker.pooling import pool_cls, pool_mean
from shared.errors import ConfigError

WEIGHT_MAP = WeightMap(
    rules=(
        Rule("embeddings.tok_embeddings.weight", "embeddings.weight"),
        Rule("embeddings.norm.{w}", "embeddings_norm.{w}"),
        # Wqkv is already fused as q | k | v blocks of hidden rows each: SelfAttention's layout.
        Rule("layers.{i}.attn.Wqkv.{w}", "layers.{i}.attention.qkv.{w}"),
        Rule("layers.{i}.attn.Wo.{w}", "layers.{i}.attention.out.{w}"),
        Rule("layers.{i}.attn_norm.{w}", "layers.{i}.attention_norm.{w}"),
        # Wi is [input | gate]: transformers activates the first half, as GatedMLP does.
        Rule("layers.{i}.mlp.Wi.{w}", "layers.{i}.mlp.gate_up.{w}"),
        Rule("layers.{i}.mlp.Wo.{w}", "layers.{i}.mlp.down.{w}"),
        Rule("layers.{i}.mlp_norm.{w}", "layers.{i}.mlp_norm.{w}"),
        Rule("final_norm.{w}", "final_norm.{w}"),
    ),
    # ModernBertFor* checkpoints nest the encoder in "model.".
    prefixes=("model.",),
    # Heads of ModernBertFor* checkpoints; backend_worker/heads.py loads them when served.
    ignore=(r"head\..*", r"decoder\..*", r"classifier\..*"),
)

GLOBAL, LOCAL = "full_attention", "sliding_attention"
# transformers' defaults when config.json predates `rope_parameters` (every Hub checkpoint of
# the original release spells them global_rope_theta / local_rope_theta).
_DEFAULT_THETA = {GLOBAL: 160_000.0, LOCAL: 10_000.0}
_LEGACY_THETA_KEY = {GLOBAL: "global_rope_theta", LOCAL: "local_rope_theta"}


def _prediction_act(config: dict[str, Any]) -> str:
    """The activation of ModernBertPredictionHead (shared by the classifier and MLM heads)."""
    name = str(config.get("classifier_activation", "gelu"))
    activation(name, where="config.json: classifier_activation")
    return name


@dataclass(frozen=True)
class AttentionLayout:
    """Which layers attend globally, the local window, and each kind's rotary base."""

    kinds: tuple[str, ...]  # GLOBAL or LOCAL per layer
    window: int  # a local query i sees keys j with |i - j| <= window
    theta: dict[str, float]

    @classmethod
    def from_config(cls, config: dict[str, Any], layers: int) -> AttentionLayout:
        kinds = config.get("layer_types")
        if kinds is None:
            # Configs written before transformers 5: every n-th layer (from 0) is global.
            every = int(config.get("global_attn_every_n_layers", 3))
            if every < 1:
                raise ConfigError(f"config.json: global_attn_every_n_layers {every} must be >= 1")
            kinds = [GLOBAL if i % every == 0 else LOCAL for i in range(layers)]
        kinds = tuple(str(kind) for kind in kinds)
        unknown = sorted(set(kinds) - {GLOBAL, LOCAL})
        if unknown:
            raise ConfigError(f"config.json: ModernBERT layer_types {unknown} are not supported "
                              f"(supported: {GLOBAL}, {LOCAL})")
        if len(kinds) != layers:
            raise ConfigError(f"config.json: layer_types names {len(kinds)} layers, "
                              f"num_hidden_layers is {layers}")
        return cls(kinds, _half_window(config), {kind: _rope_theta(config, kind) for kind in
                                                 (GLOBAL, LOCAL)})


def _half_window(config: dict[str, Any]) -> int:
    """The keys a local query sees on each side (and itself): transformers and TEI agree on
    local_attention // 2, compared with <=. ModernBertConfig's `sliding_window` is a property
    whose setter makes local_attention twice the value, so a config.json that writes it wins
    over its local_attention, in either order."""
    if "sliding_window" in config:
        window = config["sliding_window"]
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ConfigError(f"config.json: ModernBERT sliding_window {window!r} must be an "
                              "integer >= 0 (the keys a local layer sees on each side)")
        return window
    local_attention = int(config.get("local_attention", 128))
    if local_attention < 0:
        raise ConfigError(f"config.json: local_attention {local_attention} must be >= 0")
    return local_attention // 2


def _rope_theta(config: dict[str, Any], kind: str) -> float:
    """The rotary base of one layer kind; plain (unscaled) rotary only.

    transformers 5 writes `rope_parameters` per layer kind; older configs say
    global_rope_theta / local_rope_theta, and a legacy `rope_scaling` applies to both kinds.
    """
    params = (config.get("rope_parameters") or {}).get(kind) or {}
    for source in (config.get("rope_scaling") or {}, params):
        rope_type = source.get("rope_type", source.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"config.json: ModernBERT rope_type {rope_type!r} ({kind}) is not "
                              "supported (supported: default)")
    theta = params.get("rope_theta", config.get(_LEGACY_THETA_KEY[kind], _DEFAULT_THETA[kind]))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"config.json: ModernBERT rope_theta {theta!r} ({kind}) must be a "
                          "positive number")
    return float(theta)


_CLASSIFIER_POOLING = {"cls": pool_cls, "mean": pool_mean}


class ModernBertClassifierHead(LogitsHead):
    """ModernBertForSequenceClassification: classifier(norm(act(dense(pool(h))))), where
    pool is the first token or the mean over the sequence (config.json classifier_pooling)."""

    def __init__(self, hidden: int, labels: int, act: str, eps: float, *, pooling: str,
                 dense_bias: bool, norm_bias: bool) -> None:
        super().__init__()
        self.pool = _CLASSIFIER_POOLING[pooling]
        self.dense = nn.Linear(hidden, hidden, bias=dense_bias)
        self.act = activation(act, where="config.json: classifier_activation")
        self.norm = nn.LayerNorm(hidden, eps=eps, bias=norm_bias)
        self.classifier = nn.Linear(hidden, labels)

    @classmethod
    def from_config(cls, config: dict[str, Any], hidden: int, labels: int) -> Self:
        pooling = str(config.get("classifier_pooling", "cls"))
        if pooling not in _CLASSIFIER_POOLING:
            raise ConfigError(f"config.json: ModernBERT classifier_pooling {pooling!r} is not "
                              f"supported (supported: {', '.join(_CLASSIFIER_POOLING)})")
        return cls(hidden, labels, _prediction_act(config), float(config.get("norm_eps", 1e-5)),
                   pooling=pooling, dense_bias=bool(config.get("classifier_bias", False)),
                   norm_bias=bool(config.get("norm_bias", False)))

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(hidden, cu_seqlens, cu_seqlens[1:] - cu_seqlens[:-1])  # float32
        return self.classifier(self.norm(self.act(self.dense(pooled))))


def _mlm_head(config: dict[str, Any], hidden: int, vocab: int) -> SpladeHead:
    """ModernBertForMaskedLM's head + decoder, under SPLADE's pooling."""
    return SpladeHead(hidden, vocab, _prediction_act(config), float(config.get("norm_eps", 1e-5)),
                      dense_bias=bool(config.get("classifier_bias", False)),
                      norm_bias=bool(config.get("norm_bias", False)),
                      decoder_bias=bool(config.get("decoder_bias", True)))


HEADS = FamilyHeads(
    encoder=WEIGHT_MAP,
    classifier=HeadKeys(
        rules=(Rule("head.dense.{w}", "dense.{w}"), Rule("head.norm.{w}", "norm.{w}"),
               Rule("classifier.{w}", "classifier.{w}")),
        owns=(r"head\.", r"classifier\."),
    ),
    mlm=HeadKeys(
        rules=(Rule("head.dense.{w}", "dense.{w}"), Rule("head.norm.{w}", "norm.{w}"),
               # Present exactly when config.json's decoder_bias is (the module says which).
               Rule("decoder.bias", "decoder.bias")),
        owns=(r"head\.", r"decoder\."),
    ),
    # transformers ties the decoder to the token embeddings and saves it once.
    mlm_tied=(Either(Rule("decoder.weight", "decoder.weight"),
                     Rule("embeddings.tok_embeddings.weight", "decoder.weight")),),
    make_classifier=ModernBertClassifierHead.from_config,
    make_mlm=_mlm_head,
)


class ModernBertLayer(nn.Module):
    """Pre-norm: x = x + attention(norm(x)); x = x + mlp(norm(x))."""

    def __init__(
        self, *, hidden: int, heads: int, intermediate: int, act: str, eps: float,
        norm_bias: bool, attention_bias: bool, mlp_bias: bool, first: bool, is_global: bool,
        mask: MaskSpec, attention: Attention,
    ) -> None:
        super().__init__()
        self.is_global = is_global
        # Layer 0 reads the embedding norm's output directly.
        self.attention_norm = (nn.Identity() if first
                               else nn.LayerNorm(hidden, eps=eps, bias=norm_bias))
        self.attention = SelfAttention(hidden, heads, attention, bias=attention_bias, mask=mask)
        self.mlp_norm = nn.LayerNorm(hidden, eps=eps, bias=norm_bias)
        self.mlp = GatedMLP(hidden, intermediate, act, bias=mlp_bias)

    def forward(self, x: torch.Tensor, meta: Any, rope: RopeTables) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), meta, rope)
        return x + self.mlp(self.mlp_norm(x))


@register(model_types=("modernbert",))
class ModernBertModel(nn.Module):
    """ModernBertModel's last hidden state (after final_norm), flat."""

    weight_map: ClassVar[WeightMap] = WEIGHT_MAP
    heads: ClassVar[FamilyHeads | None] = HEADS

    def __init__(
        self, *, vocab_size: int, hidden_size: int, num_attention_heads: int,
        intermediate_size: int, max_position_embeddings: int, hidden_activation: str,
        norm_eps: float, norm_bias: bool, attention_bias: bool, mlp_bias: bool,
        layout: AttentionLayout, attention: Attention,
    ) -> None:
        super().__init__()
        if hidden_size % num_attention_heads:
            raise ConfigError(f"config.json: hidden_size {hidden_size} is not divisible by "
                              f"{num_attention_heads} heads")
        head_dim = hidden_size // num_attention_heads
        # Rotary has no table: the limit is the one the model was trained for.
        self.max_positions = max_position_embeddings
        self.embeddings = nn.Embedding(vocab_size, hidden_size)
        self.embeddings_norm = nn.LayerNorm(hidden_size, eps=norm_eps, bias=norm_bias)
        # One spec shared by every local layer, so they share its cached masks within a batch.
        local = MaskSpec(window=layout.window)
        self.layers = nn.ModuleList(
            ModernBertLayer(
                hidden=hidden_size, heads=num_attention_heads, intermediate=intermediate_size,
                act=hidden_activation, eps=norm_eps, norm_bias=norm_bias,
                attention_bias=attention_bias, mlp_bias=mlp_bias, first=i == 0,
                is_global=kind == GLOBAL, mask=BIDIRECTIONAL if kind == GLOBAL else local,
                attention=attention,
            )
            for i, kind in enumerate(layout.kinds)
        )
        self.final_norm = nn.LayerNorm(hidden_size, eps=norm_eps, bias=norm_bias)
        self.global_rotary = Rotary(rope_inv_freq(head_dim, layout.theta[GLOBAL]))
        self.local_rotary = Rotary(rope_inv_freq(head_dim, layout.theta[LOCAL]))
        self._has_local = LOCAL in layout.kinds

    @classmethod
    def from_config(cls, config: dict[str, Any], attention: Attention) -> Self:
        hidden_activation = str(config.get("hidden_activation", "gelu"))
        activation(hidden_activation, where="config.json: hidden_activation")
        with required_keys("ModernBERT"):
            layers = int(config["num_hidden_layers"])
            return cls(
                vocab_size=int(config["vocab_size"]),
                hidden_size=int(config["hidden_size"]),
                num_attention_heads=int(config["num_attention_heads"]),
                intermediate_size=int(config["intermediate_size"]),
                max_position_embeddings=int(config.get("max_position_embeddings", 8192)),
                hidden_activation=hidden_activation,
                norm_eps=float(config.get("norm_eps", 1e-5)),
                norm_bias=bool(config.get("norm_bias", False)),
                attention_bias=bool(config.get("attention_bias", False)),
                mlp_bias=bool(config.get("mlp_bias", False)),
                layout=AttentionLayout.from_config(config, layers),
                attention=attention,
            )

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor,
        meta: Any,
    ) -> torch.Tensor:
        # token_type_ids: ModernBERT has none; a pair's second segment is told apart by [SEP].
        x = self.embeddings_norm(self.embeddings(input_ids))
        global_rope = self.global_rotary.tables(position_ids, x.dtype)
        local_rope = self.local_rotary.tables(position_ids, x.dtype) if self._has_local else None
        for layer in self.layers:
            x = layer(x, meta, global_rope if layer.is_global else local_rope)
        return self.final_norm(x)
