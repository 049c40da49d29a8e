"""oneDNN-prepacked linears on the CPU: the same numbers as nn.Linear, and no packing where the
CPU cannot pack a dtype (bfloat16 without AVX512 or AVX-NE-CONVERT) instead of a failed load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from backend_worker import cpu_linear
from backend_worker.cpu_linear import PackedLinear, pack_linears, packing_available
from backend_worker.engine import Engine
from shared.modelinfo import load_model_info
from tests.fixtures.tiny import make_tiny_bert, pack

CPU = torch.device("cpu")


@pytest.mark.skipif(not packing_available(CPU, torch.float32), reason="no oneDNN packing here")
def test_a_packed_linear_computes_what_the_linear_does() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 24)
    x = torch.randn(5, 48)
    packed = PackedLinear(linear)
    with torch.inference_mode():
        assert (packed(x) - linear(x)).abs().max() <= 1e-5
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Sequential(nn.Linear(4, 2)))
    assert pack_linears(model) == 2
    assert not any(type(m) is nn.Linear for m in model.modules())


def test_a_dtype_the_cpu_cannot_pack_is_not_packed(monkeypatch: pytest.MonkeyPatch) -> None:
    """An AVX2-only CPU: oneDNN's reorder raises for bfloat16 (which loaded no model at all)."""

    def reorder(weight: torch.Tensor, *args: object) -> torch.Tensor:
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support ...")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", reorder)
    assert not cpu_linear._packs.__wrapped__(torch.bfloat16)


def test_bfloat16_serves_where_it_cannot_be_packed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_dir = make_tiny_bert(tmp_path / "tiny", pooling="mean")
    monkeypatch.setattr(cpu_linear, "_packs", lambda dtype: False)
    info = load_model_info(tiny_dir)
    engine = Engine.load(info, dtype=torch.bfloat16)
    assert not any(isinstance(m, PackedLinear) for m in engine.model.modules())
    arrays, _ = pack(tiny_dir, ["a short text", "and another, longer one"])
    got, want = engine.embed(arrays), Engine.load(info).embed(arrays)
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.999
