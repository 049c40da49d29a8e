"""Worker placement: which device each worker process gets."""

from __future__ import annotations

import subprocess
import sys

import pytest

from router import devices
from shared.config import parse_config
from shared.errors import ConfigError


def plan(argv: list[str], gpus: int, monkeypatch) -> list[str]:
    monkeypatch.setattr(devices, "cuda_device_count", lambda: gpus)
    return devices.worker_devices(parse_config(argv, {}))


def test_auto_without_gpus_is_one_cpu_worker(monkeypatch):
    assert plan([], 0, monkeypatch) == ["cpu"]


def test_cpu_workers_per_device(monkeypatch):
    assert plan(["--workers-per-device", "3"], 0, monkeypatch) == ["cpu"] * 3
    assert plan(["--device", "cpu", "--workers-per-device", "2"], 4, monkeypatch) == ["cpu"] * 2


def test_auto_with_gpus_is_one_worker_per_gpu(monkeypatch):
    assert plan([], 2, monkeypatch) == ["cuda:0", "cuda:1"]
    assert plan(["--workers-per-device", "2"], 2, monkeypatch) == [
        "cuda:0", "cuda:0", "cuda:1", "cuda:1"]


def test_devices_selects_gpus(monkeypatch):
    assert plan(["--devices", "1,3"], 4, monkeypatch) == ["cuda:1", "cuda:3"]


def test_device_id_selects_one_gpu_as_in_tei(monkeypatch, caplog):
    assert plan(["--device-id", "1"], 4, monkeypatch) == ["cuda:1"]
    assert plan([], 4, monkeypatch) == [f"cuda:{i}" for i in range(4)]
    # TEI's CPU images ignore it: the same command line serves on a host without a GPU.
    with caplog.at_level("WARNING"):
        assert plan(["--device-id", "0"], 0, monkeypatch) == ["cpu"]
    assert "--device-id 0 ignored" in caplog.text


@pytest.mark.parametrize(("argv", "gpus", "match"), [
    (["--devices", "2"], 2, "only 2 CUDA devices"),
    (["--device", "cuda"], 0, "no CUDA device"),
    (["--devices", "0"], 0, "no CUDA device"),
    (["--device-id", "2"], 2, "--device-id 2: only 2 CUDA devices"),
    pytest.param(["--device", "mps"], 0, "only on macOS",
                 marks=pytest.mark.skipif(sys.platform == "darwin", reason="MPS may exist")),
])
def test_impossible_placements(monkeypatch, argv, gpus, match):
    with pytest.raises(ConfigError, match=match):
        plan(argv, gpus, monkeypatch)


@pytest.mark.parametrize("argv", [["--device", "cpu", "--devices", "0"],
                                  ["--devices", "a,b"], ["--workers-per-device", "0"],
                                  ["--device-id", "0", "--devices", "0"], ["--device-id", "-1"],
                                  ["--device", "cpu", "--device-id", "0"]])
def test_bad_flags(argv):
    with pytest.raises(ConfigError):
        parse_config(argv, {})


@pytest.fixture(autouse=True)
def no_cpu_limit(monkeypatch, tmp_path):
    """The machine's own cgroup limit (a CI container's) must not change the counts below."""
    monkeypatch.setattr(devices, "CGROUP_ROOT", tmp_path / "cgroup")


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "max 100000\n"}, 16),
    ({"cpu.max": "400000 100000\n"}, 4),
    ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: two threads, each busy 3/4 of the time
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 16),
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
    ({"cpu.max": "6400000 100000\n"}, 16),  # a limit above the cores: the cores
])
def test_a_cgroup_cpu_limit_caps_the_cores(monkeypatch, tmp_path, files, expected):
    # A Kubernetes limits.cpu or docker --cpus: threads sized by the node's cores would be
    # throttled most of each period.
    for name, text in files.items():
        path = devices.CGROUP_ROOT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert devices.cpu_threads_per_worker(1) == expected


def test_cores_are_split_between_cpu_workers(monkeypatch):
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert devices.cpu_threads_per_worker(1) == 4
    assert devices.cpu_threads_per_worker(2) == 2
    assert devices.cpu_threads_per_worker(8) == 1


@pytest.mark.parametrize(("cores", "placed", "expected"), [
    (2, ["cpu"], 2),
    (16, ["cpu"], 4),  # CPU workers compute on every core: a few tokenizers keep up
    (16, ["cpu", "cpu"], 4),
    (16, ["cuda:0"], 12),  # the GPU outruns one tokenizer: up to 12 per GPU worker
    (16, ["cuda:0", "cuda:1"], 13),  # 16 cores - the router - two launch threads
    (128, ["cuda:0"] * 8, 96),
    (2, ["cuda:0"], 1),
    (4, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"], 1),
    (16, ["cuda:0", "cpu"], 4),  # any CPU worker computes on every core: still a few
])
def test_tokenizer_processes_follow_cores_and_devices(monkeypatch, cores, placed, expected):
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert devices.tokenizer_processes(parse_config([], {}), placed) == expected
    chosen = parse_config(["--tokenization-workers", "3"], {})
    assert devices.tokenizer_processes(chosen, placed) == 3


def test_no_nvidia_driver_means_no_probe(monkeypatch):
    monkeypatch.setattr(devices.Path, "is_dir", lambda self: False)
    monkeypatch.setattr(devices.Path, "exists", lambda self: False)
    monkeypatch.setattr(devices.subprocess, "run", lambda *a, **k: pytest.fail("probed"))
    assert devices.cuda_device_count() == 0


def test_the_probe_count_is_its_last_line(monkeypatch):
    # torch may print (a driver warning) before the count: only the last line is the count.
    monkeypatch.setattr(devices.Path, "is_dir", lambda self: True)
    monkeypatch.setattr(devices.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, stdout="CUDA initialization: a warning\n2\n", stderr=""))
    assert devices.cuda_device_count() == 2
