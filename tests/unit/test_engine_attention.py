"""PaddedSDPA against a per-sequence reference: length grouping, the fused-qkv gather and the
key mask must give every sequence attention over exactly its own tokens."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend_worker.attention import (
    MaskSpec,
    PaddedSDPA,
    SymmetricAlibi,
    alibi_slopes,
    length_groups,
)
from tests.fixtures.varlen import cpu_varlen, old_cpu_varlen

HEADS, DIM = 3, 8


def reference(qkv: torch.Tensor, cu: np.ndarray) -> torch.Tensor:
    outs = []
    for start, end in itertools.pairwise(cu):
        q, k, v = qkv[start:end].permute(1, 2, 0, 3)  # [3, heads, len, dim]
        outs.append(F.scaled_dot_product_attention(q, k, v).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("lengths", [[5], [1, 7, 3, 7, 2, 16, 9], [4, 4, 4], [1, 1]])
def test_matches_per_sequence_attention(ratio: float, lengths: list[int]) -> None:
    torch.manual_seed(0)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    qkv = torch.randn(int(cu[-1]), 3 * HEADS * DIM).view(-1, 3, HEADS, DIM)
    attention = PaddedSDPA(group_ratio=ratio)
    meta = attention.prepare(torch.from_numpy(cu.astype(np.int64)), cu)
    out = attention.attend_qkv(qkv, meta)
    assert out.shape == (cu[-1], HEADS, DIM)
    torch.testing.assert_close(out, reference(qkv, cu), atol=1e-6, rtol=1e-5)


def test_length_groups_cover_every_sequence_once() -> None:
    lengths = np.array([16, 200, 30, 180, 31, 250, 16, 100])
    groups = length_groups(lengths, 0.8)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
    for group in groups:
        longest = lengths[group[0]]
        assert lengths[group].max() == longest
        assert (lengths[group] >= 0.8 * longest).all()
    assert len(length_groups(lengths, 0.0)) == 1
    assert len(length_groups(lengths, 1.0)) == len(set(lengths.tolist()))


class _DistanceBias:
    """ALiBi-like: -slope_h * |i - j|, a different slope per head."""

    def __init__(self, heads: int) -> None:
        self.slopes = torch.linspace(0.5, 2.0, heads)

    def __call__(self, length: int, device: torch.device, rows=None) -> torch.Tensor:
        first, last = rows or (0, length)
        queries = torch.arange(first, last, device=device)
        keys = torch.arange(length, device=device)
        return -self.slopes[:, None, None] * (queries[:, None] - keys[None, :]).abs()


class _ContentBias:
    """DeBERTa-like: q_i . a_h * tanh(i - j) + k_j . b_h * |i - j| / 4, per head, from the
    queries' and keys' values and their distance (a `ContentBias`)."""

    def __init__(self, heads: int, dim: int) -> None:
        gen = torch.Generator().manual_seed(7)
        self.a, self.b = torch.randn(2, heads, dim, generator=gen)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, first: int) -> torch.Tensor:
        queries = torch.arange(first, first + q.shape[2])
        distance = (queries[:, None] - torch.arange(k.shape[2])[None, :]).float()
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (GQA: kv heads shared)
        by_query = (q.float() * self.a[:, None, :]).sum(-1)[..., None]  # [B, heads, R, 1]
        by_key = (k.float() * self.b[:, None, :]).sum(-1)[..., None, :]  # [B, heads, 1, L]
        return by_query * torch.tanh(distance) + by_key * distance.abs() / 4


def masked_reference(q, k, v, cu, spec: MaskSpec) -> torch.Tensor:
    """Per sequence, explicit float64 scores: the definition of MaskSpec, written out."""
    outs = []
    group = q.shape[1] // k.shape[1]
    for start, end in itertools.pairwise(cu):
        n = end - start
        qs = q[start:end].double().transpose(0, 1)  # [heads, n, dim]
        ks = k[start:end].double().repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[start:end].double().repeat_interleave(group, dim=1).transpose(0, 1)
        scale = spec.scale if spec.scale is not None else qs.shape[-1] ** -0.5
        scores = qs @ ks.transpose(1, 2) * scale
        if spec.softcap is not None:  # capped before any bias or mask, as Gemma 2 does
            scores = torch.tanh(scores / spec.softcap) * spec.softcap
        if spec.bias is not None:
            scores = scores + spec.bias(n, torch.device("cpu")).double()
        if spec.content is not None:
            scores = scores + spec.content(qs[None].float(), ks[None].float(), 0)[0].double()
        i = torch.arange(n)
        allowed = torch.ones(n, n, dtype=torch.bool)
        if spec.causal:
            allowed &= i[:, None] >= i[None, :]
        if spec.window is not None:
            allowed &= (i[:, None] - i[None, :]).abs() <= spec.window
        scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs).float()


SPECS = {
    "plain": MaskSpec(),
    "causal": MaskSpec(causal=True),
    "window": MaskSpec(window=2),
    "causal-window": MaskSpec(causal=True, window=3),
    "bias": MaskSpec(bias=_DistanceBias(4)),
    "bias-window-scale": MaskSpec(bias=_DistanceBias(4), window=1, scale=0.3),
    "alibi": MaskSpec(bias=SymmetricAlibi(tuple(alibi_slopes(4)))),
    "content-scale": MaskSpec(content=_ContentBias(4, DIM), scale=0.2),
    "content-bias-window": MaskSpec(content=_ContentBias(4, DIM), bias=_DistanceBias(4),
                                    window=3),
    # Gemma 2's score cap, small enough to bend these scores.
    "softcap": MaskSpec(softcap=0.5),
    "softcap-causal-window-scale": MaskSpec(causal=True, window=3, scale=0.3, softcap=0.8),
    # No family caps a biased score yet, but `sdpa` takes a float mask then (the bias, -inf
    # where masked): it must be added after the cap, not dropped (a mutant that ignored float
    # masks under a cap passed every other case).
    "softcap-bias-window": MaskSpec(bias=_DistanceBias(4), window=2, softcap=0.5),
}


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("lengths", [[5], [1, 7, 3, 7, 2, 16, 9], [4, 4, 4]])
def test_attend_matches_masked_reference(kv_heads: int, name: str, lengths: list[int]) -> None:
    torch.manual_seed(1)
    spec = SPECS[name]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    total = int(cu[-1])
    q = torch.randn(total, 4, DIM)
    k, v = torch.randn(total, kv_heads, DIM), torch.randn(total, kv_heads, DIM)
    attention = PaddedSDPA(group_ratio=0.5)
    meta = attention.prepare(torch.from_numpy(cu.astype(np.int64)), cu)
    out = attention.attend(q, k, v, meta, spec)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, masked_reference(q, k, v, cu, spec), atol=1e-5, rtol=1e-4)
    # The second layer of the same batch reuses the cached masks and gets the same answer.
    torch.testing.assert_close(attention.attend(q, k, v, meta, spec), out)


@pytest.mark.parametrize("name", ["bias", "bias-window-scale", "alibi", "content-scale",
                                  "content-bias-window", "softcap",
                                  "softcap-causal-window-scale", "softcap-bias-window"])
@pytest.mark.parametrize("budget", [1, 4 * 4 * 16 * 5])  # one query row per block; five rows
def test_biased_attention_in_query_blocks_matches_the_reference(name: str, budget: int) -> None:
    """Long biased sequences run their queries in blocks (a bounded float mask): same answer."""
    from backend_worker.attention import query_blocks

    torch.manual_seed(4)
    spec = SPECS[name]
    lengths = [1, 7, 3, 16, 9]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    total = int(cu[-1])
    q, k, v = torch.randn(total, 4, DIM), torch.randn(total, 2, DIM), torch.randn(total, 2, DIM)
    attention = PaddedSDPA(group_ratio=0.0, mask_budget=budget)
    meta = attention.prepare(torch.from_numpy(cu.astype(np.int64)), cu)
    assert len(query_blocks(meta.groups[0], 4, spec, budget)) > 1, "the test must chunk"
    out = attention.attend(q, k, v, meta, spec)
    torch.testing.assert_close(out, masked_reference(q, k, v, cu, spec), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_capped_sdpa_matches_transformers_eager_gemma2_attention(dtype: torch.dtype) -> None:
    """`sdpa` with a softcap against transformers' own Gemma 2 eager attention on the same
    [B, heads, L, dim] blocks, GQA and a causal window included: the same operations in the
    same dtype (scores, scale and cap in the inputs' dtype, softmax in float32), so bfloat16
    agrees to the bit, not just within a tolerance; our masked_reference is float64."""
    from types import SimpleNamespace

    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    from backend_worker.attention.spec import sdpa

    torch.manual_seed(5)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 11, DIM
    q = (torch.randn(batch, heads, length, dim) * 3).to(dtype)
    k = (torch.randn(batch, kv_heads, length, dim) * 3).to(dtype)
    v = torch.randn(batch, kv_heads, length, dim).to(dtype)
    spec = MaskSpec(causal=True, window=3, scale=0.3, softcap=0.8)
    i = torch.arange(length)
    allowed = spec.reach(i[:, None] - i[None, :])[None, None]  # [1, 1, L, L]
    additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill(
        ~allowed, torch.finfo(dtype).min)  # transformers' eager mask
    module = SimpleNamespace(head_dim=dim, num_key_value_groups=heads // kv_heads,
                             training=False)
    ref, _ = eager_attention_forward(module, q, k, v, additive, scaling=spec.scale,
                                     softcap=spec.softcap)
    ours = sdpa(q, k, v, allowed, spec)  # [B, heads, L, dim]; transformers' is [B, L, heads, dim]
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, ref.transpose(1, 2), atol=0, rtol=0)

def test_rotary_matches_complex_rotation() -> None:
    """Rotate-half rotary == multiplying (x_i, x_{i+d/2}) pairs by e^{i * pos * freq}."""
    from backend_worker.layers import Rotary, apply_rotary, rope_inv_freq

    torch.manual_seed(2)
    dim, positions = 8, torch.tensor([0, 1, 5, 37])
    x = torch.randn(4, 3, dim)
    rotary = Rotary(rope_inv_freq(dim, 10_000.0))
    out = apply_rotary(x, rotary.tables(positions, torch.float32))
    pairs = torch.complex(x[..., : dim // 2].double(), x[..., dim // 2 :].double())
    angle = positions[:, None, None].double() * rope_inv_freq(dim, 10_000.0).double()
    turned = pairs * torch.polar(torch.ones_like(angle), angle)
    expected = torch.cat((turned.real, turned.imag), dim=-1).float()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # Partial rotary leaves the tail alone.
    partial = Rotary(rope_inv_freq(4, 10_000.0)).tables(positions, torch.float32)
    assert torch.equal(apply_rotary(x, partial)[..., 4:], x[..., 4:])


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("kernel_kind", ["torch-2.13", "torch-2.10", "flash-attn",
                                         "flash-attn-2.5"])
def test_packed_varlen_matches_masked_reference(name: str, kernel_kind: str) -> None:
    from backend_worker.attention import PackedVarlen, flash_attn_kernel, torch_varlen_kernel

    calls = []

    def counted(function):
        def wrapper(*args, **kwargs):
            calls.append(kwargs)
            return function(*args, **kwargs)
        wrapper.__signature__ = __import__("inspect").signature(function)
        return wrapper

    def flash(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False,
              window_size=(-1, -1), alibi_slopes=None, softcap=0.0):
        left, right = window_size
        return cpu_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=softmax_scale,
                          window_size=(left, 0 if causal else right),
                          enable_gqa=k.shape[1] != q.shape[1], alibi_slopes=alibi_slopes,
                          softcap=softcap)

    def flash_2_5(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False,
                  window_size=(-1, -1), alibi_slopes=None):  # before `softcap`
        return flash(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window_size,
                     alibi_slopes)

    kernel = {
        "torch-2.13": lambda: torch_varlen_kernel(counted(cpu_varlen)),
        "torch-2.10": lambda: torch_varlen_kernel(counted(old_cpu_varlen)),
        "flash-attn": lambda: flash_attn_kernel(counted(flash)),
        "flash-attn-2.5": lambda: flash_attn_kernel(counted(flash_2_5)),
    }[kernel_kind]()
    attention = PackedVarlen(kernel)
    spec = SPECS[name]
    torch.manual_seed(3)
    for kv_heads in (4, 2):
        lengths = [1, 7, 3, 16, 9]
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        total = int(cu[-1])
        q = torch.randn(total, 4, DIM)
        k, v = torch.randn(total, kv_heads, DIM), torch.randn(total, kv_heads, DIM)
        meta = attention.prepare(torch.from_numpy(cu.astype(np.int64)), cu)
        calls.clear()
        out = attention.attend(q, k, v, meta, spec)
        torch.testing.assert_close(out, masked_reference(q, k, v, cu, spec), atol=1e-5,
                                   rtol=1e-4)
        # What went to the kernel: everything but a bias (and, for the old torch signature, a
        # window, GQA or a custom scale) is the kernel's job; the rest takes the padded path.
        old_limits = kernel_kind == "torch-2.10" and (
            spec.window is not None or kv_heads != 4 or spec.scale is not None)
        alibi = isinstance(spec.bias, SymmetricAlibi) and kernel_kind.startswith("flash-attn")
        # Only flash-attn caps scores, from 2.6 on.
        capped = spec.softcap is None or kernel_kind == "flash-attn"
        expressible = (spec.bias is None or alibi) and spec.content is None and capped
        assert bool(calls) == (expressible and not old_limits)


def test_rotary_built_under_the_meta_device_has_values() -> None:
    """Models are constructed under torch.device("meta"); the rotary frequencies they compute
    there must still be real numbers (they are not parameters, so loading never fills them)."""
    from backend_worker.layers import Rotary, rope_inv_freq

    with torch.device("meta"):
        rotary = Rotary(rope_inv_freq(8, 10_000.0))
    assert rotary.inv_freq.device.type == "cpu"
    torch.testing.assert_close(rotary.inv_freq, rope_inv_freq(8, 10_000.0))
    assert rotary.tables(torch.tensor([3]), torch.float32).cos.isfinite().all()



def test_a_varlen_kernel_without_a_scale_parameter_declines_a_scaled_mask() -> None:
    """A torch whose varlen_attn takes no `scale` cannot express the family's scale: the
    kernel says so (None: the padded path answers) instead of calling it with one."""
    from backend_worker.attention import torch_varlen_kernel

    def no_scale(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False):
        return cpu_varlen(q, k, v, cu_q, cu_k, max_q, max_k)

    kernel = torch_varlen_kernel(no_scale)
    assert kernel is not None
    q = k = v = torch.randn(5, 4, DIM)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    assert kernel(q, k, v, cu, 3, MaskSpec()) is not None
    assert kernel(q, k, v, cu, 3, MaskSpec(scale=0.3)) is None

def _refusing_kernel(q, k, v, cu_seqlens, max_len, mask):
    return None  # a kernel that expresses nothing: every layer takes the fallback


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_captured_batches_attend_through_a_block_diagonal_mask(name: str, kv_heads: int) -> None:
    """Inside a graph there are no host offsets for a padded layout: the batch attends as one
    sequence under a block-diagonal mask, with every sequence's own bias and mask."""
    from backend_worker.attention import PackedVarlen

    torch.manual_seed(5)
    spec = SPECS[name]
    lengths = [1, 7, 3, 16, 9]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    total = int(cu[-1])
    q = torch.randn(total, 4, DIM)
    k, v = torch.randn(total, kv_heads, DIM), torch.randn(total, kv_heads, DIM)
    attention = PackedVarlen(_refusing_kernel)
    meta = attention.prepare_static(torch.from_numpy(cu.astype(np.int64)), max_len=32)
    out = attention.attend(q, k, v, meta, spec)
    torch.testing.assert_close(out, masked_reference(q, k, v, cu, spec), atol=1e-5, rtol=1e-4)
    # Cached: the positional part only (a content bias differs per layer).
    assert list(meta.dense_masks) == [spec.positional] and not meta.padded
    # The next layer reuses the batch's mask.
    torch.testing.assert_close(attention.attend(q, k, v, meta, spec), out)
    assert len(meta.dense_masks) == 1
