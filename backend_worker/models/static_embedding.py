"""sentence-transformers' StaticEmbedding (model_type "static_embedding", a name of ours: the
config is made by shared/static_embedding.py from the module's safetensors header).

StaticEmbedding is `nn.EmbeddingBag(mode="mean")`: each token id's row, averaged. Here the rows
are the "hidden states" [T, dim], so the engine's mean pooling, then Dense and Normalize, apply
as for any family; nothing attends, and positions and token types are ignored.

model2vec's layout (`embeddings`, with a `mapping` from token id to row and per-token `weights`
in vocabulary-quantized models) is not folded at load as StaticEmbedding.load folds it: each
token's row is `embeddings[mapping[id]] * weights[id]` here, the same float32 product, per
token. The router sends an input without tokens as `vocab_size` (ModelInfo.empty_bag_id): its
row is zeros, so its mean is the empty bag's zeros, as EmbeddingBag gives.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

import torch
from torch import nn

from backend_worker.attention import Attention
from backend_worker.head_modules import FamilyHeads
from backend_worker.loading import Rule, WeightMap
from backend_worker.models.config import required_keys
from backend_worker.models.registry import register
from shared.static_embedding import NO_LENGTH_LIMIT, STATIC_MODEL_TYPE

WEIGHT_MAP = WeightMap(
    rules=(
        Rule("embedding.weight", "table"),  # sentence-transformers' save
        Rule("embeddings", "table"),  # model2vec's
        Rule("mapping", "mapping"),
        Rule("weights", "weights"),
    ),
)


@register(model_types=(STATIC_MODEL_TYPE,))
class StaticEmbeddingModel(nn.Module):
    weight_map: ClassVar[WeightMap] = WEIGHT_MAP
    heads: ClassVar[FamilyHeads | None] = None
    # Positions are ignored: any length the router's batch budget allows.
    max_positions = NO_LENGTH_LIMIT

    def __init__(self, vocab_size: int, table_rows: int, dim: int, has_mapping: bool,
                 has_weights: bool) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.table = nn.Parameter(torch.empty(table_rows, dim))
        # Loaded strictly as persistent buffers (None: not in this checkpoint).
        self.mapping: torch.Tensor | None
        self.weights: torch.Tensor | None
        self.register_buffer(
            "mapping", torch.empty(vocab_size, dtype=torch.int64) if has_mapping else None)
        self.register_buffer("weights", torch.empty(vocab_size) if has_weights else None)

    @classmethod
    def from_config(cls, config: dict[str, Any], attention: Attention) -> Self:
        with required_keys("StaticEmbedding"):
            return cls(int(config["vocab_size"]), int(config["table_rows"]),
                       int(config["hidden_size"]), bool(config["has_mapping"]),
                       bool(config["has_weights"]))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                token_type_ids: torch.Tensor, meta: Any) -> torch.Tensor:
        """Each token's row [T, dim]; the empty bag's id (vocab_size) gives zeros."""
        empty = input_ids >= self.vocab_size
        ids = input_ids.clamp(max=self.vocab_size - 1)
        rows = self.table[self.mapping[ids] if self.mapping is not None else ids]
        if self.weights is not None:
            rows = rows * self.weights[ids].unsqueeze(1)
        return rows.masked_fill(empty.unsqueeze(1), 0.0)
