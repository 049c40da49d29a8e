"""The sizes a model's files set: its hidden size and position table (config.json, in each
family's spelling), the input length sentence-transformers truncates at, and the vector width
it cuts to by default (truncate_dim)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.errors import ConfigError
from shared.st_modules import optional_json

# Config keys that name the hidden size and the position table length, by family spelling.
HIDDEN_SIZE_KEYS = ("hidden_size", "d_model", "dim", "n_embd")
_MAX_POSITIONS_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len")
# Families with relative positions only (no table): config.json's length (T5's n_positions) is
# not one transformers knows as a limit, so it does not cap sentence-transformers' own.
RELATIVE_POSITIONS_ONLY = frozenset({"t5", "mt5"})
# Families whose position ids start after the padding index (fairseq's convention, kept by
# MPNet): the router adds pad_token_id + 1 to every position.
POSITION_OFFSET_MODEL_TYPES = frozenset({"roberta", "xlm-roberta", "camembert", "mpnet"})


def first_position(config: dict[str, Any], model_type: str, root: Path) -> int:
    """The position id of a sequence's first token (what the router adds to 0, 1, ...)."""
    if model_type not in POSITION_OFFSET_MODEL_TYPES:
        return 0
    pad = config.get("pad_token_id", 1)  # transformers' default for these families
    if not isinstance(pad, int):
        raise ConfigError(f"{root}/config.json: {model_type} needs an integer pad_token_id "
                          f"(position ids start after it), found {pad!r}")
    return pad + 1


def config_value(config: dict[str, Any], keys: tuple[str, ...], default: int = 0) -> int:
    """The first of `keys` that config.json sets, as an int."""
    for key in keys:
        if config.get(key) is not None:
            return int(config[key])
    return default


def config_max_positions(config: dict[str, Any]) -> int:
    return config_value(config, _MAX_POSITIONS_KEYS, 512)


def max_input_length(
    model_dir: Path, config: dict[str, Any], position_offset: int, st_config: dict[str, Any],
) -> int:
    """The tokens an input may have, as sentence-transformers takes it: the limit `st_config`
    (sentence_bert_config.json) sets (settings_limit: processing_kwargs' max_length, the
    tokenizer's model_max_length, max_seq_length), else tokenizer_config.json's
    model_max_length, capped at the position table (after `position_offset`; not for a model
    of relative positions only); the table alone without either."""
    max_positions = config_max_positions(config) - position_offset
    limit = settings_limit(st_config)
    if limit is None:
        # sentence-transformers 6 keeps the limit in tokenizer_config.json, as transformers does;
        # without modules.json, SentenceTransformer and CrossEncoder build their Transformer
        # around the tokenizer too, so its model_max_length is the limit there as well.
        tok_cfg = optional_json(model_dir / "tokenizer_config.json") or {}
        limit = tok_cfg.get("model_max_length")
        if limit is not None and limit > 10**7:  # transformers' "no limit" sentinel
            limit = None
    if limit is None:
        return max_positions
    if config.get("model_type") in RELATIVE_POSITIONS_ONLY:
        return int(limit)
    return min(int(limit), max_positions)


def settings_limit(st_config: dict[str, Any]) -> int | None:
    """The length the Transformer module's settings (sentence_bert_config.json) cut inputs at:
    processing_kwargs' max_length, which sentence-transformers passes to every tokenizer call,
    else the tokenizer's model_max_length from processor_kwargs (tokenizer_args), which wins
    over max_seq_length, else max_seq_length (shared/st_modules.py refuses their other keys)."""
    processing = st_config.get("processing_kwargs") or {}
    processor = st_config.get("processor_kwargs", st_config.get("tokenizer_args")) or {}
    # (a tokenizer is called with the text's kwargs updated by the common ones)
    for limit in ((processing.get("common") or {}).get("max_length"),
                  (processing.get("text") or {}).get("max_length"),
                  processor.get("model_max_length"), st_config.get("max_seq_length")):
        if limit is not None:
            return int(limit)
    return None


def read_truncate_dim(st_config: dict[str, Any], root: Path) -> int | None:
    """config_sentence_transformers.json's truncate_dim (`st_config`), checked."""
    truncate_dim = st_config.get("truncate_dim")
    if truncate_dim is not None and (
            isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int)
            or truncate_dim <= 0):
        raise ConfigError(f"{root}/config_sentence_transformers.json: truncate_dim "
                          f"{truncate_dim!r} is not a positive integer")
    return truncate_dim
