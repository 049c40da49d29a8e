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
buckets), an additive bias computed from q and k themselves (DeBERTa's disentangled attention),
a custom scale, and fewer key/value heads than query heads (GQA).

`attention_candidates(device, dtype)` lists the implementations that may run there, best first,
from the device type and dtype alone: it never asks torch.cuda anything, so choosing (or importing
this module) on a CPU machine initialises nothing. Whether the best one really runs on this GPU
(flash kernels need compute capability >= 8.0 and a head size they support) is learnt by running
it: backend_worker/engine.py tries the model on each candidate in turn at start.

Modules: spec.py (the protocol, MaskSpec, ALiBi), padded.py (padded SDPA, the CPU path),
packed.py (varlen kernels, the CUDA path); this file chooses between them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from backend_worker.attention.packed import (
    PackedMeta,
    PackedVarlen,
    VarlenKernel,
    block_diagonal_mask,
    flash_attn_kernel,
    torch_varlen_kernel,
)
from backend_worker.attention.padded import (
    PaddedGroup,
    PaddedMeta,
    PaddedSDPA,
    length_groups,
    query_blocks,
)
from backend_worker.attention.spec import (
    BIDIRECTIONAL,
    Attention,
    ContentBias,
    MaskSpec,
    PositionBias,
    SymmetricAlibi,
    alibi_slopes,
)
from shared.errors import ConfigError

__all__ = [
    "BIDIRECTIONAL", "Attention", "ContentBias", "MaskSpec", "PackedMeta", "PackedVarlen",
    "PaddedGroup", "PaddedMeta", "PaddedSDPA", "PositionBias", "SymmetricAlibi", "VarlenKernel",
    "alibi_slopes", "attention_candidates", "block_diagonal_mask", "flash_attn_kernel",
    "length_groups", "query_blocks", "select_attention", "torch_varlen_kernel",
]

log = logging.getLogger(__name__)


# The varlen kernels (flash-attn's and torch's, which is FlashAttention inside) compute in these
# dtypes only: a float32 model on CUDA attends through padded SDPA.
_PACKED_DTYPES = (torch.float16, torch.bfloat16)


def _packed_cuda(dtype: torch.dtype) -> Attention | None:
    if dtype not in _PACKED_DTYPES:
        return None
    for make in (flash_attn_kernel, torch_varlen_kernel):
        kernel = make()
        if kernel is not None:
            return PackedVarlen(kernel)
    # torch 2.9 (our floor) has no varlen_attn: said, since it costs the packed path and with
    # it the CUDA graphs of short requests.
    log.warning("no packed attention kernel: torch %s has no torch.nn.attention.varlen "
                "(torch >= 2.10) and flash-attn is not installed; attention runs padded, "
                "without CUDA graphs", torch.__version__)
    return None


def _padded(dtype: torch.dtype) -> Attention:
    return PaddedSDPA()


# Candidates per device type, best first. A factory returns None when it cannot run here (a
# missing optional package, a torch without varlen_attn, a dtype the kernel lacks), and the next
# one is tried. Padded SDPA is correct everywhere SDPA runs, so it ends every list.
AttentionFactory = Callable[[torch.dtype], "Attention | None"]
_IMPLEMENTATIONS: dict[str, list[AttentionFactory]] = {
    "cpu": [_padded],
    "mps": [_padded],
    "cuda": [_packed_cuda, _padded],
}


def attention_candidates(device: torch.device | str, dtype: torch.dtype) -> list[Attention]:
    """The implementations that may run on `device` in `dtype`, best first; padded SDPA last."""
    device_type = torch.device(device).type
    factories = _IMPLEMENTATIONS.get(device_type)
    if factories is None:
        raise ConfigError(
            f"no attention implementation for device {device_type!r} "
            f"(supported: {', '.join(sorted(_IMPLEMENTATIONS))})"
        )
    return [a for a in (factory(dtype) for factory in factories) if a is not None]


def select_attention(device: torch.device | str, dtype: torch.dtype = torch.float16) -> Attention:
    """The best implementation on paper for `device` in `dtype` (the engine confirms it runs)."""
    return attention_candidates(device, dtype)[0]
