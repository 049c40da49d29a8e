"""Attention over a packed batch, with the implementation chosen once per worker.

The models keep every activation flat, [T, hidden] for the T tokens of a batch, so linear layers,
norms and MLPs never touch padding. Only attention needs to know where one sequence ends and the
next begins. An implementation does that in two steps:

  meta = attention.prepare(cu_seqlens, host_cu_seqlens)   # once per batch, shared by every layer
  out  = attention.attend_qkv(qkv, meta)                   # per layer

`qkv` is the fused projection viewed as [T, 3, heads, dim]; `out` is [T, heads, dim]. Taking the
fused tensor lets a padded path move q, k and v in one copy; a packed (varlen) path unbinds it
into three views for free.

`select_attention(device)` picks the implementation from the device type alone: it never asks
torch.cuda anything, so choosing (or importing this module) on a CPU machine initialises nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from shared.errors import ConfigError
from shared.protocol import CostModel


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


@dataclass(frozen=True, slots=True)
class PaddedGroup:
    """Sequences of similar length padded to one rectangle: rows batch * max_len."""

    batch: int
    max_len: int
    # [batch, 1, 1, max_len] boolean, True for real keys (broadcast over heads and queries by
    # SDPA); None when every sequence of the group is exactly max_len long.
    key_mask: torch.Tensor | None


@dataclass(frozen=True, slots=True)
class PaddedMeta:
    """The padded layout of one batch: groups stacked row-wise, and the two index maps."""

    groups: tuple[PaddedGroup, ...]
    # Flat token copied into each padded row (padding rows repeat their sequence's last token).
    pad_index: torch.Tensor
    # Padded row of each flat token, in flat order.
    unpad_index: torch.Tensor


def length_groups(lengths: np.ndarray, ratio: float) -> list[np.ndarray]:
    """Sequence indices split into groups of similar length, longest first.

    Greedy over lengths sorted in descending order: a group closes when the next sequence is
    shorter than `ratio` times the group's longest. Padded attention costs batch * max_len**2
    per group, so one long sequence no longer pads a whole batch of short ones.
    """
    order = np.argsort(-lengths, kind="stable")
    groups: list[np.ndarray] = []
    start = 0
    for i in range(1, len(order) + 1):
        if i == len(order) or lengths[order[i]] < ratio * lengths[order[start]]:
            groups.append(order[start:i])
            start = i
    return groups


class PaddedSDPA:
    """Gather the flat tokens into padded rectangles, run SDPA with a key-padding mask, gather
    back.

    The CPU path. A batch is split into groups of similar length, each padded to its own
    longest sequence (attention cost grows with the square of the padded length, and the router
    does not sort by length). The fused qkv tensor is padded with one index_select for all
    groups and one index_select brings the output back; linear layers and MLPs never see
    padding. Padding rows are copies of a real token rather than zeros: as keys they are masked,
    as values they are finite (uninitialised memory could hold NaN/inf, which 0 * x does not
    cancel), and as queries their output is dropped. No query row is ever fully masked.
    """

    name = "padded-sdpa"
    cost_model = CostModel.PADDED

    def __init__(self, group_ratio: float = 0.8) -> None:
        # 1.0 would give one group per distinct length, 0.0 one group per batch; 0.8 measured
        # best on CPU for MiniLM-sized models (per-call overhead vs padded FLOPs).
        self.group_ratio = group_ratio

    def prepare(self, cu_seqlens: torch.Tensor, host_cu_seqlens: np.ndarray) -> PaddedMeta:
        starts = np.asarray(host_cu_seqlens[:-1], dtype=np.int64)
        lengths = np.diff(host_cu_seqlens).astype(np.int64)
        device = cu_seqlens.device
        groups = []
        pad_parts = []
        # First padded row of each sequence, indexed by sequence.
        row_base = np.empty_like(lengths)
        rows = 0
        for members in length_groups(lengths, self.group_ratio):
            group_lengths = lengths[members]
            max_len = int(group_lengths[0])
            positions = np.arange(max_len)
            real = positions[None, :] < group_lengths[:, None]
            pad_parts.append(
                (starts[members, None] + np.minimum(positions, group_lengths[:, None] - 1)).ravel()
            )
            row_base[members] = rows + np.arange(len(members)) * max_len
            rows += len(members) * max_len
            key_mask = None
            if not real.all():
                key_mask = torch.from_numpy(real).view(len(members), 1, 1, max_len).to(device)
            groups.append(PaddedGroup(batch=len(members), max_len=max_len, key_mask=key_mask))
        # Row of flat token t of sequence s: row_base[s] + (t - starts[s]).
        unpad = np.arange(int(host_cu_seqlens[-1])) + np.repeat(row_base - starts, lengths)
        return PaddedMeta(
            groups=tuple(groups),
            pad_index=torch.from_numpy(np.concatenate(pad_parts)).to(device),
            unpad_index=torch.from_numpy(unpad).to(device),
        )

    def attend_qkv(self, qkv: torch.Tensor, meta: PaddedMeta) -> torch.Tensor:
        heads, dim = qkv.shape[2], qkv.shape[3]
        padded = qkv.index_select(0, meta.pad_index)
        outs = []
        row = 0
        for group in meta.groups:
            rows = group.batch * group.max_len
            block = padded[row : row + rows].view(group.batch, group.max_len, 3, heads, dim)
            # [3, B, heads, L, dim] as strides only: SDPA's CPU kernel takes strided inputs, and
            # making them contiguous measured slower than letting it read them in place.
            q, k, v = block.permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=group.key_mask)
            # [B, heads, L, dim] (stored as [B, L, heads, dim] by the CPU kernel) -> rows.
            outs.append(out.transpose(1, 2).reshape(rows, heads, dim))
            row += rows
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.index_select(0, meta.unpad_index)


# Candidates per device type, best first. A factory returns None when it cannot run here (a
# missing optional package), and the next one is tried. The CUDA packed path (varlen_attn or
# flash_attn_varlen_func, CostModel.PACKED) goes first in the "cuda" list when it lands; until
# then CUDA runs the padded SDPA path, which is correct everywhere SDPA runs.
AttentionFactory = Callable[[], "Attention | None"]
_IMPLEMENTATIONS: dict[str, list[AttentionFactory]] = {
    "cpu": [PaddedSDPA],
    "mps": [PaddedSDPA],
    "cuda": [PaddedSDPA],
}


def select_attention(device: torch.device | str) -> Attention:
    """The attention implementation for `device`, decided once at worker start."""
    device_type = torch.device(device).type
    factories = _IMPLEMENTATIONS.get(device_type)
    if factories is None:
        raise ConfigError(
            f"no attention implementation for device {device_type!r} "
            f"(supported: {', '.join(sorted(_IMPLEMENTATIONS))})"
        )
    for factory in factories:
        implementation = factory()
        if implementation is not None:
            return implementation
    raise ConfigError(f"no attention implementation is usable on {device_type!r}")
