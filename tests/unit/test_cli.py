"""The command's own helpers (the rest of `embedserve` is exercised end to end in tests/e2e)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pytest

from router.cli import socket_dir
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
