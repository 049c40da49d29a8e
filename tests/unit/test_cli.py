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


def exited_pid() -> int:
    import subprocess
    import sys

    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    return exited.pid


def test_the_fallback_removes_the_stale_directories_of_the_temporary_directory(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    stale = tmp_path / "tmp" / f"tei-server-{exited_pid()}-abc12345"
    stale.mkdir()
    made = Path(socket_dir(str(tmp_path / "missing" / "tei-server")))
    assert made.parent == tmp_path / "tmp" and not stale.exists()


def test_another_users_or_a_live_pids_directory_is_kept(tmp_path: Path, monkeypatch) -> None:
    import os

    stale = tmp_path / f"tei-server-{exited_pid()}-abc12345"
    stale.mkdir()
    real_uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real_uid + 1)  # the directory is another user's
    socket_dir(str(tmp_path / "tei-server"))
    assert stale.is_dir()
    monkeypatch.setattr(os, "getuid", lambda: real_uid)

    def another_users(pid: int, signal: int) -> None:
        raise PermissionError  # a live process of another user

    monkeypatch.setattr(os, "kill", another_users)
    socket_dir(str(tmp_path / "tei-server"))
    assert stale.is_dir()


def test_an_unlistable_directory_is_left_alone(tmp_path: Path, monkeypatch) -> None:
    def unlistable(self: Path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "iterdir", unlistable)
    made = Path(socket_dir(str(tmp_path / "tei-server")))
    assert made.parent == tmp_path  # not a fallback to the temporary directory


def test_a_directory_that_cannot_be_named_leaves_nothing_behind(
        tmp_path: Path, monkeypatch) -> None:
    import os

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))

    def refused(source: str, destination: str) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "rename", refused)
    with pytest.raises(ConfigError):
        socket_dir(str(tmp_path / "tei-server"))
    assert [p.name for p in tmp_path.iterdir()] == ["tmp"]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_only_mkdtemps_eight_character_suffix_marks_a_socket_directory(tmp_path: Path) -> None:
    pid = exited_pid()
    others = [tmp_path / f"tei-server-{pid}-abc123456", tmp_path / f"tei-server-{pid}-abc1234"]
    for path in others:
        path.mkdir()
    socket_dir(str(tmp_path / "tei-server"))
    assert all(path.is_dir() for path in others)


def model_info(**fields):
    from shared.modelinfo import ModelInfo

    facts = {"model_dir": "/m", "config": {}, "model_type": "bert", "architectures": [],
             "hidden_size": 8, "vocab_size": 100, "max_input_length": 512, "position_offset": 0,
             "pooling": "last-token", "dense": [], "has_normalize": False,
             "prompts": {"query": "query: ", "doc": "doc: "}, "default_prompt_name": "doc"}
    return ModelInfo(**{**facts, **fields})


def test_the_models_limit_is_kept_up_to_the_batch_budget() -> None:
    from router.cli import max_input_length
    from shared.config import ServerConfig

    info = model_info(max_input_length=512)
    assert max_input_length(info, ServerConfig(max_batch_tokens=512, auto_truncate=False)) == 512
    assert max_input_length(info, ServerConfig(max_batch_tokens=511, auto_truncate=True)) == 511
    with pytest.raises(ConfigError) as refused:
        max_input_length(info, ServerConfig(max_batch_tokens=511, auto_truncate=False))
    assert str(refused.value).startswith(
        "The maximum input length is `512` which exceeds `--max-batch-tokens=511`.")


def test_the_files_truncation_side_holds_only_where_its_limit_is_the_limit() -> None:
    # A limit cut to the batch budget is the server's, not the tokenizer file's: the request's
    # side then decides.
    from router.cli import input_rules
    from shared.config import ServerConfig
    from shared.resolve import ResolvedModel

    model = ResolvedModel("m", Path("/m"), None)
    info = model_info(max_input_length=512, truncation_side="left")
    assert input_rules(ServerConfig(max_batch_tokens=512), model, info).truncation_side == "left"
    cut = input_rules(ServerConfig(max_batch_tokens=256, auto_truncate=True), model, info)
    assert (cut.max_input_length, cut.truncation_side) == (256, None)


