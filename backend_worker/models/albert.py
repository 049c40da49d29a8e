"""ALBERT (model_type "albert"): BERT's post-norm layers, shared across depth, behind narrow
embeddings.

- The embeddings (word + position + token type, then LayerNorm) are `embedding_size` wide and
  always projected to the hidden size (`embedding_hidden_mapping_in`).
- `num_hidden_groups` groups of `inner_group_num` layers hold every weight: step i of the
  `num_hidden_layers` runs all the layers of group int(i / (layers / groups)), as transformers
  computes it. (The usual checkpoint has one group of one layer: a single layer run 12 times.)
- Checkpoints nest the encoder in "albert."; the classifier (AlbertForSequenceClassification)
  is BERT's: classifier(tanh(pooler(h[CLS]))). The pre-training, MLM, token-classification,
  question-answering and multiple-choice heads are dropped, as sentence-transformers drops them
  (no SPLADE: TEI does not serve ALBERT at all).
"""

from __future__ import annotations

from typing import Any, ClassVar, Self, cast

import torch
from torch import nn

from backend_worker.attention import Attention
from backend_worker.head_modules import FamilyHeads, HeadKeys
from backend_worker.layers import FactorizedEmbeddings, activation
from backend_worker.loading import Rule, WeightMap
from backend_worker.models.bert import EMBEDDING_RULES, TF_LAYER_NORM_NAMES, BertLayer
from backend_worker.models.config import refusal, required_keys
from backend_worker.models.registry import register

_LAYER = "encoder.albert_layer_groups.{g}.albert_layers.{j}."
_OURS = "groups.{g}.{j}."
WEIGHT_MAP = WeightMap(
    rules=(
        *EMBEDDING_RULES,
        Rule("encoder.embedding_hidden_mapping_in.{w}", "embeddings.project.{w}"),
        Rule(_LAYER + "attention.{part}.{w}", _OURS + "attention.qkv.{w}",
             fuse=("query", "key", "value")),
        Rule(_LAYER + "attention.dense.{w}", _OURS + "attention.out.{w}"),
        Rule(_LAYER + "attention.LayerNorm.{w}", _OURS + "attention_norm.{w}"),
        Rule(_LAYER + "ffn.{w}", _OURS + "mlp.up.{w}"),
        Rule(_LAYER + "ffn_output.{w}", _OURS + "mlp.down.{w}"),
        Rule(_LAYER + "full_layer_layer_norm.{w}", _OURS + "mlp_norm.{w}"),
    ),
    prefixes=("albert.",),
    normalize=TF_LAYER_NORM_NAMES,
    ignore=(
        r"embeddings\.position_ids",  # a buffer older transformers saved
        # Heads: backend_worker/heads.py loads pooler + classifier when the model serves them.
        r"pooler\..*",
        r"classifier\..*",
        # AlbertForPreTraining / AlbertForMaskedLM / AlbertForQuestionAnswering heads.
        r"predictions\..*",
        r"sop_classifier\..*",
        r"qa_outputs\..*",
    ),
)

HEADS = FamilyHeads(
    encoder=WEIGHT_MAP,
    classifier=HeadKeys(
        rules=(Rule("pooler.{w}", "pooler.{w}"), Rule("classifier.{w}", "classifier.{w}")),
        owns=(r"pooler\.", r"classifier\."),
    ),
)


@register(model_types=("albert",))
class AlbertModel(nn.Module):
    """AlbertModel's last hidden state, flat."""

    weight_map: ClassVar[WeightMap] = WEIGHT_MAP
    heads: ClassVar[FamilyHeads | None] = HEADS

    def __init__(
        self, *, vocab_size: int, embedding_size: int, hidden_size: int, num_hidden_layers: int,
        num_hidden_groups: int, inner_group_num: int, num_attention_heads: int,
        intermediate_size: int, max_position_embeddings: int, type_vocab_size: int,
        hidden_act: str, layer_norm_eps: float, attention: Attention,
    ) -> None:
        super().__init__()
        self.max_positions = max_position_embeddings
        # Always projected, even when embedding_size equals hidden_size (as transformers).
        self.embeddings = FactorizedEmbeddings(vocab_size, max_position_embeddings,
                                               type_vocab_size, embedding_size, hidden_size,
                                               layer_norm_eps, always_project=True)
        self.groups = nn.ModuleList(
            nn.ModuleList(
                BertLayer(hidden_size, num_attention_heads, intermediate_size, hidden_act,
                          layer_norm_eps, attention)
                for _ in range(inner_group_num)
            )
            for _ in range(num_hidden_groups)
        )
        self.schedule = [int(i / (num_hidden_layers / num_hidden_groups))
                         for i in range(num_hidden_layers)]

    @classmethod
    def from_config(cls, config: dict[str, Any], attention: Attention) -> Self:
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise refusal("ALBERT", f"position_embedding_type={position_type!r}")
        hidden_act = str(config.get("hidden_act", "gelu_new"))
        activation(hidden_act, where="config.json: hidden_act")  # fail with the setting's name
        with required_keys("ALBERT"):
            layers = int(config["num_hidden_layers"])
            groups = int(config.get("num_hidden_groups", 1))
            # More groups than layers is allowed, as transformers allows it: the schedule then
            # skips some (their weights are loaded, strictly, and never used).
            if groups < 1:
                raise refusal("ALBERT", f"num_hidden_groups={groups} for {layers} layers")
            return cls(
                vocab_size=int(config["vocab_size"]),
                embedding_size=int(config.get("embedding_size", 128)),
                hidden_size=int(config["hidden_size"]),
                num_hidden_layers=layers,
                num_hidden_groups=groups,
                inner_group_num=int(config.get("inner_group_num", 1)),
                num_attention_heads=int(config["num_attention_heads"]),
                intermediate_size=int(config["intermediate_size"]),
                max_position_embeddings=int(config.get("max_position_embeddings", 512)),
                type_vocab_size=int(config.get("type_vocab_size", 2)),
                hidden_act=hidden_act,
                layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
                attention=attention,
            )

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor,
        meta: Any,
    ) -> torch.Tensor:
        x = self.embeddings(input_ids, position_ids, token_type_ids)
        for group in self.schedule:
            for layer in cast(nn.ModuleList, self.groups[group]):
                x = layer(x, meta)
        return x
