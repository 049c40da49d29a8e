"""MPNet (model_type "mpnet"): BERT's post-norm layers without token types, plus a relative
position bias added to every layer's attention scores.

- The bias is one [buckets, heads] table shared by all layers: bias[h, i, j] =
  table[bucket(j - i), h] (T5's bidirectional buckets, backend_worker/models/t5.py). It depends
  on positions inside the sequence only, so it is a `PositionBias` of the attention's MaskSpec.
- Absolute positions start at 2 (fairseq's padding_idx + 1, the router adds the offset), and
  transformers fixes that padding index at 1 whatever config.json says, hence the check below.
- TEI serves MPNet as an embedding model only (no classifier, no SPLADE): so do we.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

import torch
from torch import nn

from backend_worker.attention import Attention, MaskSpec
from backend_worker.head_modules import FamilyHeads
from backend_worker.layers import WordPositionEmbeddings, activation
from backend_worker.loading import Rule, WeightMap
from backend_worker.models.bert import BertLayer, bert_sizes
from backend_worker.models.config import required_keys
from backend_worker.models.registry import register
from backend_worker.models.t5 import RelativePositionBias
from shared.errors import ConfigError

WEIGHT_MAP = WeightMap(
    rules=(
        Rule("embeddings.word_embeddings.weight", "embeddings.word.weight"),
        Rule("embeddings.position_embeddings.weight", "embeddings.position.weight"),
        Rule("embeddings.LayerNorm.{w}", "embeddings.norm.{w}"),
        Rule("encoder.relative_attention_bias.weight", "relative_bias.table.weight"),
        Rule("encoder.layer.{i}.attention.attn.{part}.{w}", "layers.{i}.attention.qkv.{w}",
             fuse=("q", "k", "v")),
        Rule("encoder.layer.{i}.attention.attn.o.{w}", "layers.{i}.attention.out.{w}"),
        Rule("encoder.layer.{i}.attention.LayerNorm.{w}", "layers.{i}.attention_norm.{w}"),
        Rule("encoder.layer.{i}.intermediate.dense.{w}", "layers.{i}.mlp.up.{w}"),
        Rule("encoder.layer.{i}.output.dense.{w}", "layers.{i}.mlp.down.{w}"),
        Rule("encoder.layer.{i}.output.LayerNorm.{w}", "layers.{i}.mlp_norm.{w}"),
    ),
    # MPNetFor* checkpoints nest the encoder in "mpnet." (all-mpnet-base-v2 says MPNetForMaskedLM
    # but ships the bare encoder).
    prefixes=("mpnet.",),
    ignore=(
        r"embeddings\.position_ids",  # a buffer older transformers saved
        # Heads we do not serve for MPNet (as TEI): an embedding model drops them.
        r"pooler\..*",
        r"lm_head\..*",
        r"classifier\..*",
        r"qa_outputs\..*",
    ),
)

# transformers computes MPNet's buckets with these, whatever config.json says: its
# relative_attention_num_buckets only sizes the table, which must then be exactly this.
BUCKETS = 32
MAX_DISTANCE = 128
PADDING_IDX = 1


@register(model_types=("mpnet",))
class MPNetModel(nn.Module):
    """MPNetModel's last hidden state, flat. Token types are ignored: the model has none."""

    weight_map: ClassVar[WeightMap] = WEIGHT_MAP
    heads: ClassVar[FamilyHeads | None] = None

    def __init__(
        self, *, vocab_size: int, hidden_size: int, num_hidden_layers: int,
        num_attention_heads: int, intermediate_size: int, max_position_embeddings: int,
        hidden_act: str, layer_norm_eps: float, attention: Attention,
    ) -> None:
        super().__init__()
        self.max_positions = max_position_embeddings
        self.embeddings = WordPositionEmbeddings(
            vocab_size, max_position_embeddings, hidden_size, layer_norm_eps
        )
        # One table for every layer; each layer's spec holds the same module, so the padded
        # attention path builds the biased mask once per batch and shares it.
        self.relative_bias = RelativePositionBias(BUCKETS, num_attention_heads, MAX_DISTANCE)
        mask = MaskSpec(bias=self.relative_bias)
        self.layers = nn.ModuleList(
            BertLayer(hidden_size, num_attention_heads, intermediate_size, hidden_act,
                      layer_norm_eps, attention, mask=mask)
            for _ in range(num_hidden_layers)
        )

    @classmethod
    def from_config(cls, config: dict[str, Any], attention: Attention) -> Self:
        buckets = config.get("relative_attention_num_buckets", BUCKETS)
        if buckets != BUCKETS:
            raise ConfigError(
                f"config.json: MPNet relative_attention_num_buckets {buckets!r} is not supported "
                f"(transformers buckets relative positions into {BUCKETS} whatever the table "
                "size; supported: 32)"
            )
        pad = config.get("pad_token_id", PADDING_IDX)
        if pad != PADDING_IDX:
            raise ConfigError(
                f"config.json: MPNet pad_token_id {pad!r} is not supported (transformers counts "
                f"MPNet positions after padding index {PADDING_IDX} whatever the config says; "
                f"supported: {PADDING_IDX})"
            )
        hidden_act = str(config.get("hidden_act", "gelu"))
        activation(hidden_act, where="config.json: hidden_act")
        with required_keys("MPNet"):
            return cls(**bert_sizes(config), hidden_act=hidden_act, attention=attention)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor,
        meta: Any,
    ) -> torch.Tensor:
        x = self.embeddings(input_ids, position_ids)
        for layer in self.layers:
            x = layer(x, meta)
        return x
