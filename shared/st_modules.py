"""sentence-transformers' module files: 1_Pooling and Dense configs, in the classic format and
the one sentence-transformers 6 writes (the pipeline around them: shared/st_pipeline.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import msgspec

from shared.errors import ConfigError

Pooling = Literal["cls", "mean", "max", "last-token", "splade", "mean_sqrt_len_tokens",
                  "weightedmean"]
POOLINGS: tuple[str, ...] = ("cls", "mean", "max", "last-token", "splade",
                             "mean_sqrt_len_tokens", "weightedmean")

# Classic 1_Pooling keys and the sentence-transformers 6 `pooling_mode` names, mapped to ours.
_CLASSIC_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "last-token",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}
_ST6_POOLING_NAMES = {
    "cls": "cls",
    "mean": "mean",
    "max": "max",
    "lasttoken": "last-token",
    "last_token": "last-token",
    "mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "weightedmean": "weightedmean",
}

# Activations a Dense module may name, by the last component of its dotted class path.
DENSE_ACTIVATIONS = {"Identity": "identity", "Tanh": "tanh", "ReLU": "relu", "GELU": "gelu",
                     "Sigmoid": "sigmoid", "SiLU": "silu"}


class DenseSpec(msgspec.Struct, frozen=True):
    """One sentence-transformers Dense module (a linear layer plus an activation; with
    `residual`, its input added back, through a bias-free projection when the sizes differ)."""

    path: str
    in_features: int
    out_features: int
    bias: bool
    activation: str
    residual: bool = False


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def optional_json(path: Path) -> Any | None:
    return read_json(path) if path.is_file() else None


# The Transformer module's settings file, by the names sentence-transformers tries in order: older
# saves named it after the family. The first that holds any setting is read.
TRANSFORMER_CONFIG_NAMES = tuple(f"sentence_{family}_config.json" for family in (
    "bert", "roberta", "distilbert", "camembert", "albert", "xlm-roberta", "xlnet"))


# Keys of the settings' keyword arguments that only say where files come from (sentence-
# transformers drops trust_remote_code), and what the tokenizer calls may set that we follow.
_HUB_KWARGS = frozenset({"trust_remote_code", "revision", "token", "use_auth_token", "cache_dir",
                         "local_files_only", "use_fast"})
_TEXT_KWARGS = frozenset({"max_length", "padding", "padding_side"})
# Tokenizer settings that change no token of an input (the server packs without padding;
# decoder embedders' files ask for left padding).
_LAYOUT_KWARGS = frozenset({"padding_side", "clean_up_tokenization_spaces"})
# Model settings that change no number of one forward pass (a cache, which implementation
# computes attention, the dtype: the server's own choice, as model_kwargs' are).
_RUNTIME_KWARGS = frozenset({"use_cache", "attn_implementation", "torch_dtype", "dtype"})


def transformer_settings_file(folder: Path) -> tuple[Path, dict[str, Any]]:
    """The Transformer module's settings file in `folder` (sentence_bert_config.json if none
    holds any) and its settings (max_seq_length, do_lower_case, ...), read once."""
    for name in TRANSFORMER_CONFIG_NAMES:
        settings = optional_json(folder / name)
        if settings:
            return folder / name, dict(settings)
    return folder / TRANSFORMER_CONFIG_NAMES[0], {}


def transformer_settings(folder: Path) -> dict[str, Any]:
    """A Transformer module's settings in `folder`."""
    return transformer_settings_file(folder)[1]


def check_transformer_kwargs(settings: dict[str, Any], where: Path) -> None:
    """Refuse the settings' keyword arguments that sentence-transformers applies and we do not:
    config_kwargs change the model itself (its layers, its norms' epsilon), processor_kwargs and
    processing_kwargs its tokenization. Only the length limits are followed (model_limits.py);
    model_kwargs (dtype, attention implementation) are the server's own choice."""
    config_why = ("it would change the model; only where its files come from and how it "
                  "runs are read")
    tokenizer_why = ("it would change the tokens; only the tokenizer's model_max_length is "
                     "followed")
    model = (_HUB_KWARGS | _RUNTIME_KWARGS, config_why)
    tokenizer = (_HUB_KWARGS | _LAYOUT_KWARGS | {"model_max_length"}, tokenizer_why)
    # (each kind of settings under its current name and its older one)
    allowed = {"config_kwargs": model, "config_args": model,
               "processor_kwargs": tokenizer, "tokenizer_args": tokenizer}
    for key, (keep, why) in allowed.items():
        for name in sorted(set(settings.get(key) or {}) - keep):
            raise ConfigError(f"{where}: {key} {name!r} is not supported ({why})")
    for part in ("common", "text"):
        given = (settings.get("processing_kwargs") or {}).get(part) or {}
        if given.get("truncation", True) not in (True, "longest_first"):
            raise ConfigError(f"{where}: processing_kwargs {part} truncation "
                              f"{given['truncation']!r} is not supported")
        for name in sorted(set(given) - _TEXT_KWARGS - {"truncation"}):
            raise ConfigError(f"{where}: processing_kwargs {part} {name!r} is not supported "
                              "(only max_length is followed)")
    check_transformer_outputs(settings, where)


