"""Attention over a packed batch, with the implementation chosen once per worker.

The models keep every activation flat, [T, hidden] for the T tokens of a batch, so linear layers,
norms and MLPs never touch padding. Only attention needs to know where one sequence ends and the
next begins. An implementation does that in two steps:

  meta = attention.prepare(cu_seqlens, host_cu_seqlens)   # once per batch, shared by every layer
  out  = attention.attend_qkv(qkv, meta)                   # per layer

`qkv` is the fused projection viewed as [T, 3, heads, dim]; `out` is [T, heads, dim]. Taking the
fused tensor lets a padded path move q, k and v in one copy; a packed (varlen) path unbinds it
into three views for free.

Families whose attention is not plain bidirectional softmax(q k^T / sqrt(d)) call

  out  = attention.attend(q, k, v, meta, mask)                     # per layer

with a `MaskSpec` fixed when the layer is built: causal (decoders), a sliding window (ModernBERT's
local layers, Mistral, Gemma 3), an additive per-head position bias (ALiBi, MPNet's relative
buckets), a custom scale, and fewer key/value heads than query heads (GQA).

`select_attention(device)` picks the implementation from the device type alone: it never asks
torch.cuda anything, so choosing (or importing this module) on a CPU machine initialises nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from shared.errors import ConfigError
from shared.protocol import CostModel


class PositionBias(Protocol):
    """An additive attention bias that depends only on positions inside one sequence."""

    def __call__(
        self, length: int, device: torch.device, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """float32 [heads, queries, length]: bias[h, i, j] for query i and key j, queries
        rows[0] <= i < rows[1] (all of them when rows is None)."""
        ...


@dataclass(frozen=True, slots=True)
class MaskSpec:
    """What a layer's attention looks like beyond "every token sees its whole sequence".

    Query i sees key j when j <= i (if `causal`) and |i - j| <= `window` (if set); `bias` is
    added to the scores; `scale` replaces 1 / sqrt(head_dim). Specs are compared by identity of
    their bias, so layers sharing one spec share its cached masks within a batch.
    """

    causal: bool = False
    window: int | None = None
    bias: PositionBias | None = None
    scale: float | None = None

    @property
    def plain(self) -> bool:
        return not self.causal and self.window is None and self.bias is None


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

    def __call__(
        self, length: int, device: torch.device, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        first, last = rows or (0, length)
        keys = torch.arange(length, device=device, dtype=torch.float32)
        queries = torch.arange(first, last, device=device, dtype=torch.float32)
        distance = (keys[None, :] - queries[:, None]).abs()
        slopes = torch.tensor(self.slopes, dtype=torch.float32, device=device)
        return -slopes[:, None, None] * distance


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
        distance = (torch.arange(first, last, device=device)[:, None]
                    - torch.arange(length, device=device)[None, :])  # query - key
        shape = torch.ones(last - first, length, dtype=torch.bool, device=device)
        if spec.causal:
            shape &= distance >= 0
        if spec.window is not None:
            shape &= distance.abs() <= spec.window
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


def query_blocks(group: PaddedGroup, heads: int, spec: MaskSpec,
                 budget: int) -> list[tuple[int, int]]:
    """Query rows of a group in blocks whose float mask stays under `budget` bytes.

    A biased mask is float [batch, heads, L, L], and SDPA's scores as large again: 3.2 GB each
    for one 8,192-token sequence with 12 heads (JinaBERT v2's limit). Block by block, each with
    its slice of the mask, the peak is bounded whatever the length. Boolean masks broadcast over
    heads and stay small: one block.
    """
    length = group.max_len
    per_row = group.batch * heads * length * 4
    if spec.bias is None or per_row * length <= budget:
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
            parts = []
            for block in blocks:
                if len(blocks) == 1:  # the whole mask: built once per batch, shared by layers
                    key = (index, mask)
                    if key not in meta.masks:
                        meta.masks[key] = _group_mask(group, mask, q.device)
                    attn_mask = meta.masks[key]
                else:  # too big to keep: each layer builds its blocks again
                    attn_mask = _group_mask(group, mask, q.device, block)
                if attn_mask is not None and attn_mask.is_floating_point():
                    attn_mask = attn_mask.to(q.dtype)
                parts.append(F.scaled_dot_product_attention(
                    gq[:, :, block[0] : block[1]], gk, gv, attn_mask=attn_mask,
                    scale=mask.scale, enable_gqa=kv_heads != heads,
                ))
            out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
            outs.append(out.transpose(1, 2).reshape(rows, heads, out.shape[-1]))
            row += rows
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.index_select(0, meta.unpad_index)


@dataclass(frozen=True, slots=True)
class PackedMeta:
    """A packed batch as varlen kernels take it, plus a padded layout built on first use by a
    layer whose mask the kernel cannot express (an additive position bias)."""

    cu_seqlens: torch.Tensor  # int32 [n + 1] on the device
    max_len: int
    # None inside a CUDA graph, whose host-side layout is fixed at capture (backend_worker/graphs).
    host_cu_seqlens: np.ndarray | None
    padded: dict[str, PaddedMeta] = field(default_factory=dict)


# The kernel calling convention every varlen backend is adapted to:
# (q, k, v, cu_seqlens, max_len, mask) -> out [T, heads, dim], or None when this backend cannot
# express `mask` (the caller then takes the padded path for that layer).
VarlenKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, MaskSpec], "torch.Tensor | None"
]


def _window(mask: MaskSpec) -> tuple[int, int]:
    """MaskSpec -> flash-attention's (left, right) window; -1 is unbounded."""
    reach = -1 if mask.window is None else mask.window
    return reach, 0 if mask.causal else reach


def torch_varlen_kernel(function: Callable[..., Any] | None = None) -> VarlenKernel | None:
    """`torch.nn.attention.varlen.varlen_attn` (torch >= 2.10; CUDA fp16/bf16), adapted to the
    signature this torch has: it changed between releases (`is_causal` first, then
    `window_size`; `enable_gqa` from 2.12), so the parameters are read once, here."""
    if function is None:
        try:
            from torch.nn.attention.varlen import varlen_attn as function
        except ImportError:
            return None
    params = inspect.signature(function).parameters
    has_window, has_causal = "window_size" in params, "is_causal" in params
    has_gqa, has_scale = "enable_gqa" in params, "scale" in params

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
               max_len: int, mask: MaskSpec) -> torch.Tensor | None:
        if mask.bias is not None:
            return None
        kwargs: dict[str, Any] = {}
        if mask.window is not None or mask.causal:
            if has_window:
                kwargs["window_size"] = _window(mask)
            elif has_causal and mask.window is None:
                kwargs["is_causal"] = True
            else:
                return None
        if k.shape[1] != q.shape[1]:
            if not has_gqa:
                return None
            kwargs["enable_gqa"] = True
        if mask.scale is not None:
            if not has_scale:
                return None
            kwargs["scale"] = mask.scale
        return function(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **kwargs)

    return kernel


