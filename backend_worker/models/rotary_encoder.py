"""BERT-shaped encoders with rotary positions instead of a position table: the body that
NomicBERT (nomic_bert.py) and GTE (gte.py) share.

Embeddings are word (+ token type) -> LayerNorm; every layer is post-norm,
x = norm(x + attention(x, rope)); x = norm(x + mlp(x)), with a fused QKV projection and a gated
or plain MLP. The families differ in config spelling, checkpoint names, biases, MLP layout and
rotary frequencies: each family file turns its config.json into an `EncoderSpec` and owns its
`WeightMap`; this module owns the computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from backend_worker.attention import Attention
from backend_worker.head_modules import FamilyHeads
from backend_worker.layers import MLP, GatedMLP, RopeTables, Rotary, SelfAttention
from backend_worker.loading import WeightMap


@dataclass(frozen=True, eq=False)
class EncoderSpec:
    """Everything the module needs, decided from config.json by the family."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    # Largest position id + 1 the model is served with (the router truncates below it).
    max_positions: int
    type_vocab_size: int  # 0: the model has no token type embeddings
    eps: float
    # float32 [rotary_dim / 2] on the CPU; rotary_dim may be less than head_dim.
    inv_freq: torch.Tensor
    act: str
    gated: bool
    # For gated MLPs: whether the activated half comes first in the fused gate_up weight.
    gate_first: bool = True
    qkv_bias: bool = False
    out_bias: bool = False
    up_bias: bool = False  # gate_up of a gated MLP, up of a plain one
    down_bias: bool = False


class RotaryEmbeddings(nn.Module):
    def __init__(self, vocab: int, types: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, hidden)
        self.token_type = nn.Embedding(types, hidden) if types > 0 else None
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        x = self.word(input_ids)
        if self.token_type is not None:
            x = x + self.token_type(token_type_ids)
        return self.norm(x)


class RotaryLayer(nn.Module):
    """Post-norm: x = norm(x + attention(x)); x = norm(x + mlp(x))."""

    def __init__(self, spec: EncoderSpec, attention: Attention) -> None:
        super().__init__()
        hidden = spec.hidden_size
        self.attention = SelfAttention(hidden, spec.num_heads, attention, spec.qkv_bias,
                                       head_dim=spec.head_dim, out_bias=spec.out_bias)
        self.attention_norm = nn.LayerNorm(hidden, eps=spec.eps)
        self.mlp: nn.Module
        if spec.gated:
            self.mlp = GatedMLP(hidden, spec.intermediate_size, spec.act, spec.up_bias,
                                down_bias=spec.down_bias, gate_first=spec.gate_first)
        else:
            self.mlp = MLP(hidden, spec.intermediate_size, spec.act, spec.up_bias,
                           down_bias=spec.down_bias)
        self.mlp_norm = nn.LayerNorm(hidden, eps=spec.eps)

    def forward(self, x: torch.Tensor, meta: Any, rope: RopeTables) -> torch.Tensor:
        x = self.attention_norm(x + self.attention(x, meta, rope))
        return self.mlp_norm(x + self.mlp(x))


class RotaryEncoder(nn.Module):
    """Last hidden state, flat [T, hidden]. Families subclass it to register their model types
    with their own `weight_map`, `heads` and a `from_config` that builds the EncoderSpec."""

    weight_map: ClassVar[WeightMap]
    heads: ClassVar[FamilyHeads | None] = None

    def __init__(self, spec: EncoderSpec, attention: Attention) -> None:
        super().__init__()
        self.max_positions = spec.max_positions
        # A plain attribute, not a buffer: strict loading fills only checkpoint tensors, and
        # the model is built on the meta device (see layers.Rotary).
        self.rotary = Rotary(spec.inv_freq)
        self.embeddings = RotaryEmbeddings(spec.vocab_size, spec.type_vocab_size,
                                           spec.hidden_size, spec.eps)
        self.layers = nn.ModuleList(RotaryLayer(spec, attention) for _ in range(spec.num_layers))

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor,
        meta: Any,
    ) -> torch.Tensor:
        x = self.embeddings(input_ids, token_type_ids)
        rope = self.rotary.tables(position_ids, x.dtype)  # once per batch, shared by the layers
        for layer in self.layers:
            x = layer(x, meta, rope)
        return x
