"""The directory of the router<->worker sockets: made beside --uds-path at start, removed on
every way out; and those left by routers that could not remove theirs (SIGKILL, a crash)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from shared.errors import ConfigError

log = logging.getLogger("embedserve")


def socket_dir(uds_path: str) -> str:
    """A new directory for the router<->worker sockets beside --uds-path; where none can be made
    there, in the system's temporary directory. (TEI reads --uds-path only for its Python
    backend, so TEI deployments may pass any path.) Its name carries the router's pid, so a
    later router can tell whether it is still in use (remove_stale)."""
    name = Path(uds_path).name
    prefix = f"{name}-{os.getpid()}-"
    try:
        remove_stale(Path(uds_path).parent, name)
        return tempfile.mkdtemp(prefix=prefix, dir=str(Path(uds_path).parent))
    except OSError as exc:
        log.warning("--uds-path %s: cannot make the socket directory beside it (%s); using %s",
                    uds_path, exc.strerror, tempfile.gettempdir())
    try:
        remove_stale(Path(tempfile.gettempdir()), name)
        return tempfile.mkdtemp(prefix=prefix)
    except OSError as exc:
        raise ConfigError(f"no directory for the worker sockets can be made beside --uds-path "
                          f"{uds_path} nor in {tempfile.gettempdir()} ({exc.strerror}): set "
                          "--uds-path to a path in a writable directory") from None


def remove_stale(parent: Path, name: str) -> None:
    """Remove the socket directories in `parent` (ours: this user's, named `name-PID-...`)
    whose router has exited without removing it. Only a SIGKILL or a crash leaves one, but a
    host whose routers are killed now and then (a test suite, an OOM killer) would otherwise
    gather them for ever. A pid now reused by another process keeps its directory: harmless."""
    # The suffix exactly as mkdtemp makes it (8 of [a-z0-9_]), no more: with any suffix, the
    # directory `x-5-PID-abcd1234` of a live router of --uds-path .../x-5 would read as one of
    # .../x made by pid 5. (Should mkdtemp's names change, nothing matches: nothing removed.)
    pattern = re.compile(rf"{re.escape(name)}-(\d+)-[a-z0-9_]{{8}}")
    for entry in parent.iterdir():
        found = pattern.fullmatch(entry.name)
        if (found and int(found[1]) != os.getpid() and not _alive(int(found[1]))
                and entry.is_dir() and not entry.is_symlink()
                and entry.stat().st_uid == os.getuid()):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
