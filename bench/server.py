"""The server under test: the real `embedserve` command on a free loopback port.

Also reads what /proc says about it: the router's own RSS, and the CPU time of the router, of
the workers and of the tokenizer pool, so a table can show where the cores went; and what its
/metrics say about where a request's time went inside the server.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shared.process import terminate

# The installed console script, or the package itself from a source checkout (the GPU host runs
# the repository from PYTHONPATH without installing it).
_SCRIPT = Path(sys.executable).with_name("embedserve")
EMBEDSERVE = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "router"]
_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    # NOTE: the command name (field 2) may contain spaces and parentheses; split after it.
    return raw[raw.rindex(")") + 2:].split()


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(_stat_fields(int(entry))[1])
            except (OSError, ValueError, IndexError):
                continue  # exited while we looked
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process (its threads included, its children not)."""
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds of the router process, of the backend workers, and of the whole tree; the
    rest of the tree is the tokenizer pool (plus multiprocessing's idle resource tracker)."""

    router_s: float
    workers_s: float
    tree_s: float

    @property
    def tokenizers_s(self) -> float:
        return self.tree_s - self.router_s - self.workers_s

    def __sub__(self, other: CpuSnapshot) -> CpuSnapshot:
        return CpuSnapshot(self.router_s - other.router_s, self.workers_s - other.workers_s,
                           self.tree_s - other.tree_s)


# The server's own duration histograms (TEI's names) whose means split a request's time.
_STAGES = {
    "total": "te_request_duration",
    "tokenize": "te_request_tokenization_duration",
    "queue": "te_request_queue_duration",
    "trip": "te_request_inference_duration",
    "compute": "te_batch_inference_duration",
}


@dataclass(frozen=True)
class StageSnapshot:
    """Sums and counts of the server's duration histograms, by stage name (_STAGES)."""

    sums: dict[str, float]
    counts: dict[str, float]

    @classmethod
    def parse(cls, exposition: str) -> StageSnapshot:
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        wanted = {metric: stage for stage, metric in _STAGES.items()}
        for line in exposition.splitlines():
            name, _, value = line.partition(" ")
            for suffix, into in (("_sum", sums), ("_count", counts)):
                stage = wanted.get(name.removesuffix(suffix)) if name.endswith(suffix) else None
                if stage is not None:
                    into[stage] = float(value)
        return cls(sums, counts)

    def __sub__(self, other: StageSnapshot) -> StageSnapshot:
        return StageSnapshot(
            {k: v - other.sums.get(k, 0.0) for k, v in self.sums.items()},
            {k: v - other.counts.get(k, 0.0) for k, v in self.counts.items()},
        )

    def mean_ms(self, stage: str) -> float | None:
        count = self.counts.get(stage, 0.0)
        return 1e3 * self.sums[stage] / count if count else None


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: everything but idle and iowait).

    Busy time minus what the server, the client and the baseline used is other load on the
    machine: a run that shared its cores with someone else says so instead of looking slow.
    """
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    # NOTE: steal (field 8) is the hypervisor's, not a process in this machine: left out.
    return (user + nice + system + irq + softirq) / _TICKS


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class ServerProcess:
    """A server command on a free loopback port with its output in a log file: started, waited
    on until /health answers 200, stopped with SIGTERM. embedserve, and the servers it is
    compared with (bench/peers.py), are run the same way."""

    name = "server"  # in messages and in the log file's name

    def __init__(self, args_on: Callable[[int], list[str]],
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.args = args_on(self.port)
        self.log_path = Path(tempfile.mkstemp(prefix=f"{self.name.lower()}-bench-",
                                              suffix=".log")[1])
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
            )

    def _get(self, path: str) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_healthy(self, timeout_s: float = 300) -> float:
        """Seconds until /health answered 200; raises with the log tail on exit or timeout."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                if self._get("/health")[0] == 200:
                    return time.monotonic() - t0
            except OSError:
                pass  # port not open yet
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not healthy after {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM, as an orchestrator would; SIGKILL only if it does not exit in time."""
        return terminate(self.process, timeout_s)


class Server(ServerProcess):
    """`embedserve --hostname 127.0.0.1 --port P --model-id M --device D EXTRA...`."""

    name = "embedserve"  # gpu_check.sh collects /tmp/embedserve-bench-*.log

    def __init__(self, model_dir: str, device: str, extra_args: list[str]) -> None:
        super().__init__(lambda port: [*EMBEDSERVE, "--hostname", "127.0.0.1", "--port",
                                       str(port), "--model-id", model_dir, "--device", device,
                                       *extra_args])

    def info(self) -> bytes:
        return self._get("/info")[1]

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in json.loads(self.info()).get("workers", []) if w.get("pid")]

    def cpu(self) -> CpuSnapshot:
        pid = self.process.pid
        return CpuSnapshot(cpu_seconds(pid), sum(cpu_seconds(p) for p in self.worker_pids()),
                           sum(cpu_seconds(p) for p in descendants(pid)))

    def stages(self) -> StageSnapshot:
        status, body = self._get("/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return StageSnapshot.parse(body.decode())

    def router_rss_kib(self) -> int:
        return rss_kib(self.process.pid)

    def log_problems(self) -> list[str]:
        """Log lines that say WARNING, ERROR or Traceback: worth a look after a run."""
        text = self.log_path.read_text(errors="replace")
        return [line for line in text.splitlines()
                if any(word in line for word in ("WARNING", "ERROR", "Traceback", "CRITICAL"))]
