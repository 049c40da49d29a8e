"""The compute dtype when `--dtype` is not given, decided from the worker's device (the worker
chooses; the router says the same in /info before the workers are up).

- CUDA: float16, as TEI (tensor cores; cosine >= 0.999 against the float32 oracle).
- CPU with native bfloat16 matmul (AMX-BF16 or AVX512-BF16, read from /proc/cpuinfo): bfloat16.
  Measured on the 2-core development machine (bench/RESULTS.md): 2.8x the float32 corpus
  throughput and 0.6x its one-query latency, at cosine >= 0.9998 against the float32 oracle,
  the same order of precision users accept from float16 on a GPU. float32 weights are also
  read from memory twice over per token, which is what bounds a short query's latency.
- Any other CPU, MPS: float32 (emulated bfloat16 is slower than float32 there).
`--dtype float32` always gives sentence-transformers' numbers exactly.
"""

from __future__ import annotations

from pathlib import Path

# /proc/cpuinfo flags under which torch's CPU matmul runs bfloat16 natively (oneDNN kernels).
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


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


def default_dtype(device_type: str, flags: frozenset[str] | None = None) -> str:
    if device_type == "cuda":
        return "float16"
    if device_type == "cpu":
        flags = cpu_flags() if flags is None else flags
        if flags & NATIVE_BF16_FLAGS:
            return "bfloat16"
    return "float32"
