"""Which attention a worker ends up with: candidates from the device and dtype, then the first
one that really runs the model (a varlen kernel may not run on an older GPU, or a head size)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.torch_version import TorchVersion

from backend_worker import engine as engine_module
from backend_worker.attention import (
    PackedVarlen,
    PaddedSDPA,
    attention_candidates,
    flash_attn_kernel,
    torch_varlen_kernel,
)
from backend_worker.engine import Engine
from shared.modelinfo import load_model_info
from shared.protocol import CostModel
from tests.fixtures.families import pack_offset
from tests.fixtures.tiny import MIXED_TEXTS
from tests.fixtures.varlen import cpu_varlen
from tests.fixtures.zoo import FAMILIES


def kinds(candidates: list) -> list[type]:
    return [type(c) for c in candidates]


def test_float32_on_cuda_attends_padded_and_half_precision_packed() -> None:
    # The varlen kernels compute in float16 / bfloat16 only. torch's varlen_attn arrived in
    # torch 2.10: on 2.9 (the floor) a CUDA worker without flash-attn attends padded.
    assert kinds(attention_candidates("cuda", torch.float32)) == [PaddedSDPA]
    has_varlen = TorchVersion(torch.__version__) >= (2, 10) or flash_attn_kernel() is not None
    half = [PackedVarlen, PaddedSDPA] if has_varlen else [PaddedSDPA]
    for dtype in (torch.float16, torch.bfloat16):
        assert kinds(attention_candidates("cuda:1", dtype)) == half
    assert kinds(attention_candidates("cpu", torch.bfloat16)) == [PaddedSDPA]
    assert not torch.cuda.is_initialized()


def test_flash_attn_is_preferred_where_it_is_installed(monkeypatch) -> None:
    # flash-attn runs ALiBi and softcap packed, which torch's varlen_attn does not.
    import backend_worker.attention as attention

    def flash(*args, **kwargs): ...

    def torch_varlen(*args, **kwargs): ...

    monkeypatch.setattr(attention, "flash_attn_kernel", lambda: flash)
    monkeypatch.setattr(attention, "torch_varlen_kernel", lambda: torch_varlen)
    assert attention_candidates("cuda", torch.float16)[0].kernel is flash
    monkeypatch.setattr(attention, "flash_attn_kernel", lambda: None)  # not installed
    assert attention_candidates("cuda", torch.float16)[0].kernel is torch_varlen


def test_a_torch_without_varlen_and_no_flash_attn_is_said_at_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """torch 2.9, the floor, has no varlen_attn: a GPU worker then attends padded and captures
    no graphs, and the log says why (a float32 one is padded by choice, and says nothing)."""
    import backend_worker.attention as attention

    monkeypatch.setattr(attention, "flash_attn_kernel", lambda: None)
    monkeypatch.setattr(attention, "torch_varlen_kernel", lambda: None)
    with caplog.at_level(logging.WARNING, logger="backend_worker.attention"):
        assert kinds(attention_candidates("cuda", torch.float32)) == [PaddedSDPA]
        assert not caplog.records
        assert kinds(attention_candidates("cuda", torch.bfloat16)) == [PaddedSDPA]
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "no torch.nn.attention.varlen (torch >= 2.10)" in record.getMessage()
    assert "flash-attn is not installed" in record.getMessage()


def flash_on_an_old_gpu(*args, **kwargs):
    raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.\nException raised")


def embeddings(engine: Engine, model_dir: Path) -> np.ndarray:
    arrays, _ = pack_offset(model_dir, MIXED_TEXTS, engine.info.position_offset)
    return engine.embed(arrays)


@pytest.mark.parametrize("family", ["bert-mean", "roberta", "modernbert"])
def test_a_kernel_that_cannot_run_falls_back_to_padded_attention(
    tmp_path: Path, family: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model_dir = FAMILIES[family](tmp_path / family)
    info = load_model_info(model_dir)
    want = embeddings(Engine.load(info), model_dir)
    broken = PackedVarlen(torch_varlen_kernel(flash_on_an_old_gpu))
    monkeypatch.setattr(engine_module, "attention_candidates",
                        lambda device, dtype: [broken, PaddedSDPA()])
    with caplog.at_level(logging.WARNING, logger="backend_worker.engine"):
        engine = Engine.load(info)
    assert isinstance(engine.attention, PaddedSDPA)
    assert engine.cost_model is CostModel.PADDED
    assert "packed-varlen cannot run" in caplog.text and "Ampere" in caplog.text
    # Every layer of the kept model attends through the fallback, not the broken kernel.
    np.testing.assert_array_equal(embeddings(engine, model_dir), want)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_kernel_that_runs_is_kept_for_every_family(
    tmp_path: Path, family: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The start-up trial batch is valid input for every family (ids, positions, token types),
    so a working kernel is never refused because of the trial itself."""
    model_dir = FAMILIES[family](tmp_path / family)
    info = load_model_info(model_dir)
    packed = PackedVarlen(torch_varlen_kernel(cpu_varlen))
    monkeypatch.setattr(engine_module, "attention_candidates",
                        lambda device, dtype: [packed, PaddedSDPA()])
    with caplog.at_level(logging.WARNING, logger="backend_worker.engine"):
        engine = Engine.load(info)
    assert engine.attention is packed, caplog.text
    assert engine.cost_model is CostModel.PACKED


def test_a_full_device_is_not_mistaken_for_an_unsupported_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Out of memory in the trial stops the load (another attention would not fit either)."""
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    model_dir = FAMILIES["bert-mean"](tmp_path / "bert")
    full = PackedVarlen(torch_varlen_kernel(out_of_memory))
    monkeypatch.setattr(engine_module, "attention_candidates",
                        lambda device, dtype: [full, PaddedSDPA()])
    with pytest.raises(torch.OutOfMemoryError):
        Engine.load(load_model_info(model_dir))