def flash_attn_kernel(function: Callable[..., Any] | None = None) -> VarlenKernel | None:
    """`flash_attn.flash_attn_varlen_func` (the flash-attn package, when installed): takes GQA,
    windows, a causal flag and symmetric ALiBi natively."""
    if function is None:
        try:
            from flash_attn import flash_attn_varlen_func as function
        except ImportError:
            return None

    slopes_on: dict[tuple[tuple[float, ...], torch.device], torch.Tensor] = {}

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
               max_len: int, mask: MaskSpec) -> torch.Tensor | None:
        slopes = None
        if mask.bias is not None:
            # flash-attn adds -slope * |i - j| itself (equal query and key lengths): ALiBi
            # encoders stay packed. Other biases take the padded path.
            if not isinstance(mask.bias, SymmetricAlibi) or mask.causal:
                return None
            key = (mask.bias.slopes, q.device)
            if key not in slopes_on:
                slopes_on[key] = torch.tensor(mask.bias.slopes, dtype=torch.float32,
                                              device=q.device)
            slopes = slopes_on[key]
        return function(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len,
                        softmax_scale=mask.scale, causal=mask.causal, window_size=_window(mask),
                        alibi_slopes=slopes)

    return kernel


class NeedsHostLayout(RuntimeError):
    """Raised when a captured (device-only) batch reaches a layer that needs host offsets."""


class PackedVarlen:
    """No padding anywhere: the flat batch and its cu_seqlens go straight to a varlen kernel.

    The CUDA path. Layers whose mask the kernel cannot express (an additive bias: ALiBi, MPNet's
    relative positions) run padded SDPA instead; which layers do is fixed by the model's specs,
    so the choice is made once per layer type, not per batch.
    """

    name = "packed-varlen"
    cost_model = CostModel.PACKED

    def __init__(self, kernel: VarlenKernel, fallback: PaddedSDPA | None = None) -> None:
        self.kernel = kernel
        self.fallback = fallback or PaddedSDPA()

    def prepare(self, cu_seqlens: torch.Tensor, host_cu_seqlens: np.ndarray) -> PackedMeta:
        max_len = int(np.diff(host_cu_seqlens).max())
        return PackedMeta(cu_seqlens.to(torch.int32), max_len, host_cu_seqlens)

    def prepare_static(self, cu_seqlens: torch.Tensor, max_len: int) -> PackedMeta:
        """For graph capture: device offsets only, `max_len` an upper bound fixed in advance."""
        return PackedMeta(cu_seqlens.to(torch.int32), max_len, None)

    def _padded(self, meta: PackedMeta) -> PaddedMeta:
        padded = meta.padded.get("meta")
        if padded is None:
            if meta.host_cu_seqlens is None:
                raise NeedsHostLayout("a layer needs padded attention, whose layout depends on "
                                      "the batch: it cannot run inside a captured graph")
            cu = meta.cu_seqlens.to(torch.int64)
            padded = meta.padded["meta"] = self.fallback.prepare(cu, meta.host_cu_seqlens)
        return padded

    def attend_qkv(self, qkv: torch.Tensor, meta: PackedMeta) -> torch.Tensor:
        q, k, v = qkv.unbind(1)
        return self.attend(q, k, v, meta, BIDIRECTIONAL)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PackedMeta, mask: MaskSpec
    ) -> torch.Tensor:
        out = self.kernel(q, k, v, meta.cu_seqlens, meta.max_len, mask)
        if out is None:
            return self.fallback.attend(q, k, v, self._padded(meta), mask)
        return out


def _packed_cuda() -> Attention | None:
    for make in (flash_attn_kernel, torch_varlen_kernel):
        kernel = make()
        if kernel is not None:
            return PackedVarlen(kernel)
    return None


# Candidates per device type, best first. A factory returns None when it cannot run here (a
# missing optional package, a torch without varlen_attn), and the next one is tried. Padded SDPA
# is correct everywhere SDPA runs.
AttentionFactory = Callable[[], "Attention | None"]
_IMPLEMENTATIONS: dict[str, list[AttentionFactory]] = {
    "cpu": [PaddedSDPA],
    "mps": [PaddedSDPA],
    "cuda": [_packed_cuda, PaddedSDPA],
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