def test_cpu_workers_take_the_threads_asked_for_or_share_the_cores(monkeypatch) -> None:
    from router import cli
    from shared.config import ServerConfig
    from shared.resolve import ResolvedModel

    monkeypatch.setattr(cli, "cpu_threads_per_worker", lambda workers: 12 // workers)
    model = ResolvedModel("m", Path("/models/m"), None)
    devices = ["cpu", "cpu", "cuda:0"]
    shared = cli.worker_settings(ServerConfig(), model, devices, "/run/x")
    assert [w.threads for w in shared] == [6, 6, None]  # a GPU worker's threads are torch's
    assert [(w.worker_id, w.device) for w in shared] == [("0", "cpu"), ("1", "cpu"),
                                                         ("2", "cuda:0")]
    assert {w.endpoint for w in shared} == {"ipc:///run/x/workers.sock"}
    assert {w.model_dir for w in shared} == {"/models/m"}
    asked = cli.worker_settings(ServerConfig(worker_threads=3), model, devices, "/run/x")
    assert [w.threads for w in asked] == [3, 3, None]


def test_the_default_prompt_a_flag_names_wins_over_the_models() -> None:
    from router.cli import default_prompt
    from shared.config import ServerConfig

    info = model_info()
    assert default_prompt(info, ServerConfig()) == "doc: "
    assert default_prompt(info, ServerConfig(default_prompt_name="query")) == "query: "
    assert default_prompt(info, ServerConfig(default_prompt="hi: ")) == "hi: "
    assert default_prompt(model_info(default_prompt_name=None), ServerConfig()) is None
    with pytest.raises(ConfigError) as refused:
        default_prompt(info, ServerConfig(default_prompt_name="passage"))
    assert str(refused.value).startswith("`default-prompt-name` is set to `passage` but it was "
                                         "not found in the Sentence Transformers prompts.")


def test_info_names_the_model_its_kind_and_its_sha(monkeypatch) -> None:
    from router.cli import build_info
    from router.inputs import InputRules
    from shared.config import ServerConfig
    from shared.resolve import ResolvedModel

    rules = InputRules(max_input_length=512, max_client_batch_size=32, vocab_size=100,
                       prompts={}, default_prompt=None)
    model = ResolvedModel("org/m", Path("/m"), None)
    monkeypatch.setenv("EMBEDSERVE_GIT_SHA", "")
    info = build_info(ServerConfig(revision="v2"), model, model_info(), "float32", rules, 1)
    assert (info.model_id, info.served_model_name, info.model_sha, info.sha) == (
        "org/m", "org/m", "v2", None)
    assert info.model_type.embedding is not None
    assert info.model_type.embedding.pooling == "last_token"  # TEI's name
    assert info.embedding_dimension == 8
    named = build_info(ServerConfig(served_model_name="mine"),
                       ResolvedModel("org/m", Path("/m"), "abc"), model_info(), "float32",
                       rules, 1)
    assert (named.served_model_name, named.model_sha) == ("mine", "abc")
    labels = {"0": "no", "1": "yes"}
    for kind in ("classifier", "reranker"):
        info = build_info(ServerConfig(), model, model_info(kind=kind, id2label=labels),
                          "float32", rules, 1)
        assert info.embedding_dimension is None
        assert getattr(info.model_type, kind).label2id == {"no": 0, "yes": 1}


def test_main_exits_2_on_a_bad_configuration_and_130_on_an_interrupt(
        monkeypatch, capsys) -> None:
    import uvloop

    from router import cli

    assert cli.main(["--max-batch-tokens", "0"]) == 2
    assert capsys.readouterr().err.endswith("error: --max-batch-tokens must be > 0\n")

    def interrupted(coroutine) -> None:
        coroutine.close()
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "setup_logging", lambda *args, **kwargs: None)
    monkeypatch.setattr(cli, "raise_open_files_limit", lambda: None)
    monkeypatch.setattr(uvloop, "run", interrupted)
    assert cli.main(["--port", "0"]) == 130


def test_main_exits_1_when_a_supervised_task_failed(monkeypatch) -> None:
    import uvloop

    from router import cli, tasks

    monkeypatch.setattr(cli, "setup_logging", lambda *args, **kwargs: None)
    monkeypatch.setattr(cli, "raise_open_files_limit", lambda: None)
    monkeypatch.setattr(uvloop, "run", lambda coroutine: coroutine.close())
    assert cli.main(["--port", "0"]) == 0
    monkeypatch.setattr(tasks, "failures", ["the batcher"])
    assert cli.main(["--port", "0"]) == 1


def test_embedserve_grpc_is_embedserve_with_grpc(monkeypatch) -> None:
    import sys

    from router import cli

    monkeypatch.setattr(sys, "argv", ["embedserve-grpc", "--port", "50051"])
    monkeypatch.setattr(cli, "main", lambda argv: argv)
    assert cli.grpc_main() == ["--grpc", "--port", "50051"]


def test_grpc_needs_its_extra_only_when_asked_for(monkeypatch) -> None:
    import sys

    from router import cli
    from shared.config import ServerConfig

    monkeypatch.setitem(sys.modules, "router.grpc.server", None)  # import fails
    cli._check_grpc_installed(ServerConfig())
    with pytest.raises(ConfigError) as refused:
        cli._check_grpc_installed(ServerConfig(grpc=True))
    assert str(refused.value).startswith("--grpc needs the grpc extra")

