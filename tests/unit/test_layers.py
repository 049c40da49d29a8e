"""Shared layers: the options the rotary encoders (NomicBERT, GTE) rely on."""

from __future__ import annotations

import torch

from backend_worker.layers import MLP, GatedMLP


def test_gated_mlp_halves() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    for gate_first in (True, False):
        mlp = GatedMLP(6, 4, "silu", bias=True, gate_first=gate_first)
        first, second = (x @ mlp.gate_up.weight.T + mlp.gate_up.bias).split(4, dim=-1)
        gate, up = (first, second) if gate_first else (second, first)
        expected = (torch.nn.functional.silu(gate) * up) @ mlp.down.weight.T + mlp.down.bias
        torch.testing.assert_close(mlp(x), expected)


def test_mlp_down_bias_is_separate() -> None:
    mlp = MLP(6, 4, "gelu", bias=True, down_bias=False)
    assert mlp.up.bias is not None and mlp.down.bias is None
    assert MLP(6, 4, "gelu", bias=False).down.bias is None
