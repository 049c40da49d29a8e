"""Every family in reduced precision on the CPU against its own float32 forward (the oracle's
numbers, proven by each family's parity test): every family must keep the reduced-precision
bound, cosine >= 0.999 per vector. bfloat16 is the default on CPUs with native bfloat16 and for
T5 and Gemma on CUDA; float16 is every other family's default on CUDA (shared/dtypes.py), and the
CPU runs it too (slowly), so its narrow range and the casts to it (additive masks and biases,
the softcap's float32 softmax) are checked here without a GPU. Each runs on the CPU's padded
attention and on the packed (varlen) path that CUDA takes, with a CPU stand-in for the kernel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from backend_worker.attention import PackedVarlen, torch_varlen_kernel
from backend_worker.engine import Engine
from backend_worker.models import model_class
from backend_worker.models.registry import registered_classes
from shared.modelinfo import load_model_info
from tests.fixtures.families import pack_offset
from tests.fixtures.oracles import cosine_rows
from tests.fixtures.tiny import MIXED_TEXTS
from tests.fixtures.varlen import cpu_varlen
from tests.fixtures.zoo import FAMILIES

MIN_COSINE = 0.999


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("path", ["padded", "packed"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reduced_precision_stays_within_its_bound(
    tmp_path: Path, family: str, path: str, dtype: torch.dtype
) -> None:
    model_dir = FAMILIES[family](tmp_path / family)
    info = load_model_info(model_dir)
    attention = PackedVarlen(torch_varlen_kernel(cpu_varlen)) if path == "packed" else None
    oracle = Engine.load(info)
    engine = Engine.load(info, dtype=dtype, attention=attention)
    arrays, _ = pack_offset(model_dir, MIXED_TEXTS * 3, info.position_offset)
    got = engine.embed(arrays)
    assert np.isfinite(got).all()
    assert cosine_rows(got, oracle.embed(arrays)).min() >= MIN_COSINE


def test_every_registered_family_has_a_tiny_checkpoint(tmp_path: Path) -> None:
    covered = set()
    for name, build in FAMILIES.items():
        # The config the worker builds from (a static model's is made from its table).
        covered.add(model_class(load_model_info(build(tmp_path / name)).config))
    missing = sorted(cls.__name__ for cls in registered_classes() - covered)
    assert not missing, f"tests/fixtures/zoo.py has no checkpoint for {missing}"
