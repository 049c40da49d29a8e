"""Child processes: the prologue by which a child of the router never outlives it nor stops
before it is told, and how a harness (tests, bench) stops a server it started."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess

_PR_SET_PDEATHSIG = 1

# How the router tells a worker to stop (it finishes the batches it holds, then exits).
STOP_SIGNAL = signal.SIGUSR1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: callers also poll os.getppid()
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def supervised_child(parent_pid: int) -> None:
    """The prologue of the router's children (workers, tokenizer processes). They ignore the
    signals that a supervisor (`kill -- -PGID`, `timeout`, systemd's KillMode=control-group) or
    a closed terminal sends the whole process group: the router gets them too, drains its
    requests, then stops its children itself (STOP_SIGNAL, SIGKILL). And they die with it."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(parent_pid)


def terminate(process: subprocess.Popen, timeout: float) -> int:
    """SIGTERM, as an orchestrator stops a server; SIGKILL only if it has not exited within
    `timeout` seconds. Its exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
