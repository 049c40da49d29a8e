"""The command's own helpers (the rest of `embedserve` is exercised end to end in tests/e2e)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pytest

from router.socket_dir import socket_dir
from shared.errors import ConfigError


def test_the_socket_directory_is_made_beside_the_uds_path(tmp_path: Path) -> None:
    made = Path(socket_dir(str(tmp_path / "tei-server")))
    assert made.parent == tmp_path and made.name.startswith("tei-server-") and made.is_dir()


def test_an_unusable_uds_path_falls_back_to_the_temporary_directory(
        tmp_path: Path, caplog) -> None:
    # TEI ignores --uds-path outside its Python backend: a deployment may pass any path.
    with caplog.at_level(logging.WARNING):
        made = Path(socket_dir(str(tmp_path / "missing" / "tei-server")))
    try:
        assert made.parent == Path(tempfile.gettempdir()) and made.is_dir()
        assert "cannot make the socket directory" in caplog.text
    finally:
        made.rmdir()


def test_no_writable_directory_at_all_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="set --uds-path to a path in a writable directory"):
        socket_dir(str(tmp_path / "missing" / "tei-server"))


def test_socket_directories_of_exited_routers_are_removed(tmp_path: Path) -> None:
    # A SIGKILLed router cannot remove its socket directory: the next one started beside it
    # removes those whose router is gone, and no other.
    import os
    import subprocess
    import sys

    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    stale = tmp_path / f"tei-server-{exited.pid}-abc12345"
    stale.mkdir()
    (stale / "workers.sock").touch()
    kept = [tmp_path / f"tei-server-{os.getppid()}-def45678",  # a live router's
            tmp_path / "tei-server-k2j3h4",  # named before the pid was part of the name
            tmp_path / f"other-{exited.pid}-abc12345"]  # not a socket directory of this path
    for path in kept:
        path.mkdir()
    not_a_directory = tmp_path / f"tei-server-{exited.pid}-file1234"
    not_a_directory.touch()
    made = Path(socket_dir(str(tmp_path / "tei-server")))
    assert made.name.startswith(f"tei-server-{os.getpid()}-")
    assert not stale.exists()
    assert all(path.is_dir() for path in kept) and not_a_directory.is_file()


def test_a_live_router_of_a_longer_uds_path_keeps_its_socket_directory(tmp_path: Path) -> None:
    # --uds-path .../tei-server-N makes `tei-server-N-PID-XXXXXXXX`: to a router of
    # .../tei-server that name reads `tei-server-` + pid N + a suffix, and pid N may well have
    # exited. The directory is a live router's all the same.
    import os
    import subprocess
    import sys

    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    other = Path(socket_dir(str(tmp_path / f"tei-server-{exited.pid}")))
    assert other.name.startswith(f"tei-server-{exited.pid}-{os.getpid()}-")
    socket_dir(str(tmp_path / "tei-server"))
    assert other.is_dir()


def test_a_socket_directory_still_locked_is_kept_whatever_its_pid(tmp_path: Path) -> None:
    # A router in another pid namespace (another container sharing /tmp): its pid is dead
    # here, or another process's, but the directory is in use and its lock says so.
    import fcntl
    import os
    import subprocess
    import sys

    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    live = tmp_path / f"tei-server-{exited.pid}-abc12345"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # as its router holds it
        socket_dir(str(tmp_path / "tei-server"))
        assert live.is_dir()
    finally:
        os.close(fd)
    socket_dir(str(tmp_path / "tei-server"))  # its router gone: removed
    assert not live.exists()


def test_a_socket_directory_is_locked_from_the_moment_others_can_see_it(tmp_path: Path) -> None:
    import fcntl
    import os

    made = socket_dir(str(tmp_path / "tei-server"))
    assert [path.name for path in tmp_path.iterdir()] == [Path(made).name]
    fd = os.open(made, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_a_symlink_or_a_vanished_entry_is_left_alone(tmp_path: Path, monkeypatch) -> None:
    import subprocess
    import sys

    from router import socket_dir as module

    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / f"tei-server-{exited.pid}-abc12345"
    link.symlink_to(target)
    gone = tmp_path / f"tei-server-{exited.pid}-gone1234"
    gone.mkdir()

    def vanishing(pid: int) -> bool:  # another router removes it meanwhile
        if gone.exists():
            gone.rmdir()
        return False

    monkeypatch.setattr(module, "_alive", vanishing)
    made = Path(socket_dir(str(tmp_path / "tei-server")))
    assert made.parent == tmp_path  # not a fallback to the temporary directory
    assert target.is_dir() and link.is_symlink()


def test_a_filesystem_without_locks_still_gets_its_socket_directory(
        tmp_path: Path, monkeypatch) -> None:
    import errno

    from router import socket_dir as module

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(module.fcntl, "flock", no_locks)
    made = Path(socket_dir(str(tmp_path / "tei-server")))
    assert made.parent == tmp_path and made.is_dir()
