"""bench/report.py: the facts a RESULTS.md entry carries."""

from __future__ import annotations

import subprocess

import pytest

from bench import report


def test_the_commit_comes_from_the_environment_without_git_history(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU host runs a copy of the working tree without .git (bench/gpu_prepare.sh records
    the commit, bench/gpu_check.sh exports it)."""
    def no_history(*args: object, **kwargs: object) -> None:
        raise subprocess.CalledProcessError(128, "git")

    monkeypatch.setattr(report.subprocess, "run", no_history)
    monkeypatch.delenv("EMBEDSERVE_COMMIT", raising=False)
    assert report.git_commit() == "unknown"
    monkeypatch.setenv("EMBEDSERVE_COMMIT", "abc1234+dirty")
    assert report.git_commit() == "abc1234+dirty"
