"""What a layer asks of attention: the `Attention` protocol the implementations meet, the
`MaskSpec` a layer fixes when it is built, and the biases it may carry: position biases (ALiBi)
and content biases (DeBERTa's disentangled attention)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from shared.protocol import CostModel


class PositionBias(Protocol):
    """An additive attention bias that depends only on key position - query position inside
    one sequence (ALiBi, MPNet's relative buckets): evaluated on a packed batch's flat indices,
    it gives every sequence its own bias (the block-diagonal path relies on that). It may run
    inside CUDA graph capture: device ops only, constants from host data copied once per
    device (graph warm-up calls it before capture)."""

    def __call__(
        self, length: int, device: torch.device, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """float32 [heads, queries, length]: bias[h, i, j] for query i and key j, queries
        rows[0] <= i < rows[1] (all of them when rows is None)."""
        ...


class ContentBias(Protocol):
    """An additive attention bias that depends on the queries and keys themselves as well as on
    key position - query position (DeBERTa: q_i . pk[d(i, j)] + k_j . pq[d(i, j)]). Unlike a
    `PositionBias` it differs per layer and per batch, so it is computed inside each layer's
    attention, on padded blocks of one length group (or on a captured batch taken as one
    sequence, whose flat positions differ by the in-sequence offsets within a sequence)."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, first: int) -> torch.Tensor:
        """q [B, heads, R, dim] for query positions first .. first + R - 1, k [B, kv_heads, L,
        dim] for key positions 0 .. L - 1 -> float32 [B, heads, R, L], already scaled."""
        ...


@dataclass(frozen=True, slots=True)
class MaskSpec:
    """What a layer's attention looks like beyond "every token sees its whole sequence".

    Query i sees key j when j <= i (if `causal`) and |i - j| <= `window` (if set); `bias` and
    `content` are added to the scores; `scale` replaces 1 / sqrt(head_dim); `softcap` caps the
    scaled scores at +-softcap (softcap * tanh(score / softcap), Gemma 2) before any bias, the
    mask and the softmax. Specs are compared by identity of their biases, so layers sharing one spec
    share its cached masks within a batch (a content bias is never cached: `positional` is the
    part that is).
    """

    causal: bool = False
    window: int | None = None
    bias: PositionBias | None = None
    scale: float | None = None
    content: ContentBias | None = None
    softcap: float | None = None

    @property
    def positional(self) -> MaskSpec:
        """This spec without its content bias: what depends on positions alone."""
        return self if self.content is None else replace(self, content=None)

    def reach(self, distance: torch.Tensor) -> torch.Tensor | None:
        """Which (query, key) pairs `causal` and `window` allow, from distance = query
        position - key position (any shape); None when neither is set."""
        allowed = distance >= 0 if self.causal else None
        if self.window is not None:
            near = distance.abs() <= self.window
            allowed = near if allowed is None else allowed & near
        return allowed


BIDIRECTIONAL = MaskSpec()


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's per-head slopes (Press et al.): 2^(-8/n), 2^(-16/n), ... 2^-8 for n heads, n a
    power of two; otherwise those of the largest power of two below n, followed by every other
    slope of twice that power, as many as are missing (what jina's code computes)."""
    if heads & (heads - 1) == 0:
        return [2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)]
    below = 1 << (heads.bit_length() - 1)
    return alibi_slopes(below) + alibi_slopes(2 * below)[0::2][: heads - below]


@dataclass(frozen=True)
class SymmetricAlibi:
    """bias[h, i, j] = -slope[h] * |i - j| (a `PositionBias`): ALiBi for a bidirectional
    encoder. A frozen value, so every layer's MaskSpec compares equal and shares one mask per
    batch."""

    slopes: tuple[float, ...]
    # The slopes on each device, copied once: a copy from host data on every call would be
    # illegal inside CUDA graph capture (and a needless transfer per batch outside it).
    _on: dict[torch.device, torch.Tensor] = field(
        default_factory=dict, compare=False, hash=False, repr=False)

    def slopes_on(self, device: torch.device) -> torch.Tensor:
        slopes = self._on.get(device)
        if slopes is None:
            slopes = self._on[device] = torch.tensor(self.slopes, dtype=torch.float32,
                                                     device=device)
        return slopes

    def __call__(
        self, length: int, device: torch.device, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        first, last = rows or (0, length)
        keys = torch.arange(length, device=device, dtype=torch.float32)
        queries = torch.arange(first, last, device=device, dtype=torch.float32)
        distance = (keys[None, :] - queries[:, None]).abs()
        return -self.slopes_on(device)[:, None, None] * distance


class Attention(Protocol):
    """What a model needs from an attention implementation."""

    name: str
    cost_model: CostModel

    def prepare(self, cu_seqlens: torch.Tensor, host_cu_seqlens: np.ndarray) -> Any:
        """Per-batch metadata from `cu_seqlens` (int64 [n + 1] on the model's device) and the
        same offsets on the host, so that layout decisions never synchronise with the device."""
        ...

    def attend_qkv(self, qkv: torch.Tensor, meta: Any) -> torch.Tensor:
        """Bidirectional attention of each sequence with itself: [T, 3, heads, dim] (q, k, v
        along dim 1; a strided view is fine) in, [T, heads, dim] out."""
        ...

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Any, mask: MaskSpec
    ) -> torch.Tensor:
        """Attention of each sequence with itself under `mask`: q [T, heads, dim], k and v
        [T, kv_heads, dim] (heads a multiple of kv_heads) in, [T, heads, dim] out."""
        ...


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
         spec: MaskSpec) -> torch.Tensor:
    """Scaled dot-product attention over [B, heads, L, dim] blocks with `spec`'s scale and
    softcap (kv_heads may divide heads); `attn_mask` boolean (True = attend) or additive.

    Without a softcap, torch's fused kernel. With one, the scores are written out as transformers'
    eager Gemma 2 attention writes them (no fused kernel caps scores): scaled, capped, masked,
    softmax in float32, back to the inputs' dtype before the values."""
    gqa = k.shape[1] != q.shape[1]
    if spec.softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=spec.scale,
                                              enable_gqa=gqa)
    if gqa:  # each key/value head serves `groups` query heads in turn (transformers' repeat_kv)
        batch, kv_heads, length, dim = k.shape
        groups = q.shape[1] // kv_heads
        k, v = (x[:, :, None].expand(batch, kv_heads, groups, length, dim)
                .reshape(batch, kv_heads * groups, length, dim) for x in (k, v))
    scale = q.shape[-1] ** -0.5 if spec.scale is None else spec.scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / spec.softcap) * spec.softcap
    if attn_mask is not None:
        scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                  else scores + attn_mask)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)
