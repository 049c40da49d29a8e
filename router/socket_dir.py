"""The directory of the router<->worker sockets: made beside --uds-path at start, removed on
every way out; and those left by routers that could not remove theirs (SIGKILL, a crash)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from shared.errors import ConfigError

log = logging.getLogger("embedserve")

# The open directories this process's socket directories are locked through: held for its
# lifetime (the kernel lets go of the lock when the process ends, however it ends).
_held: list[int] = []


def socket_dir(uds_path: str) -> str:
    """A new directory for the router<->worker sockets beside --uds-path; where none can be made
    there, in the system's temporary directory. (TEI reads --uds-path only for its Python
    backend, so TEI deployments may pass any path.) Its name carries the router's pid, so a
    later router can tell whether it is still in use (remove_stale), and it is locked while
    this process lives."""
    name = Path(uds_path).name
    prefix = f"{name}-{os.getpid()}-"
    try:
        remove_stale(Path(uds_path).parent, name)
        return _made_and_held(prefix, str(Path(uds_path).parent))
    except OSError as exc:
        log.warning("--uds-path %s: cannot make the socket directory beside it (%s); using %s",
                    uds_path, exc.strerror, tempfile.gettempdir())
    try:
        remove_stale(Path(tempfile.gettempdir()), name)
        return _made_and_held(prefix, tempfile.gettempdir())
    except OSError as exc:
        raise ConfigError(f"no directory for the worker sockets can be made beside --uds-path "
                          f"{uds_path} nor in {tempfile.gettempdir()} ({exc.strerror}): set "
                          "--uds-path to a path in a writable directory") from None


def _made_and_held(prefix: str, parent: str) -> str:
    """Made under a hidden name, locked, then named: no other router can see it unlocked."""
    hidden = tempfile.mkdtemp(prefix=f".{prefix}", dir=parent)
    fd = os.open(hidden, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):  # a filesystem without locks: the pid alone then
            fcntl.flock(fd, fcntl.LOCK_SH)  # tells (remove_stale), as it did before the lock
        path = os.path.join(os.path.dirname(hidden), os.path.basename(hidden)[1:])
        os.rename(hidden, path)
    except OSError:
        os.close(fd)
        shutil.rmtree(hidden, ignore_errors=True)
        raise
    _held.append(fd)
    return path


def remove_stale(parent: Path, name: str) -> None:
    """Remove the socket directories in `parent` (ours: this user's, named `name-PID-...`)
    whose router has exited without removing it. Only a SIGKILL or a crash leaves one, but a
    host whose routers are killed now and then (a test suite, an OOM killer) would otherwise
    gather them for ever. A pid now reused by another process keeps its directory: harmless.
    The pid alone does not decide: a router in another pid namespace (another container
    sharing the directory) has a pid that means nothing here, so a directory still locked is
    kept. Never raises: what cannot be looked at is left alone."""
    # The suffix exactly as mkdtemp makes it (8 of [a-z0-9_]), no more: with any suffix, the
    # directory `x-5-PID-abcd1234` of a live router of --uds-path .../x-5 would read as one of
    # .../x made by pid 5. (Should mkdtemp's names change, nothing matches: nothing removed.)
    pattern = re.compile(rf"{re.escape(name)}-(\d+)-[a-z0-9_]{{8}}")
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if found and not _alive(int(found[1])):  # (this process's own pid is alive)
            try:
                _remove_if_unlocked(entry)
            except OSError:  # gone meanwhile (another router removed it), or not ours to see
                continue


def _remove_if_unlocked(entry: Path) -> None:
    # O_NOFOLLOW: a symlink is not followed (open fails); fstat: the uid of what was opened.
    fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        if os.fstat(fd).st_uid != os.getuid():
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its router lives (in another pid namespace)
            return
        shutil.rmtree(entry, ignore_errors=True)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
