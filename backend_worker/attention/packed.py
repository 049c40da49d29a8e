"""Packed (varlen) attention: the CUDA path, no padding anywhere."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from backend_worker.attention.padded import PaddedMeta, PaddedSDPA, with_content
from backend_worker.attention.spec import BIDIRECTIONAL, MaskSpec, SymmetricAlibi, sdpa
from shared.protocol import CostModel


@dataclass(frozen=True, slots=True)
class PackedMeta:
    """A packed batch as varlen kernels take it, plus what a layer whose mask the kernel cannot
    express (an additive position bias) builds on first use and the other layers reuse: a
    padded layout, or inside a graph the block-diagonal masks."""

    cu_seqlens: torch.Tensor  # int32 [n + 1] on the device
    max_len: int
    # None inside a CUDA graph, whose host-side layout is fixed at capture (backend_worker/graphs).
    host_cu_seqlens: np.ndarray | None
    padded: dict[str, PaddedMeta] = field(default_factory=dict)
    dense_masks: dict[MaskSpec, torch.Tensor] = field(default_factory=dict)


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
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            return None
        function = varlen_attn
    attend: Callable[..., Any] = function  # (the closure sees this name, narrowed)
    params = inspect.signature(attend).parameters
    has_window, has_causal = "window_size" in params, "is_causal" in params
    has_gqa, has_scale = "enable_gqa" in params, "scale" in params

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
               max_len: int, mask: MaskSpec) -> torch.Tensor | None:
        if mask.bias is not None or mask.content is not None or mask.softcap is not None:
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
        return attend(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **kwargs)

    return kernel


def flash_attn_kernel(function: Callable[..., Any] | None = None) -> VarlenKernel | None:
    """`flash_attn.flash_attn_varlen_func` (the flash-attn package, when installed): takes GQA,
    windows, a causal flag and symmetric ALiBi natively."""
    if function is None:
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            return None
        function = flash_attn_varlen_func
    attend: Callable[..., Any] = function
    # flash-attn >= 2.6 caps scores itself (`softcap`, 0.0 meaning none).
    has_softcap = "softcap" in inspect.signature(attend).parameters

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
               max_len: int, mask: MaskSpec) -> torch.Tensor | None:
        slopes = None
        if mask.content is not None:
            return None
        kwargs: dict[str, Any] = {}
        if mask.softcap is not None:
            if not has_softcap:
                return None
            kwargs["softcap"] = mask.softcap
        if mask.bias is not None:
            # flash-attn adds -slope * |i - j| itself (equal query and key lengths): ALiBi
            # encoders stay packed. Other biases take the padded path.
            if not isinstance(mask.bias, SymmetricAlibi) or mask.causal:
                return None
            slopes = mask.bias.slopes_on(q.device)
        return attend(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len,
                      softmax_scale=mask.scale, causal=mask.causal, window_size=_window(mask),
                      alibi_slopes=slopes, **kwargs)

    return kernel


def block_diagonal_mask(cu_seqlens: torch.Tensor, total: int, mask: MaskSpec) -> torch.Tensor:
    """The [T, T] attention mask of a packed batch as one sequence: query i sees key j only
    inside its own sequence, and as `mask` says there. Built from device tensors alone (it can
    be captured in a graph). Boolean (True = attend) without a bias, else the float bias with
    -inf where masked. The bias is evaluated on flat indices, which within one sequence differ
    by exactly the in-sequence offsets: right for every `PositionBias`, which depends only on
    key - query. Every row keeps its diagonal, so no row is fully masked."""
    device = cu_seqlens.device
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    segment = torch.repeat_interleave(
        torch.arange(lengths.shape[0], device=device), lengths, output_size=total)
    allowed = segment[:, None] == segment[None, :]
    index = torch.arange(total, device=device)
    reach = mask.reach(index[:, None] - index[None, :])
    if reach is not None:
        allowed &= reach
    if mask.bias is None:
        return allowed
    bias = mask.bias(total, device).to(torch.float32)  # [heads, T, T]
    return bias.masked_fill(~allowed, float("-inf"))


class PackedVarlen:
    """No padding anywhere: the flat batch and its cu_seqlens go straight to a varlen kernel.

    The CUDA path. Layers whose mask the kernel cannot express (an additive bias: ALiBi, MPNet's
    relative positions, DeBERTa's content bias) run padded SDPA instead, or inside a captured
    graph SDPA over the whole batch with a block-diagonal mask; which layers do is fixed by the
    model's specs, so the choice is made once per layer type, not per batch.
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

    def _padded(self, meta: PackedMeta, host_cu_seqlens: np.ndarray) -> PaddedMeta:
        padded = meta.padded.get("meta")
        if padded is None:
            cu = meta.cu_seqlens.to(torch.int64)
            padded = meta.padded["meta"] = self.fallback.prepare(cu, host_cu_seqlens)
        return padded

    def _block_diagonal(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PackedMeta, mask: MaskSpec
    ) -> torch.Tensor:
        """The whole batch as one sequence under a block-diagonal mask: the path of captured
        batches (graph buckets hold at most 512 tokens, so the [T, T] mask stays small), whose
        padded layout would depend on lengths known only on the host."""
        positional = mask.positional
        attn_mask = meta.dense_masks.get(positional)
        if attn_mask is None:
            attn_mask = block_diagonal_mask(meta.cu_seqlens, q.shape[0], positional)
            if attn_mask.is_floating_point():
                attn_mask = attn_mask.to(q.dtype)
            meta.dense_masks[positional] = attn_mask
        q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, heads, T, dim]
        if attn_mask.dim() == 3:
            attn_mask = attn_mask[None]
        if mask.content is not None:
            # Every sequence's content bias, evaluated over the whole batch as one sequence:
            # within a sequence flat offsets are its own, across sequences it is masked.
            attn_mask = with_content(attn_mask, mask.content(q, k, 0)).to(q.dtype)
        return sdpa(q, k, v, attn_mask, mask)[0].transpose(0, 1)

    def attend_qkv(self, qkv: torch.Tensor, meta: PackedMeta) -> torch.Tensor:
        q, k, v = qkv.unbind(1)
        return self.attend(q, k, v, meta, BIDIRECTIONAL)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PackedMeta, mask: MaskSpec
    ) -> torch.Tensor:
        out = self.kernel(q, k, v, meta.cu_seqlens, meta.max_len, mask)
        if out is not None:
            return out
        if meta.host_cu_seqlens is None:
            return self._block_diagonal(q, k, v, meta, mask)
        return self.fallback.attend(q, k, v, self._padded(meta, meta.host_cu_seqlens), mask)
