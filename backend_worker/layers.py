"""Layers shared by the model families, all on flat [T, features] tensors.

Activations are looked up by the names checkpoints use (config.json `hidden_act`, or our names
for sentence-transformers Dense modules), so a family never spells out an if/elif over them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from backend_worker.attention import Attention
from shared.errors import ConfigError

# Name -> module factory. transformers' "gelu" is the exact erf form; "gelu_new" and
# "gelu_pytorch_tanh" are the tanh approximation (numerically the same formula). Mixing the two
# up costs ~1e-3 per layer: enough to fail parity, small enough to look plausible.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


def activation(name: str, where: str = "activation") -> nn.Module:
    """The activation module for a config name; ConfigError for one we do not implement.

    `where` names the setting in the message (e.g. "config.json: hidden_act").
    """
    factory = ACTIVATIONS.get(name)
    if factory is None:
        raise ConfigError(
            f"{where} {name!r} is not supported (supported: {', '.join(sorted(ACTIVATIONS))})"
        )
    return factory()


class MLP(nn.Module):
    """up -> activation -> down (BERT's intermediate/output pair, without the residual)."""

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = True) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, intermediate, bias=bias)
        self.act = activation(act)
        self.down = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection (built at load time).

    One [3 * hidden, hidden] matmul instead of three reads the activations once; the
    implementation in `attention` is shared by every layer and was picked at start-up.
    """

    def __init__(self, hidden: int, heads: int, attention: Attention, bias: bool = True) -> None:
        super().__init__()
        if hidden % heads:
            raise ConfigError(f"hidden size {hidden} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=bias)
        self.out = nn.Linear(hidden, hidden, bias=bias)
        # A plain attribute, not a submodule: it holds no weights and must not be in state_dict.
        self.attention = attention

    def forward(self, x: torch.Tensor, meta: Any) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.qkv(x).view(tokens, 3, self.heads, self.head_dim)
        out = self.attention.attend_qkv(qkv, meta)
        return self.out(out.reshape(tokens, self.heads * self.head_dim))
