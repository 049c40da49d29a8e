"""PaddedSDPA against a per-sequence reference: length grouping, the fused-qkv gather and the
key mask must give every sequence attention over exactly its own tokens."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend_worker.attention import PaddedSDPA, length_groups

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
