"""DeBERTa's disentangled attention (backend_worker/models/deberta_v2.py builds the model).

Attention scores add, to q_i . k_j, a content-to-position term q_i . pk[d(i, j)] ("c2p") and a
position-to-content term k_j . pq[d(i, j)] ("p2c"): pk / pq are the layer's key / query
projections of one relative table shared by all layers, d(i, j) the clamped index of i - j,
log-bucketed past `position_buckets` / 2 (v3) or as it is (v2). The terms depend on q and k, so
they are a `ContentBias` of the attention's MaskSpec.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from backend_worker.attention import Attention, MaskSpec


@functools.cache
def _log_span(buckets: int, max_position: int) -> float:
    """log((max_position - 1) / (buckets / 2)) rounded as float32, as transformers computes it;
    a Python number, so that no tensor is made from host data inside a CUDA graph capture (the
    warm-up before it fills this cache)."""
    return float(torch.log(torch.tensor((max_position - 1) / (buckets // 2))))


def log_buckets(relative: torch.Tensor, buckets: int, max_position: int) -> torch.Tensor:
    """transformers' make_log_bucket_position: distances within buckets / 2 as they are, farther
    ones on a log scale up to max_position, signed; int64. The same float32 operations in the
    same order, so that the rounding up lands on the same integer."""
    mid = buckets // 2
    sign = torch.sign(relative)
    near = (relative < mid) & (relative > -mid)
    magnitude = torch.where(near, torch.full_like(relative, mid - 1), relative.abs())
    scale = _log_span(buckets, max_position)
    far = torch.ceil(torch.log(magnitude / mid) / scale * (mid - 1)) + mid
    return torch.where(magnitude <= mid, relative.to(far.dtype), far * sign).to(torch.int64)


@dataclass(frozen=True)
class RelativeSettings:
    """The config's relative attention settings, as DebertaV2Config reads them."""

    attention: bool  # relative_attention: the c2p / p2c terms are added at all
    span: int  # distances d(i, j) are clamped to [-span, span): position_buckets, else below
    buckets: int  # position_buckets (<= 0: distances as they are, no log buckets)
    max_position: int  # max_relative_positions (< 1 in the config: max_position_embeddings)
    share_att_key: bool  # position projections are the layer's own q / k projections
    norm: bool  # norm_rel_ebd has layer_norm: the relative table is LayerNorm-ed


class RelativeEmbeddings(nn.Module):
    """The encoder's table of 2 * span relative embeddings (none without relative attention),
    LayerNorm-ed when the config says."""

    def __init__(self, span: int | None, hidden: int, norm: bool, eps: float) -> None:
        super().__init__()
        self.table = nn.Embedding(2 * span, hidden) if span is not None else None
        self.norm = nn.LayerNorm(hidden, eps=eps) if norm else None

    def forward(self) -> torch.Tensor:
        assert self.table is not None, "no relative attention"
        table = self.table.weight
        return table if self.norm is None else self.norm(table)


class Disentangled:
    """One layer's c2p / p2c terms, called as a `ContentBias`.

    A plain object, not a module: it reaches the layer's projections and the shared relative
    table without registering them twice in the state dict.
    """

    def __init__(self, attention: DisentangledAttention, relative: RelativeEmbeddings,
                 span: int, buckets: int, max_position: int, terms: frozenset[str],
                 scale: float) -> None:
        self.attention, self.relative = attention, relative
        self.span, self.buckets, self.max_position = span, buckets, max_position
        self.terms, self.scale = terms, scale
        # (device, dtype) -> (pk, pq), each [heads, 2 * span, head_dim] or None: they depend on
        # the weights only, and projecting the table costs as much as a 512-token forward of
        # the layer's two projections.
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[Any, Any]] = {}

    def tables(self, device: torch.device,
               dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        key = (device, dtype)
        if key not in self._tables:
            with torch.inference_mode():
                self._tables[key] = self.attention.project_positions(self.relative(), self.terms)
        return self._tables[key]

    def index(self, first: int, rows: int, length: int, device: torch.device) -> torch.Tensor:
        """d(i, j) for queries first .. first + rows - 1 and keys 0 .. length - 1: [rows, L]."""
        # One value per distinct i - j, then a lookup: the log is taken rows + L times, not
        # rows * L times.
        low = first - (length - 1)
        distances = torch.arange(low, first + rows, device=device)
        if self.buckets > 0:
            distances = log_buckets(distances, self.buckets, self.max_position)
        per_distance = torch.clamp(distances + self.span, 0, 2 * self.span - 1)
        queries = torch.arange(first, first + rows, device=device)
        keys = torch.arange(length, device=device)
        return per_distance[queries[:, None] - keys[None, :] - low]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, first: int) -> torch.Tensor:
        batch, heads, rows, _ = q.shape
        length = k.shape[2]
        pk, pq = self.tables(q.device, q.dtype)
        index = self.index(first, rows, length, q.device)
        score = torch.zeros(batch, heads, rows, length, device=q.device, dtype=torch.float32)
        if pk is not None:  # c2p[i, j] = q_i . pk[d(i, j)]
            by_query = q @ pk.transpose(-1, -2)  # [B, heads, R, 2 * span]
            score += by_query.gather(-1, index.expand(batch, heads, rows, length)).float()
        if pq is not None:  # p2c[i, j] = k_j . pq[d(i, j)] (d is odd: transformers' -d(j, i))
            by_key = k @ pq.transpose(-1, -2)  # [B, heads, L, 2 * span]
            along_keys = index.t().expand(batch, heads, length, rows)
            score += by_key.gather(-1, along_keys).transpose(-1, -2).float()
        return score * self.scale


class DisentangledAttention(nn.Module):
    """Self-attention with fused q/k/v and, with relative attention, the c2p / p2c terms."""

    def __init__(self, hidden: int, heads: int, head_dim: int, attention: Attention, *,
                 pos_key: bool, pos_query: bool) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        width = heads * head_dim
        self.qkv = nn.Linear(hidden, 3 * width)
        self.fused_rows = {"qkv": (width, width, width)}
        self.out = nn.Linear(width, hidden)
        # Own position projections (share_att_key false); with shared keys the table goes
        # through the layer's own query / key projections.
        self.pos_key = nn.Linear(hidden, width) if pos_key else None
        self.pos_query = nn.Linear(hidden, width) if pos_query else None
        self.attention = attention
        self.mask = MaskSpec()

    def project_positions(self, table: torch.Tensor, terms: frozenset[str]
                          ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The relative table through the key (c2p) and query (p2c) projections, per head."""
        def per_head(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(-1, self.heads, self.head_dim).transpose(0, 1).contiguous()

        # Through the modules, not their weights: on CPU the engine swaps nn.Linear for a
        # packed one without a plain weight. (Once per device and dtype: v's third is waste.)
        shared = self.qkv(table).view(-1, 3, self.heads * self.head_dim).unbind(1)
        pk = pq = None
        if "c2p" in terms:
            pk = per_head(self.pos_key(table) if self.pos_key is not None else shared[1])
        if "p2c" in terms:
            pq = per_head(self.pos_query(table) if self.pos_query is not None else shared[0])
        return pk, pq

    def forward(self, x: torch.Tensor, meta: Any) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv(x).view(tokens, 3, self.heads, self.head_dim).unbind(1)
        out = self.attention.attend(q, k, v, meta, self.mask)
        return self.out(out.reshape(tokens, self.heads * self.head_dim))
