"""The compute dtype when `--dtype` is not given, decided from the worker's device (the worker
chooses; the router says the same in /info before the workers are up).

- CUDA: float16, as TEI (tensor cores; cosine >= 0.999 against the float32 oracle); bfloat16
  for T5 encoders, whose activations overflow float16's range (T5 was trained in bfloat16).
- CPU with native bfloat16 matmul (AMX-BF16 or AVX512-BF16, read from /proc/cpuinfo): bfloat16.
  Measured on the 2-core development machine (bench/RESULTS.md): 2.8x the float32 corpus
  throughput and 0.6x its one-query latency, at cosine >= 0.9998 against the float32 oracle,
  the same order of precision users accept from float16 on a GPU. float32 weights are also
  read from memory twice over per token, which is what bounds a short query's latency.
- Any other CPU, MPS: float32 (emulated bfloat16 is slower than float32 there).
- A static model (StaticEmbedding), anywhere: float32.
`--dtype float32` always gives sentence-transformers' numbers exactly.
"""

from __future__ import annotations

import functools
from pathlib import Path

from shared.static_embedding import STATIC_MODEL_TYPE

# /proc/cpuinfo flags under which torch's CPU matmul runs bfloat16 natively (oneDNN kernels).
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


# Model types whose float16 activations overflow: T5's, and Gemma's (trained in bfloat16;
# EmbeddingGemma's model card rules float16 out). Tensor cores run bfloat16 as fast.
BFLOAT16_ON_CUDA = frozenset({"t5", "mt5", "gemma2", "gemma3_text"})


@functools.cache  # a worker asks twice at start (default_dtype, then emulated_dtype)
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo does not exist or says nothing)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def default_dtype(device_type: str, flags: frozenset[str] | None = None, *,
                  model_type: str = "") -> str:
    if model_type == STATIC_MODEL_TYPE:
        # A static model is a gather and a mean: nothing for reduced precision to speed up,
        # and float32 is what sentence-transformers averages in.
        return "float32"
    if device_type == "cuda":
        return "bfloat16" if model_type in BFLOAT16_ON_CUDA else "float16"
    if device_type == "cpu":
        flags = cpu_flags() if flags is None else flags
        if flags & NATIVE_BF16_FLAGS:
            return "bfloat16"
    return "float32"


# float16 runs natively on CPUs with AMX-FP16 or AVX512-FP16 (oneDNN); elsewhere torch emulates it.
NATIVE_FP16_FLAGS = frozenset({"amx_fp16", "avx512_fp16"})


def emulated_dtype(device_type: str, dtype: str, flags: frozenset[str] | None = None) -> bool:
    """Whether a CPU computes `dtype` without native matmul: asked for by --dtype, it still runs,
    but on the AVX2-only EPYC of bench/RESULTS.md (2026-12-06 07:05) all-MiniLM-L6-v2 ran 10x
    slower in bfloat16 and 11x in float16 than in float32 (one query: 334 and 225 ms vs 7)."""
    native = {"bfloat16": NATIVE_BF16_FLAGS, "float16": NATIVE_FP16_FLAGS}.get(dtype)
    if device_type != "cpu" or native is None:
        return False
    return not (cpu_flags() if flags is None else flags) & native
