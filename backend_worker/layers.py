"""Layers shared by the model families, all on flat [T, features] tensors.

Activations are looked up by the names checkpoints use (config.json `hidden_act`, or our names
for sentence-transformers Dense modules), so a family never spells out an if/elif over them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from backend_worker.attention import BIDIRECTIONAL, Attention, MaskSpec
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


class WordPositionEmbeddings(nn.Module):
    """norm(word + absolute position embeddings): BERT's embeddings without token types
    (DistilBERT, MPNet). Position ids index the table as given (any family offset is in them)."""

    def __init__(self, vocab: int, positions: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(positions, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.word(input_ids) + self.position(position_ids))


class WordTypeEmbeddings(nn.Module):
    """norm(word + token type embeddings): the embeddings of encoders whose positions live in
    attention instead of a table (rotary: NomicBERT, GTE; ALiBi: JinaBERT). `types` 0: the
    model has no token type table and token type ids are ignored."""

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


class FactorizedEmbeddings(nn.Module):
    """BERT's embeddings (its parameter names) at `width`, then a projection to `hidden`: always
    (ALBERT's embedding_hidden_mapping_in), or where the two differ (`always_project` False:
    ELECTRA's embeddings_project)."""

    def __init__(self, vocab: int, positions: int, types: int, width: int, hidden: int,
                 eps: float, *, always_project: bool) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, width)
        self.position = nn.Embedding(positions, width)
        self.token_type = nn.Embedding(types, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        projected = always_project or width != hidden
        self.project = nn.Linear(width, hidden) if projected else None

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(position_ids)
        x = self.norm(x)
        return x if self.project is None else self.project(x)


class MLP(nn.Module):
    """up -> activation -> down (BERT's intermediate/output pair, without the residual)."""

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = True,
                 down_bias: bool | None = None) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, intermediate, bias=bias)
        self.act = activation(act)
        self.down = nn.Linear(intermediate, hidden, bias=bias if down_bias is None else down_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU, GeGLU and friends, with gate and up fused.

    `gate_up` is [2 * intermediate, hidden], the activated half first: checkpoints that store
    the two separately fuse them at load (Rule(..., fuse=(gate_name, up_name))), and those that
    store them fused (ModernBERT's Wi, input half first) load as they are. `gate_first=False`
    is for fused checkpoints that store the other half first (GTE's up_gate_proj).
    """

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = False,
                 down_bias: bool | None = None, gate_first: bool = True) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_first = gate_first
        self.gate_up = nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.fused_rows = {"gate_up": (intermediate, intermediate)}  # checked at load
        self.act = activation(act)
        self.down = nn.Linear(intermediate, hidden, bias=bias if down_bias is None else down_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.gate_up(x).split(self.intermediate, dim=-1)
        gate, up = (first, second) if self.gate_first else (second, first)
        return self.down(self.act(gate) * up)


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + weight), computed in float32 like the reference implementations.

    Llama, Qwen and Mistral store the scale itself (offset 0); Gemma stores scale - 1 (offset 1).
    """

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            # Gemma multiplies in float32, then casts.
            return (x32 * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    """The standard rotary frequencies 1 / base^(2i / d), float32 [rotary_dim / 2].

    Always on the CPU: models call this while being built under torch.device("meta"), where a
    tensor made without an explicit device would hold no values (Rotary moves it per device).
    """
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu")
    exponents = exponents.to(torch.float32) / rotary_dim
    return 1.0 / (base**exponents)


class Rotary:
    """Rotary position embedding in the rotate-half convention (GPT-NeoX, Llama, BERT-style
    rotary encoders), over the first `rotary_dim` features of each head.

    Not an nn.Module and without buffers: models are built on the meta device and filled by
    strict loading, which would leave a cached table uninitialised. `tables(position_ids)` is
    computed once per batch (float32, like the references) and shared by every layer.
    """

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> None:
        self.inv_freq = inv_freq.to(torch.float32)
        self.rotary_dim = 2 * inv_freq.shape[0]
        self.attention_scaling = attention_scaling
        self._on: dict[torch.device, torch.Tensor] = {}

    def tables(self, position_ids: torch.Tensor, dtype: torch.dtype) -> RopeTables:
        inv_freq = self._on.get(position_ids.device)
        if inv_freq is None:
            inv_freq = self._on[position_ids.device] = self.inv_freq.to(position_ids.device)
        freqs = position_ids.to(torch.float32)[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, rotary_dim]
        cos = (angles.cos() * self.attention_scaling).to(dtype)
        sin = (angles.sin() * self.attention_scaling).to(dtype)
        return RopeTables(cos, sin)


class RopeTables(NamedTuple):
    cos: torch.Tensor  # [T, 1, rotary_dim]
    sin: torch.Tensor


def apply_rotary(x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
    """x [T, heads, head_dim] rotated on its first rotary_dim features."""
    rotary_dim = rope.cos.shape[-1]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = rot.chunk(2, dim=-1)
    rotated = rot * rope.cos + torch.cat((-second, first), dim=-1) * rope.sin
    return rotated if rest.shape[-1] == 0 else torch.cat((rotated, rest), dim=-1)


NormFactory = Callable[[int], nn.Module]


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection (built at load time).

    One [(heads + 2 * kv_heads) * head_dim, hidden] matmul instead of three reads the
    activations once. Options cover the families of the zoo: grouped-query attention
    (`kv_heads`), a `head_dim` that is not hidden / heads, per-head q/k norms (Qwen3, Gemma 3),
    rotary tables passed in per batch, and a `MaskSpec` (causal, window, position bias, scale).
    Plain BERT-style attention takes the fused `attend_qkv` path, which moves q, k and v in one
    copy. The implementation in `attention` is shared by every layer and was picked at start-up.
    """

    def __init__(
        self, hidden: int, heads: int, attention: Attention, bias: bool = True, *,
        kv_heads: int | None = None, head_dim: int | None = None, out_bias: bool | None = None,
        qk_norm: NormFactory | None = None, mask: MaskSpec = BIDIRECTIONAL,
    ) -> None:
        super().__init__()
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"hidden size {hidden} is not divisible by {heads} heads")
            head_dim = hidden // heads
        kv_heads = heads if kv_heads is None else kv_heads
        if heads % kv_heads:
            raise ConfigError(f"{heads} attention heads are not a multiple of {kv_heads} "
                              "key/value heads")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.qkv = nn.Linear(hidden, (heads + 2 * kv_heads) * head_dim, bias=bias)
        # Rows of the q, k and v slices: the loader checks each checkpoint slice against them.
        self.fused_rows = {"qkv": (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)}
        self.out = nn.Linear(heads * head_dim, hidden, bias=bias if out_bias is None else out_bias)
        self.q_norm = qk_norm(head_dim) if qk_norm else None
        self.k_norm = qk_norm(head_dim) if qk_norm else None
        self.mask = mask
        self._fused = mask == BIDIRECTIONAL and kv_heads == heads and qk_norm is None
        # A plain attribute, not a submodule: it holds no weights and must not be in state_dict.
        self.attention = attention

    def forward(self, x: torch.Tensor, meta: Any, rope: RopeTables | None = None) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.qkv(x)
        if self._fused and rope is None:
            out = self.attention.attend_qkv(qkv.view(tokens, 3, self.heads, self.head_dim), meta)
        else:
            q, k, v = qkv.view(tokens, -1, self.head_dim).split(
                (self.heads, self.kv_heads, self.kv_heads), dim=1
            )
            if self.q_norm is not None and self.k_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = apply_rotary(q, rope), apply_rotary(k, rope)
            out = self.attention.attend(q, k, v, meta, self.mask)
        return self.out(out.reshape(tokens, self.heads * self.head_dim))


class PostNormLayer(nn.Module):
    """BERT's post-norm residual block: x = norm(x + attention(x)); x = norm(x + mlp(x)).

    The families built on it (BERT, DistilBERT, MPNet, JinaBERT, the rotary encoders) choose the
    attention (with its mask and biases) and the MLP (plain or gated); the norms are LayerNorms
    with bias. `rope` is passed to the attention for the rotary encoders, None elsewhere.
    """

    def __init__(self, hidden: int, eps: float, attention: SelfAttention, mlp: nn.Module) -> None:
        super().__init__()
        self.attention = attention
        self.attention_norm = nn.LayerNorm(hidden, eps=eps)
        self.mlp = mlp
        self.mlp_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, meta: Any, rope: RopeTables | None = None) -> torch.Tensor:
        x = self.attention_norm(x + self.attention(x, meta, rope))
        return self.mlp_norm(x + self.mlp(x))
