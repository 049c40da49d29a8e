"""sentence-transformers' SparseEncoder as SPLADE: a masked-LM Transformer (`MLMTransformer`, or
since sentence-transformers 6 a `Transformer` with transformer_task "fill-mask") whose vocabulary
logits a `SpladePooling` module turns into one sparse vector per text. Hub SPLADE models
(naver/splade-*, Splade_PP, granite-embedding-*-sparse) are saved this way.

The vector is, over the text's tokens: relu, log1p (a second log1p for activation_function
"log1p_relu"), then the max or the sum; SparseEncoder then keeps the `max_active_dims` largest
entries where config_sentence_transformers.json names that. Pure data, read from the files: the
worker's SPLADE head computes it (backend_worker/head_modules.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import msgspec

from shared.errors import ConfigError
from shared.st_modules import optional_json

# The module kinds (modules.json's class names) of the SparseEncoder pipeline.
MLM_TRANSFORMER = "MLMTransformer"
SPLADE_POOLING = "SpladePooling"


class SpladeSpec(msgspec.Struct, frozen=True):
    """How token logits become the sparse vector. The defaults are TEI's `--pooling splade`."""

    reduce: Literal["max", "sum"] = "max"
    log_twice: bool = False  # activation_function "log1p_relu": log1p(log1p(relu(x)))
    max_active_dims: int | None = None  # keep only this many largest entries per vector


def is_mlm_transformer(kind: str, transformer: dict[str, Any]) -> bool:
    """Whether a modules.json entry of `kind` gives vocabulary logits per token
    (`transformer`: sentence_bert_config.json, where a Transformer keeps its task; an
    MLMTransformer reads it too, fill-mask by default: another task gives hidden states)."""
    task = transformer.get("transformer_task", "fill-mask" if kind == MLM_TRANSFORMER else None)
    return kind in (MLM_TRANSFORMER, "Transformer") and task == "fill-mask"


def parse_splade_pooling(module_dir: Path, st_config: dict[str, Any]) -> SpladeSpec:
    """The SpladePooling module at `module_dir` (`st_config`: the model's
    config_sentence_transformers.json, where SparseEncoder keeps max_active_dims)."""
    cfg = optional_json(module_dir / "config.json") or {}
    reduce = cfg.get("pooling_strategy", "max")
    if reduce not in ("max", "sum"):
        raise ConfigError(f"{module_dir}/config.json: pooling_strategy {reduce!r} is not one "
                          "of max, sum")
    act = cfg.get("activation_function", "relu")
    if act not in ("relu", "log1p_relu"):
        raise ConfigError(f"{module_dir}/config.json: activation_function {act!r} is not one "
                          "of relu, log1p_relu")
    for key in ("module_input_name", "module_output_name"):
        # (sentence-transformers 6 may aim a module elsewhere; only the default is this one.)
        wanted = "token_embeddings" if key == "module_input_name" else "sentence_embedding"
        if cfg.get(key, wanted) != wanted:
            raise ConfigError(f"{module_dir}/config.json: SpladePooling with {key}="
                              f"{cfg[key]!r} is not supported")
    return SpladeSpec(reduce=reduce, log_twice=act == "log1p_relu",
                      max_active_dims=max_active_dims_of(st_config, module_dir))


def max_active_dims_of(st_config: dict[str, Any], where: Path) -> int | None:
    """config_sentence_transformers.json's max_active_dims (`where`: a module's folder)."""
    value = st_config.get("max_active_dims")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where.parent}/config_sentence_transformers.json: max_active_dims "
                          f"{value!r} is not a positive integer")
    return value



def sparse_pipeline(root: Path, kinds: list[str], transformer: dict[str, Any]) -> bool:
    """Whether modules.json (its entries' `kinds`) is SparseEncoder's SPLADE pipeline; any other
    place for its modules is refused, as it would be served as something else."""
    mlm = [i for i, kind in enumerate(kinds) if is_mlm_transformer(kind, transformer)]
    pools = [i for i, kind in enumerate(kinds) if kind == SPLADE_POOLING]
    if not mlm and not pools:
        return False
    if mlm == [0] and pools == [1] and len(kinds) == 2:
        return True
    raise ConfigError(f"{root}/modules.json: {' -> '.join(kinds)} is not supported (a masked-LM "
                      "Transformer is served as SPLADE only: the Transformer, then SpladePooling, "
                      "and nothing after)")
