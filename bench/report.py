"""The results table: markdown for the terminal and for bench/RESULTS.md, with its provenance.

Absolute numbers on a shared machine move from run to run; the ratio against the baseline
measured in the same invocation is the number to compare across runs and commits.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Row:
    """One line of the table; numbers already formatted, '' where a column does not apply."""

    what: str
    concurrency: str
    requests: str
    errors: str
    throughput: str
    p50_ms: str
    p99_ms: str
    vs_baseline: str
    client_cpu: str
    server_cpu: str
    server_ms: str
    other_cpu: str


_HEADERS = ("what", "in flight", "requests", "errors", "throughput", "p50 ms", "p99 ms",
            "vs baseline", "client CPU", "server CPU (router / tokenizers / workers)",
            "server ms, means (request: tokenize / queue / round trip to the worker; "
            "worker compute per batch)", "other load")


def ms(seconds: float) -> str:
    """Milliseconds; to 0.01 ms below 10 ms, where a 2.5 ms target and the run-to-run change of a
    short query's latency (~0.3 ms) are a few tenths."""
    value = seconds * 1e3
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def rate(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:,.1f} {unit}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def gpu_model() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
    return ", ".join(names) or None


def git_commit() -> str:
    """The checkout's commit, +dirty with changes; EMBEDSERVE_COMMIT where there is no git
    history (the GPU host gets a copy of the working tree without .git: bench/gpu_prepare.sh
    records it)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        # Untracked files count (new code is a change); the results file itself does not,
        # or every run after the first would call itself dirty.
        dirty = bool(git("status", "--porcelain", "--", ".", ":!bench/RESULTS.md"))
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("EMBEDSERVE_COMMIT") or "unknown"
    return commit + ("+dirty" if dirty else "")


def machine(device: str) -> str:
    text = f"{cpu_model()}, {os.cpu_count()} cores"
    if device.startswith("cuda"):
        text += f"; GPU: {gpu_model() or 'unknown'}"
    return text


def render(title: str, facts: list[tuple[str, str]], rows: list[Row], notes: list[str]) -> str:
    lines = [f"## {title}", ""]
    lines += [f"- {name}: {value}" for name, value in facts]
    lines += ["", "| " + " | ".join(_HEADERS) + " |",
              "|" + "|".join("---" for _ in _HEADERS) + "|"]
    for row in rows:
        cells = (row.what, row.concurrency, row.requests, row.errors, row.throughput, row.p50_ms,
                 row.p99_ms, row.vs_baseline, row.client_cpu, row.server_cpu, row.server_ms,
                 row.other_cpu)
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines.append("")
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def title_now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def command_line(argv: list[str], module: str = "bench.run") -> str:
    """The command as it can be re-run: the interpreter relative to the checkout when it is the
    project's venv, else as it was (the GPU host runs its own Python)."""
    python = Path(sys.executable)
    try:
        shown = str(python.relative_to(REPO))
    except ValueError:
        shown = str(python)
    return shlex.join([shown, "-m", module, *argv])


def append(path: Path, text: str) -> None:
    new = not path.exists()
    with path.open("a", encoding="utf-8") as f:
        if new:
            f.write("# Benchmark results\n\nAppended by `python -m bench.run` (and "
                    "`bench.rerank`); newest last. Compare runs by their ratios against the "
                    "baseline of the same run.\n")
        f.write("\n" + text)
