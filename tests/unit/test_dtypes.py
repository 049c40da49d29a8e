"""The worker's default dtype per device and CPU, and which asked-for dtypes a CPU only
emulates (shared/dtypes.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.dtypes import cpu_flags, default_dtype, emulated_dtype


@pytest.mark.parametrize(
    ("device", "flags", "expected"),
    [
        ("cuda", frozenset(), "float16"),
        ("cpu", frozenset({"avx2", "amx_bf16", "amx_tile"}), "bfloat16"),  # Sapphire Rapids on
        ("cpu", frozenset({"avx2", "avx512f", "avx512_bf16"}), "bfloat16"),  # Zen 4, Cooper Lake
        ("cpu", frozenset({"avx2", "avx512f"}), "float32"),  # bf16 would be emulated: slower
        ("cpu", frozenset(), "float32"),
        ("mps", frozenset({"amx_bf16"}), "float32"),
    ],
)
def test_default_dtype(device: str, flags: frozenset[str], expected: str) -> None:
    assert default_dtype(device, flags) == expected


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_a_static_model_defaults_to_float32_everywhere(device: str) -> None:
    """A gather and a mean gain nothing from reduced precision; float32 is sentence-transformers'
    arithmetic (where any other family's default is float16 or bfloat16)."""
    assert default_dtype(device, frozenset({"amx_bf16"}), model_type="bert") != "float32"
    assert default_dtype(device, frozenset({"amx_bf16"}), model_type="static_embedding") == (
        "float32")


@pytest.mark.parametrize("model_type", ["t5", "mt5", "gemma2", "gemma3_text"])
def test_families_that_overflow_float16_default_to_bfloat16_on_cuda(model_type: str) -> None:
    """T5's and Gemma's activations overflow float16; bfloat16 has float32's range. On a CPU the
    rule is every family's."""
    assert default_dtype("cuda", frozenset(), model_type=model_type) == "bfloat16"
    assert default_dtype("cuda", frozenset(), model_type="bert") == "float16"
    assert default_dtype("cpu", frozenset(), model_type=model_type) == "float32"
    assert default_dtype("cpu", frozenset({"amx_bf16"}), model_type=model_type) == "bfloat16"


def test_cpu_flags_reads_the_flags_line(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse avx512_bf16 amx_bf16\n"
                       "bugs\t\t: spectre\n\nprocessor\t: 1\nflags\t\t: fpu sse\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse", "avx512_bf16", "amx_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize(
    ("device", "dtype", "flags", "emulated"),
    [
        ("cpu", "bfloat16", frozenset({"avx2", "fma"}), True),  # an AVX2-only EPYC
        ("cpu", "bfloat16", frozenset({"avx512f", "avx512_bf16"}), False),
        ("cpu", "bfloat16", frozenset({"amx_bf16"}), False),
        ("cpu", "float16", frozenset({"amx_bf16", "avx512_bf16"}), True),
        ("cpu", "float16", frozenset({"amx_fp16"}), False),
        ("cpu", "float32", frozenset(), False),
        ("cuda", "bfloat16", frozenset(), False),  # the GPU's business, not the CPU's flags
    ],
)
def test_emulated_dtype(device: str, dtype: str, flags: frozenset[str], emulated: bool) -> None:
    assert emulated_dtype(device, dtype, flags) is emulated
