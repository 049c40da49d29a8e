"""Run the real `embedserve` command as a subprocess on a free port, for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import httpx

from shared.process import die_with_parent, terminate
from tests.fixtures.prometheus import samples

EMBEDSERVE = str(Path(sys.executable).with_name("embedserve"))
# Where the project is not installed (the GPU host runs the checkout from PYTHONPATH), the
# package's __main__ is the same command.
COMMAND = [EMBEDSERVE] if Path(EMBEDSERVE).exists() else [sys.executable, "-m", "router"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Past the server's own bound: after --shutdown-grace (30 s) it closes what connections are left
# by force and exits 0, which a 30 s timeout here would race with a SIGKILL.
STOP_TIMEOUT_S = 45.0


class Server:
    """`dtype`: the tests compare against float32 oracles (sentence-transformers, transformers)
    at float32 tolerances, so a server runs float32 unless the test passes another dtype, or
    None for the server's own default (bfloat16 on a CPU with native bfloat16,
    shared/dtypes.py). A `--dtype` among `args` wins."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 log_path: Path | None = None, dtype: str | None = "float32",
                 own_group: bool = False) -> None:
        if dtype is not None and not any(a == "--dtype" or a.startswith("--dtype=")
                                         for a in args):
            args = (*args, "--dtype", dtype)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [*COMMAND, "--hostname", "127.0.0.1", "--port", str(self.port), *args],
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
            stdout=self._log, stderr=subprocess.STDOUT,
            # A test run that dies (timeout, Ctrl-C) must not leave servers behind.
            preexec_fn=partial(die_with_parent, os.getpid()),
            # `own_group`: a session (and process group) of its own, which a test can signal
            # as a whole, as systemd or `kill -- -PGID` do.
            start_new_session=own_group,
        )
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def wait_healthy(self, timeout: float = 180) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"embedserve exited with {self.process.returncode}:\n"
                                   f"{self.log()}")
            try:
                if self.client.get("/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"embedserve not healthy after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def metrics(self) -> dict[str, float]:
        """/metrics as `samples`."""
        return samples(self.client.get("/metrics").text)

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.client.get("/info").json()["workers"]]

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        code = terminate(self.process, timeout)
        self.client.close()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return code


def gone(pid: int) -> bool:
    """Whether process `pid` has exited (and been reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_for(predicate, timeout: float = 60, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


@contextmanager
def serving(*args: str, log_path: Path, env: dict[str, str] | None = None,
            dtype: str | None = "float32") -> Iterator[Server]:
    """A healthy server for the block; on the way out it must stop cleanly (exit status 0)."""
    srv = Server(*args, env=env, log_path=log_path, dtype=dtype).wait_healthy()
    try:
        yield srv
    finally:
        started = time.monotonic()
        code = srv.stop()
        took = time.monotonic() - started
    # The log says how far the shutdown got.
    assert code == 0, f"exit status {code} {took:.1f} s after SIGTERM\n{srv.log()}"
    if took > 10:  # idle connections close at once: a forced close of a stuck one is a finding
        warnings.warn(f"embedserve took {took:.0f} s to stop:\n{srv.log()[-3000:]}",
                      stacklevel=2)
