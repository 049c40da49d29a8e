"""Which devices the workers run on, decided without importing torch in the router."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

from shared.config import ServerConfig
from shared.errors import ConfigError

log = logging.getLogger(__name__)

_PROBE = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"


def cuda_device_count() -> int:
    """Visible CUDA devices. No NVIDIA driver: 0 at once; otherwise ask torch in a child
    process, which honours CUDA_VISIBLE_DEVICES and keeps CUDA out of the router."""
    if not (Path("/proc/driver/nvidia/gpus").is_dir() or Path("/dev/nvidia0").exists()):
        return 0
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                             timeout=120, check=True).stdout
        return int(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        log.warning("could not count CUDA devices (%s); using the CPU", exc)
        return 0


def worker_devices(config: ServerConfig) -> list[str]:
    """One entry per worker process: "cpu", "mps" or "cuda:N"."""
    device = config.device
    if device in ("auto", "cuda"):
        count = cuda_device_count()
        if count:
            if config.devices:
                indices, flag = [int(d) for d in config.devices.split(",")], "--devices"
            elif config.device_id is not None:
                indices, flag = [config.device_id], "--device-id"
            else:
                indices, flag = list(range(count)), ""
            if max(indices) >= count:
                raise ConfigError(f"{flag} {','.join(map(str, indices))}: only {count} CUDA "
                                  "devices are visible")
            return [f"cuda:{i}" for i in indices for _ in range(config.workers_per_device)]
        if device == "cuda" or config.devices is not None:
            raise ConfigError("no CUDA device is visible (asked for by --device cuda or "
                              "--devices)")
        if config.device_id is not None:
            # TEI's CPU images take --device-id and ignore it: a command line written for a
            # GPU host still serves here.
            log.warning("--device-id %d ignored: no CUDA device is visible; serving on the CPU",
                        config.device_id)
        device = "cpu"
    if device == "mps" and sys.platform != "darwin":
        raise ConfigError(f"--device mps: Apple's Metal backend exists only on macOS, not on "
                          f"{sys.platform}")
    return [device] * config.workers_per_device


# Where a CPU limit shows: cgroup v2's `cpu.max` ("max 100000", or "400000 100000" for 4 CPUs),
# else cgroup v1's quota and period (-1: none).
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_cpus() -> int | None:
    """The CPUs a cgroup limit grants (a container's `--cpus`, a Kubernetes `limits.cpu`),
    rounded up; None without a limit. A limit caps the time used, not the cores seen: sized by
    the cores instead, the threads of a pod limited to 4 CPUs on a 64-core node would be
    throttled most of each period."""
    try:
        quota, period = (CGROUP_ROOT / "cpu.max").read_text().split()[:2]
        if quota == "max":
            return None
    except (OSError, ValueError):
        try:
            quota = (CGROUP_ROOT / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (CGROUP_ROOT / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        granted = int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None
    return math.ceil(granted) if granted > 0 else None


def _cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    limit = _cgroup_cpus()
    return max(1, min(cores or 1, limit or cores or 1))


def cpu_threads_per_worker(workers: int) -> int:
    """Split the cores the process may use between CPU workers (at least one thread each)."""
    return max(1, _cores() // workers)


# Tokenizer processes per GPU worker, at most. A GPU worker with a base-sized model consumes
# ~1.5M tokens/s (packed float16 forward, bge-base shape, one H100). One process tokenizes
# ~0.45M tokens/s on the 2-core development machine, but encode_batch on all 16 cores of the
# H100 host reaches only 2.4-2.8M: ~0.17M per core, so 12 processes there give ~2M where 8
# would give ~1.4M, too close to the GPU's rate. An idle pool process costs ~65 MB and no CPU.
_TOKENIZERS_PER_GPU = 12
# With CPU workers the tokenizers take cores from the model: a few keep up with it.
_TOKENIZERS_WITH_CPU_WORKERS = 4


def tokenizer_processes(config: ServerConfig, devices: list[str]) -> int:
    """Tokenizer processes: --tokenization-workers, or what the workers leave of the cores.

    A GPU worker needs one core to launch kernels and the router one for HTTP; the rest can
    tokenize, and must, since the GPU embeds faster than one process tokenizes. CPU workers
    compute on every core, so tokenizers there are kept few.
    """
    if config.tokenization_workers is not None:
        return config.tokenization_workers
    cores = _cores()
    gpu_workers = sum(d.startswith("cuda") for d in devices)
    if gpu_workers < len(devices) or not gpu_workers:
        return max(1, min(cores, _TOKENIZERS_WITH_CPU_WORKERS))
    return max(1, min(cores - 1 - gpu_workers, _TOKENIZERS_PER_GPU * gpu_workers))