# sentence-transformers' TRANSFORMER_TASK_DEFAULTS: per transformer_task, the output of the
# model's forward a Transformer module reads, and the feature it fills with it.
TASK_OUTPUTS = {
    "feature-extraction": ("last_hidden_state", "token_embeddings"),
    "fill-mask": ("logits", "token_embeddings"),
    "sequence-classification": ("logits", "scores"),
    "text-generation": ("logits", "causal_logits"),
}


def check_transformer_outputs(settings: dict[str, Any], where: Path) -> None:
    """Refuse a modality_config (sentence-transformers 6) whose text or message inputs read
    another output of the model than their task's own: sentence-transformers follows it (the
    second-to-last layer's hidden states, BERT's pooler output as the sentence embedding,
    ...), the worker always computes the task's own output. Without a modality_config
    sentence-transformers reads the task's defaults."""
    modalities = settings.get("modality_config")
    if modalities is None:
        return
    task = settings.get("transformer_task")
    # (an MLMTransformer's task defaults to fill-mask, a Transformer's to feature-extraction:
    # where it is not written, the outputs of any task served here are its own)
    allowed = [TASK_OUTPUTS[task]] if task in TASK_OUTPUTS else list(TASK_OUTPUTS.values())
    target = settings.get("module_output_name")
    for modality in ("text", "message"):
        params = modalities.get(modality) if isinstance(modalities, dict) else {}
        if params is None:
            continue
        method, read = ((params.get("method"), params.get("method_output_name"))
                        if isinstance(params, dict) else (None, None))
        named = read
        if isinstance(read, list) and len(read) == 1:  # (each name indexes the output in turn)
            read = read[0]
        if method != "forward" or (read, target) not in allowed:
            under = f" under transformer_task {task!r}" if task is not None else ""
            raise ConfigError(
                f"{where}: modality_config {modality} reads {method!r}'s output {named!r} into "
                f"{target!r}{under}, which is not supported (supported: "
                f"{' / '.join(f'{r} into {t}' for r, t in allowed)}, of forward)")


def module_kind(type_path: str) -> str:
    # Classic: "sentence_transformers.models.Pooling";
    # v6: "sentence_transformers.sentence_transformer.modules.pooling.Pooling".
    return type_path.rsplit(".", 1)[-1]


def builtin_module(where: Path, type_path: str) -> str:
    """The kind of a module that file `where` (modules.json, router_config.json) names, when
    the class is sentence-transformers' own. A repository's own module (jina-embeddings-v3's
    `custom_st.Transformer`) is its code, which is not run here: however it is named, serving
    it as the built-in would give other vectors."""
    if not type_path.startswith("sentence_transformers."):
        raise ConfigError(f"{where}: module type {type_path!r} is the repository's own code, "
                          "not a sentence-transformers module; it is not run here")
    return module_kind(type_path)


def parse_pooling_config(cfg: dict[str, Any], where: Path) -> str:
    """Return our pooling name for a 1_Pooling/config.json in either format."""
    if "pooling_mode" in cfg:
        raw = cfg["pooling_mode"]
        modes = [raw] if isinstance(raw, str) else list(raw)
        names = [_ST6_POOLING_NAMES.get(str(m).lower(), str(m)) for m in modes]
    else:
        # sentence-transformers' Pooling: with no flag set (or none written), its default mean.
        names = [ours for key, ours in _CLASSIC_POOLING_KEYS.items() if cfg.get(key)] or ["mean"]
    if len(names) != 1:
        raise ConfigError(
            f"{where}: exactly one pooling mode is supported, found {names or 'none'}"
        )
    if names[0] not in POOLINGS:
        raise ConfigError(
            f"{where}: pooling mode {names[0]!r} is not supported "
            f"(supported: cls, mean, max, lasttoken, mean_sqrt_len_tokens, weightedmean); "
            "pass --pooling to override"
        )
    return names[0]


def on_sentence_embedding(cfg: dict[str, Any], module_dir: Path, kind: str) -> None:
    """sentence-transformers 6 can point a Dense or a Normalize at the token embeddings
    (`module_input_name`): we apply both to the pooled vector, which would be silently wrong."""
    for key in ("module_input_name", "module_output_name"):
        if cfg.get(key, "sentence_embedding") != "sentence_embedding":
            raise ConfigError(f"{module_dir}: {kind} with {key}={cfg[key]!r} is not supported "
                              f"(only a {kind} of the pooled sentence embedding is)")


def parse_dense(module_dir: Path) -> DenseSpec:
    cfg = read_json(module_dir / "config.json")
    on_sentence_embedding(cfg, module_dir, "Dense")
    # Dense.load: without the key, the constructor's default (Tanh). A path outside torch is
    # the repository's code (run only with trust_remote_code, Tanh without it): refused below.
    act_path = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
    act = (DENSE_ACTIVATIONS.get(module_kind(act_path))
           if isinstance(act_path, str) and act_path.startswith("torch.") else None)
    if act is None:
        raise ConfigError(f"{module_dir}: Dense activation {act_path!r} is not supported")
    return DenseSpec(
        path=str(module_dir),
        in_features=int(cfg["in_features"]),
        out_features=int(cfg["out_features"]),
        bias=bool(cfg.get("bias", True)),
        activation=act,
        # sentence-transformers 6: the input added back after the activation.
        residual=bool(cfg.get("use_residual", False)),
    )
