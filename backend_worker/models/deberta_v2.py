"""DeBERTa-v2 / v3 (model_type "deberta-v2"): BERT's post-norm layers with disentangled attention.

- Attention: disentangled (backend_worker/models/disentangled.py), divided by
  sqrt(head_dim * (1 + number of terms)); the position tables projected per layer depend on
  the weights only and are computed once per device and dtype.
- Embeddings: words (of `embedding_size`, projected to the hidden size when it differs), plus
  absolute positions only where `position_biased_input` (v2's default, v3 says false), plus
  token types where `type_vocab_size` > 0 (v3 has none), then LayerNorm.
- DebertaV2ForSequenceClassification: classifier(act(pooler.dense(h[CLS]))), act the config's
  `pooler_hidden_act` (gelu by default). No MLM head is served (as in TEI).
- Refused: the convolution after the first layer of v2-xlarge/xxlarge (`conv_kernel_size`).
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any, ClassVar, Self

import torch
from torch import nn

from backend_worker.attention import Attention, MaskSpec
from backend_worker.head_modules import BERT_CLASSIFIER_KEYS, ClassifierHead, FamilyHeads
from backend_worker.layers import MLP, activation
from backend_worker.loading import Rule, WeightMap
from backend_worker.models.config import refusal, required_keys
from backend_worker.models.disentangled import (
    Disentangled,
    DisentangledAttention,
    RelativeEmbeddings,
    RelativeSettings,
)
from backend_worker.models.registry import register
from shared.errors import ConfigError

FAMILY = "DeBERTa-v2"

WEIGHT_MAP = WeightMap(
    rules=(
        Rule("embeddings.word_embeddings.weight", "embeddings.word.weight"),
        Rule("embeddings.position_embeddings.weight", "embeddings.position.weight"),
        Rule("embeddings.token_type_embeddings.weight", "embeddings.token_type.weight"),
        Rule("embeddings.embed_proj.weight", "embeddings.project.weight"),
        Rule("embeddings.LayerNorm.{w}", "embeddings.norm.{w}"),
        Rule("encoder.rel_embeddings.weight", "relative.table.weight"),
        Rule("encoder.LayerNorm.{w}", "relative.norm.{w}"),
        Rule("encoder.layer.{i}.attention.self.{part}.{w}", "layers.{i}.attention.qkv.{w}",
             fuse=("query_proj", "key_proj", "value_proj")),
        Rule("encoder.layer.{i}.attention.self.pos_key_proj.{w}",
             "layers.{i}.attention.pos_key.{w}"),
        Rule("encoder.layer.{i}.attention.self.pos_query_proj.{w}",
             "layers.{i}.attention.pos_query.{w}"),
        Rule("encoder.layer.{i}.attention.output.dense.{w}", "layers.{i}.attention.out.{w}"),
        Rule("encoder.layer.{i}.attention.output.LayerNorm.{w}", "layers.{i}.attention_norm.{w}"),
        Rule("encoder.layer.{i}.intermediate.dense.{w}", "layers.{i}.mlp.up.{w}"),
        Rule("encoder.layer.{i}.output.dense.{w}", "layers.{i}.mlp.down.{w}"),
        Rule("encoder.layer.{i}.output.LayerNorm.{w}", "layers.{i}.mlp_norm.{w}"),
    ),
    # DebertaV2For* checkpoints nest the encoder in "deberta.".
    prefixes=("deberta.",),
    ignore=(
        r"embeddings\.position_ids",  # a buffer older transformers saved
        # Heads: the classifier's (pooler + classifier) is loaded by backend_worker/heads.py
        # when served; the MLM heads (legacy cls.*, lm_predictions.*) never are, nor the
        # replaced token detection head microsoft/deberta-v3-* ship (transformers drops it:
        # DebertaV2ForMaskedLM by name, the other classes as unused keys).
        r"pooler\..*",
        r"classifier\..*",
        r"cls\..*",
        r"lm_predictions\..*",
        r"mask_predictions\..*",
        r"qa_outputs\..*",  # DebertaV2ForQuestionAnswering: its encoder is served
    ),
)


class ContextPoolerHead(ClassifierHead):
    """DebertaV2ForSequenceClassification: classifier(act(pooler.dense(h[CLS]))), act the
    config's pooler_hidden_act (BERT's head and names, another activation)."""


def _classifier(config: dict[str, Any], hidden: int, labels: int) -> nn.Module:
    return ContextPoolerHead(hidden, labels, str(config.get("pooler_hidden_act", "gelu")))


# The checkpoint names are BERT's (pooler.dense, classifier); only the activation differs.
HEADS = FamilyHeads(encoder=WEIGHT_MAP, classifier=BERT_CLASSIFIER_KEYS,
                    make_classifier=_classifier)


class DebertaV2Layer(nn.Module):
    def __init__(self, hidden: int, eps: float, attention: DisentangledAttention,
                 intermediate: int, act: str) -> None:
        super().__init__()
        self.attention = attention
        self.attention_norm = nn.LayerNorm(hidden, eps=eps)
        self.mlp = MLP(hidden, intermediate, act)
        self.mlp_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, meta: Any) -> torch.Tensor:
        x = self.attention_norm(x + self.attention(x, meta))
        return self.mlp_norm(x + self.mlp(x))


class DebertaV2Embeddings(nn.Module):
    def __init__(self, vocab: int, size: int, hidden: int, positions: int | None, types: int,
                 eps: float) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, size)
        self.position = nn.Embedding(positions, size) if positions is not None else None
        self.token_type = nn.Embedding(types, size) if types > 0 else None
        self.project = nn.Linear(size, hidden, bias=False) if size != hidden else None
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        x = self.word(input_ids)
        if self.position is not None:
            x = x + self.position(position_ids)
        if self.token_type is not None:
            x = x + self.token_type(token_type_ids)
        if self.project is not None:
            x = self.project(x)
        return self.norm(x)


def _terms(config: dict[str, Any]) -> frozenset[str]:
    """pos_att_type as DebertaV2Config reads it: "p2c|c2p" (lower-cased) or a list."""
    value = config.get("pos_att_type") or []
    if isinstance(value, str):
        value = [part.strip() for part in value.lower().split("|")]
    unknown = sorted(set(value) - {"c2p", "p2c"})
    if unknown:
        raise refusal(FAMILY, f"pos_att_type {unknown}")
    return frozenset(value)


@register(model_types=("deberta-v2",))
class DebertaV2Model(nn.Module):
    """DebertaV2Model's last hidden state, flat."""

    # Per instance: without absolute positions, a saved position table is dropped (__init__).
    weight_map: WeightMap = WEIGHT_MAP
    heads: ClassVar[FamilyHeads | None] = HEADS

    def __init__(
        self, *, vocab_size: int, hidden_size: int, embedding_size: int, num_hidden_layers: int,
        num_attention_heads: int, head_dim: int, intermediate_size: int,
        max_position_embeddings: int, position_biased_input: bool, type_vocab_size: int,
        hidden_act: str, layer_norm_eps: float, relative: RelativeSettings,
        terms: frozenset[str], attention: Attention,
    ) -> None:
        super().__init__()
        self.max_positions = max_position_embeddings
        if not position_biased_input:
            # transformers drops a saved position table it does not use (older conversions
            # saved one): so do we, where the model has none.
            table = "embeddings.position_embeddings.weight"
            self.weight_map = replace(
                WEIGHT_MAP, rules=tuple(r for r in WEIGHT_MAP.rules if r.source != table),
                ignore=(*WEIGHT_MAP.ignore, re.escape(table)))
        self.embeddings = DebertaV2Embeddings(
            vocab_size, embedding_size, hidden_size,
            max_position_embeddings if position_biased_input else None, type_vocab_size,
            layer_norm_eps)
        own = relative.attention and not relative.share_att_key
        layers = [
            DebertaV2Layer(
                hidden_size, layer_norm_eps,
                DisentangledAttention(hidden_size, num_attention_heads, head_dim, attention,
                                      pos_key=own and "c2p" in terms,
                                      pos_query=own and "p2c" in terms),
                intermediate_size, hidden_act)
            for _ in range(num_hidden_layers)
        ]
        self.layers = nn.ModuleList(layers)
        # transformers divides by sqrt(head_dim * (1 + terms)) even without relative attention.
        scale = 1.0 / math.sqrt(head_dim * (1 + len(terms)))
        # (Without relative attention transformers still builds the table's LayerNorm, unused,
        # and saves it: kept here so that the checkpoint loads strictly.)
        self.relative = RelativeEmbeddings(relative.span if relative.attention else None,
                                           hidden_size, relative.norm, layer_norm_eps)
        for layer in layers:
            content = None
            if relative.attention and terms:
                content = Disentangled(layer.attention, self.relative, relative.span,
                                       relative.buckets, relative.max_position, terms, scale)
            layer.attention.mask = MaskSpec(scale=scale, content=content)

    @classmethod
    def from_config(cls, config: dict[str, Any], attention: Attention) -> Self:
        if int(config.get("conv_kernel_size") or 0) > 0:
            raise refusal(FAMILY, f"conv_kernel_size {config['conv_kernel_size']!r} (the "
                          "convolution of deberta-v2-xlarge)")
        hidden_act = str(config.get("hidden_act", "gelu"))
        activation(hidden_act, where="config.json: hidden_act")
        activation(str(config.get("pooler_hidden_act", "gelu")),
                   where="config.json: pooler_hidden_act")
        terms = _terms(config)
        with required_keys(FAMILY):
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            positions = int(config.get("max_position_embeddings", 512))
            if hidden % heads:
                raise ConfigError(f"hidden size {hidden} is not divisible by {heads} heads")
            head_size = config.get("attention_head_size")
            if head_size is not None and head_size != hidden // heads:
                # transformers' output projection takes hidden_size: it cannot run it either.
                raise refusal(FAMILY, f"attention_head_size {head_size!r} (hidden_size / "
                              f"num_attention_heads is {hidden // heads})")
            max_relative = int(config.get("max_relative_positions", -1))
            if max_relative < 1:
                max_relative = positions
            buckets = int(config.get("position_buckets", -1))
            norms = [x.strip() for x in str(config.get("norm_rel_ebd", "none")).lower().split("|")]
            relative = RelativeSettings(
                attention=bool(config.get("relative_attention", False)),
                span=buckets if buckets > 0 else max_relative,
                buckets=buckets, max_position=max_relative,
                share_att_key=bool(config.get("share_att_key", False)),
                norm="layer_norm" in norms,
            )
            return cls(
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                embedding_size=int(config.get("embedding_size") or hidden),
                num_hidden_layers=int(config["num_hidden_layers"]),
                num_attention_heads=heads,
                head_dim=hidden // heads,
                intermediate_size=int(config["intermediate_size"]),
                max_position_embeddings=positions,
                position_biased_input=bool(config.get("position_biased_input", True)),
                type_vocab_size=int(config.get("type_vocab_size", 0)),
                hidden_act=hidden_act,
                layer_norm_eps=float(config.get("layer_norm_eps", 1e-7)),
                relative=relative,
                terms=terms,
                attention=attention,
            )

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor,
        meta: Any,
    ) -> torch.Tensor:
        x = self.embeddings(input_ids, position_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, meta)
        return x
