"""Attention over a packed batch, with the implementation chosen once per worker.

The models keep every activation flat, [T, hidden] for the T tokens of a batch, so linear layers,
norms and MLPs never touch padding. Only attention needs to know where one sequence ends and the
next begins. An implementation does that in two steps:

  meta = attention.prepare(cu_seqlens, max_len)   # once per batch, shared by every layer
  out  = attention.attend(q, k, v, meta)          # per layer; q, k, v, out are [T, heads, dim]

`select_attention(device)` picks the implementation from the device type alone: it never asks
torch.cuda anything, so choosing (or importing this module) on a CPU machine initialises nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from shared.errors import ConfigError
from shared.protocol import CostModel


class Attention(Protocol):
    """What a model needs from an attention implementation."""

    name: str
    cost_model: CostModel

    def prepare(
        self, cu_seqlens: torch.Tensor, max_len: int, total_tokens: int | None = None
    ) -> Any:
        """Per-batch metadata from int64 `cu_seqlens` (n+1, on the model's device).

        `total_tokens` (cu_seqlens[-1]) spares a device sync when the caller knows it.
        """
        ...

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Any) -> torch.Tensor:
        """Bidirectional attention of each sequence with itself; [T, heads, dim] in and out."""
        ...


@dataclass(frozen=True, slots=True)
class PaddedMeta:
    """Where each flat token sits in the padded [B, L] rectangle, and which keys are real."""

    batch: int
    max_len: int
    # Row of each flat token in the padded layout flattened to [B * L]: b * L + position.
    flat_index: torch.Tensor
    # [B, 1, 1, L] boolean, True for real keys; broadcast over heads and queries by SDPA.
    key_mask: torch.Tensor


class PaddedSDPA:
    """Scatter the flat tokens into [B, heads, L, dim], run SDPA with a key-padding mask, gather.

    The CPU path: SDPA's fused CPU kernels take a boolean mask, and the layout change costs
    three index copies in (q, k, v) and one out per layer, against linear layers and MLPs that
    never see padding. Padded query rows attend to their sequence's real keys (never an
    all-masked row, so no NaN) and are dropped by the gather.
    """

    name = "padded-sdpa"
    cost_model = CostModel.PADDED

    def prepare(
        self, cu_seqlens: torch.Tensor, max_len: int, total_tokens: int | None = None
    ) -> PaddedMeta:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        batch = lengths.shape[0]
        total = int(cu_seqlens[-1]) if total_tokens is None else total_tokens
        starts = torch.arange(batch, device=cu_seqlens.device) * max_len
        # Offset that turns a flat token index into its padded row, repeated per token; giving
        # output_size keeps repeat_interleave from synchronising with the device.
        shift = torch.repeat_interleave(starts - cu_seqlens[:-1], lengths, output_size=total)
        flat_index = torch.arange(total, device=cu_seqlens.device) + shift
        positions = torch.arange(max_len, device=cu_seqlens.device)
        key_mask = (positions[None, :] < lengths[:, None]).view(batch, 1, 1, max_len)
        return PaddedMeta(batch=batch, max_len=max_len, flat_index=flat_index, key_mask=key_mask)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PaddedMeta
    ) -> torch.Tensor:
        heads, dim = q.shape[1], q.shape[2]
        padded = [self._pad(x, meta) for x in (q, k, v)]
        out = F.scaled_dot_product_attention(*padded, attn_mask=meta.key_mask)
        # [B, heads, L, dim] -> [B * L, heads, dim] -> the real tokens, in flat order.
        out = out.transpose(1, 2).reshape(meta.batch * meta.max_len, heads, dim)
        return out.index_select(0, meta.flat_index)

    @staticmethod
    def _pad(x: torch.Tensor, meta: PaddedMeta) -> torch.Tensor:
        heads, dim = x.shape[1], x.shape[2]
        # NOTE: zeros, not empty: padded keys are masked, but padded values still enter the
        # kernel's matmul, and uninitialised memory can hold NaN/inf that 0 * x cannot cancel.
        padded = x.new_zeros(meta.batch * meta.max_len, heads, dim)
        padded.index_copy_(0, meta.flat_index, x)
        return padded.view(meta.batch, meta.max_len, heads, dim).transpose(1, 2)


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
