"""Padded SDPA: the CPU path (and the fallback for layers a varlen kernel cannot express)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from backend_worker.attention.spec import MaskSpec, sdpa
from shared.protocol import CostModel


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
    # (group index, MaskSpec) -> the SDPA mask of that group: built by the first layer that
    # needs it, reused by the others (a batch's masks are the same in every layer).
    masks: dict[tuple[int, MaskSpec], torch.Tensor | None] = field(default_factory=dict)


def _group_mask(
    group: PaddedGroup, spec: MaskSpec, device: torch.device, rows: tuple[int, int] | None = None
) -> torch.Tensor | None:
    """The SDPA attn_mask of one padded group under `spec`, for its queries rows[0]..rows[1]
    (all when None): boolean (True = attend) when there is no bias, else float with -inf where
    masked; None when nothing is masked."""
    allowed = group.key_mask  # [B, 1, 1, L] or None
    length = group.max_len
    first, last = rows or (0, length)
    if spec.causal or spec.window is not None:
        shape = spec.reach(torch.arange(first, last, device=device)[:, None]
                           - torch.arange(length, device=device)[None, :])
        assert shape is not None
        allowed = shape[None, None] if allowed is None else allowed & shape
        if group.key_mask is not None:
            # A padding query far from every real key would see no key at all under a window
            # (softmax of all -inf is NaN). Its output is dropped, so let it see everything.
            allowed = allowed | ~group.key_mask.transpose(-1, -2)[:, :, first:last]
    if spec.bias is None:
        return allowed
    bias = spec.bias(length, device, rows).to(torch.float32).unsqueeze(0)  # [1, heads, R, L]
    if allowed is None:
        return bias
    # Every row keeps at least its diagonal (real rows) or all keys (padding rows): finite.
    return bias.masked_fill(~allowed, float("-inf"))


def with_content(attn_mask: torch.Tensor | None, content: torch.Tensor) -> torch.Tensor:
    """A float SDPA mask: the content bias (float32 [B, heads, R, L]) where `attn_mask` (boolean
    True = attend, float additive, or None) allows, -inf elsewhere."""
    if attn_mask is None:
        return content
    if attn_mask.is_floating_point():
        return content + attn_mask
    return content.masked_fill(~attn_mask, float("-inf"))


def query_blocks(group: PaddedGroup, heads: int, spec: MaskSpec,
                 budget: int) -> list[tuple[int, int]]:
    """Query rows of a group in blocks whose float mask stays under `budget` bytes.

    A biased mask (position or content bias) is float [batch, heads, L, L], and SDPA's scores as
    large again: 3.2 GB each for one 8,192-token sequence with 12 heads (JinaBERT v2's limit);
    capped scores (`softcap`) are written out at that size too. Block by block, each with its
    slice of the mask, the peak is bounded whatever the length. Boolean masks broadcast over
    heads and stay small: one block.
    """
    length = group.max_len
    per_row = group.batch * heads * length * 4
    written_out = spec.bias is not None or spec.content is not None or spec.softcap is not None
    if not written_out or per_row * length <= budget:
        return [(0, length)]
    step = max(1, budget // per_row)
    return [(first, min(first + step, length)) for first in range(0, length, step)]


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

    def __init__(self, group_ratio: float = 0.8, mask_budget: int = 256 << 20) -> None:
        # 1.0 would give one group per distinct length, 0.0 one group per batch; 0.8 measured
        # best on CPU for MiniLM-sized models (per-call overhead vs padded FLOPs).
        self.group_ratio = group_ratio
        # Bytes a group's biased float mask may take before its queries go in blocks.
        self.mask_budget = mask_budget

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

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PaddedMeta, mask: MaskSpec
    ) -> torch.Tensor:
        heads, kv_heads = q.shape[1], k.shape[1]
        q, k, v = (x.index_select(0, meta.pad_index) for x in (q, k, v))
        outs = []
        row = 0
        for index, group in enumerate(meta.groups):
            rows = group.batch * group.max_len
            gq, gk, gv = (
                x[row : row + rows].view(group.batch, group.max_len, h, -1).transpose(1, 2)
                for x, h in ((q, heads), (k, kv_heads), (v, kv_heads))
            )
            blocks = query_blocks(group, heads, mask, self.mask_budget)
            positional = mask.positional
            parts = []
            for block in blocks:
                block_q = gq[:, :, block[0] : block[1]]
                if len(blocks) == 1:  # the whole mask: built once per batch, shared by layers
                    key = (index, positional)
                    if key not in meta.masks:
                        meta.masks[key] = _group_mask(group, positional, q.device)
                    attn_mask = meta.masks[key]
                else:  # too big to keep: each layer builds its blocks again
                    attn_mask = _group_mask(group, positional, q.device, block)
                if mask.content is not None:
                    attn_mask = with_content(attn_mask, mask.content(block_q, gk, block[0]))
                if attn_mask is not None and attn_mask.is_floating_point():
                    attn_mask = attn_mask.to(q.dtype)
                parts.append(sdpa(block_q, gk, gv, attn_mask, mask))
            out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
            outs.append(out.transpose(1, 2).reshape(rows, heads, out.shape[-1]))
            row += rows
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.index_select(0, meta.unpad_index)
