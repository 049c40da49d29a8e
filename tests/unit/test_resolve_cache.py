"""`resolve_model` offline, from the Hub cache that an online start filled: huggingface_hub
(2.x) keeps the repository's listing beside the snapshot and refuses a snapshot missing any file
the download's allow_patterns select from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.config import ServerConfig
from shared.errors import ConfigError
from shared.resolve import resolve_model

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def cache_as_an_online_start_left_it(cache: Path, listing: list[str],
                                     fetched: list[str]) -> Path:
    """The repository org/name at main = SHA: its snapshot holds `fetched`, and trees/SHA.json
    lists the whole repository, as snapshot_download writes them (huggingface_hub's tree
    cache, format 1)."""
    repo = cache / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    snapshot = repo / "snapshots" / SHA
    for name in fetched:
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        content = json.dumps({"model_type": "bert"}) if name.endswith(".json") else "x"
        (snapshot / name).write_text(content)
    (repo / "trees").mkdir()
    (repo / "trees" / f"{SHA}.json").write_text(json.dumps({
        "format_version": 1,
        "files": {name: {"size": 1, "blob_id": f"{i:040x}"} for i, name in enumerate(listing)},
    }))
    return snapshot


# A sentence-transformers repository as the Hub keeps most: both weight formats at the root
# (the online start fetches the safetensors only), a Dense module in pytorch_model.bin only.
LISTING = ["config.json", "tokenizer.json", "modules.json", "README.md", "model.safetensors",
           "pytorch_model.bin", "onnx/model.onnx", "1_Pooling/config.json",
           "2_Dense/config.json", "2_Dense/pytorch_model.bin"]
FETCHED = ["config.json", "tokenizer.json", "modules.json", "model.safetensors",
           "1_Pooling/config.json", "2_Dense/config.json", "2_Dense/pytorch_model.bin"]


def test_the_online_download_is_what_offline_asks_for() -> None:
    """What an online start fetches of LISTING is FETCHED (the premise of the tests below)."""
    from fnmatch import fnmatch

    from shared.resolve import hub_patterns

    patterns = hub_patterns(LISTING)
    assert [f for f in LISTING if any(fnmatch(f, p) for p in patterns)] == sorted(
        FETCHED, key=LISTING.index)


@pytest.mark.usefixtures("offline")
def test_a_model_fetched_online_starts_offline(tmp_path: Path) -> None:
    """Offline (or with the Hub unreachable) the listing is unknown: asking for both weight
    formats had huggingface_hub find the snapshot incomplete (pytorch_model.bin, never
    fetched), so a model downloaded by an online start could not start offline."""
    snapshot = cache_as_an_online_start_left_it(tmp_path, LISTING, FETCHED)
    resolved = resolve_model(ServerConfig(model_id="org/name",
                                          huggingface_hub_cache=str(tmp_path)))
    assert resolved.path == snapshot
    assert resolved.sha == SHA


def test_a_model_fetched_online_starts_with_the_hub_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    def unreachable(*args: object, **kwargs: object) -> None:
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    real_download = huggingface_hub.snapshot_download

    def cached_only(*args: object, **kwargs: object) -> str:
        return real_download(*args, **{**kwargs, "local_files_only": True})

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached_only)
    snapshot = cache_as_an_online_start_left_it(tmp_path, LISTING, FETCHED)
    resolved = resolve_model(ServerConfig(model_id="org/name",
                                          huggingface_hub_cache=str(tmp_path)))
    assert resolved.path == snapshot


@pytest.mark.usefixtures("offline")
def test_an_interrupted_download_is_still_refused_offline(tmp_path: Path) -> None:
    """A snapshot that lacks a file the model needs (a download cut short) is still refused,
    naming the file, where huggingface_hub checks it."""
    import huggingface_hub

    cache_as_an_online_start_left_it(tmp_path, LISTING,
                                     [f for f in FETCHED if f != "model.safetensors"])
    if not hasattr(huggingface_hub, "get_cached_repo_tree"):
        pytest.skip("this huggingface_hub keeps no listing: the snapshot is served as it is")
    with pytest.raises(ConfigError, match=r"org/name.*model\.safetensors"):
        resolve_model(ServerConfig(model_id="org/name", huggingface_hub_cache=str(tmp_path)))


@pytest.mark.usefixtures("offline")
def test_progress_bars_disabled_by_the_environment_stay_off_without_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF_HUB_DISABLE_PROGRESS_BARS=1 (a service's journal spared them): turning the bars back
    on was refused by huggingface_hub with a UserWarning on stderr at every start."""
    import warnings

    import huggingface_hub.constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

    tqdm_module = __import__("huggingface_hub.utils.tqdm", fromlist=["_"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    monkeypatch.setattr(tqdm_module, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    monkeypatch.setattr(tqdm_module, "progress_bar_states", {})
    disable_progress_bars()
    snapshot = cache_as_an_online_start_left_it(tmp_path, LISTING, FETCHED)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolved = resolve_model(ServerConfig(model_id="org/name",
                                              huggingface_hub_cache=str(tmp_path)))
    assert resolved.path == snapshot
    assert are_progress_bars_disabled()
