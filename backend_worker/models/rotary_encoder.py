"""BERT-shaped encoders with rotary positions instead of a position table: the body that
NomicBERT (nomic_bert.py) and GTE (gte.py) share.

Embeddings are word (+ token type) -> LayerNorm; every layer is post-norm,
x = norm(x + attention(x, rope)); x = norm(x + mlp(x)), with a fused QKV projection and a gated
or plain MLP (or, in some layers, a mixture of experts: backend_worker/experts.py). The families
differ in config spelling, checkpoint names, biases, MLP layout and rotary frequencies: each
family file turns its config.json into an `EncoderSpec` and owns its `WeightMap`; this module
owns the computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from backend_worker.attention import Attention
from backend_worker.experts import MixtureOfExperts
from backend_worker.head_modules import FamilyHeads
from backend_worker.layers import (
    MLP,
    GatedMLP,
    PostNormLayer,
    Rotary,
    SelfAttention,
    WordTypeEmbeddings,
)
from backend_worker.loading import WeightMap


@dataclass(frozen=True)
class ExpertsSpec:
    """Mixture-of-experts MLPs in the layers whose index is 1 modulo `every` (1, 1 + every, ...:
    nomic-ai's placement, so none when `every` is 1), each sending a token to `top_k` of `count`
    experts."""

    every: int
    count: int
    top_k: int

    def in_layer(self, index: int) -> bool:
        return index % self.every == 1


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
    experts: ExpertsSpec | None = None  # where set, experts (plain MLPs of `act`) replace the MLP


def _layer(spec: EncoderSpec, attention: Attention, index: int) -> PostNormLayer:
    """One post-norm layer; rotary reaches its attention through PostNormLayer's `rope`."""
    hidden = spec.hidden_size
    mlp: nn.Module
    if spec.experts is not None and spec.experts.in_layer(index):
        mlp = MixtureOfExperts(hidden, spec.intermediate_size, spec.experts.count,
                               spec.experts.top_k, spec.act)
    elif spec.gated:
        mlp = GatedMLP(hidden, spec.intermediate_size, spec.act, spec.up_bias,
                       down_bias=spec.down_bias, gate_first=spec.gate_first)
    else:
        mlp = MLP(hidden, spec.intermediate_size, spec.act, spec.up_bias,
                  down_bias=spec.down_bias)
    return PostNormLayer(
        hidden, spec.eps,
        SelfAttention(hidden, spec.num_heads, attention, spec.qkv_bias, head_dim=spec.head_dim,
                      out_bias=spec.out_bias),
        mlp,
    )


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
        self.embeddings = WordTypeEmbeddings(spec.vocab_size, spec.type_vocab_size,
                                             spec.hidden_size, spec.eps)
        self.layers = nn.ModuleList(_layer(spec, attention, i) for i in range(spec.num_layers))

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor,
        meta: Any,
    ) -> torch.Tensor:
        x = self.embeddings(input_ids, token_type_ids)
        rope = self.rotary.tables(position_ids, x.dtype)  # once per batch, shared by the layers
        for layer in self.layers:
            x = layer(x, meta, rope)
        return x
