"""A sentence-transformers StaticEmbedding module read as a model of its own.

StaticEmbedding (sentence_transformers/sentence_transformer/modules/static_embedding.py) is an
`nn.EmbeddingBag(mode="mean")` over the ids its own tokenizer.json gives without special
tokens. Its folder holds that tokenizer.json and model.safetensors: `embedding.weight` as
sentence-transformers saves it, or model2vec's `embeddings` (with a `mapping` of token id ->
row and per-token `weights` in vocabulary-quantized models), which StaticEmbedding.load folds
into one row per token id. There is no transformers config.json (model2vec's is its own), so
the worker's config is made here from the safetensors header. Pure data: no torch.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from shared.errors import ConfigError
from shared.st_modules import read_json

STATIC_MODEL_TYPE = "static_embedding"
# sentence-transformers' max_seq_length for StaticEmbedding is math.inf: this stands for it
# where an int is needed (the worker's position table, ModelInfo.max_input_length).
NO_LENGTH_LIMIT = 2**31 - 1
_FLOATS = {"F64", "F32", "F16", "BF16"}
_HALF = {"F16", "BF16"}
_INTEGERS = {"I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8"}


def static_module_dir(root: Path, modules: list[dict[str, Any]], kinds: list[str]) -> Path | None:
    """The StaticEmbedding module's folder when the pipeline starts with one, else None."""
    if "StaticEmbedding" not in kinds:
        return None
    if kinds[0] != "StaticEmbedding":
        raise ConfigError(f"{root}/modules.json: StaticEmbedding must be the first module "
                          f"(found {kinds})")
    # "" (sentence-transformers 6 saves an input module at the root), "." (model2vec) or
    # "0_StaticEmbedding" (earlier sentence-transformers).
    return root / str(modules[0].get("path", ""))


def _header(path: Path) -> dict[str, Any]:
    """A safetensors file's header (names, dtypes, shapes) without reading its data."""
    try:
        with path.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    header.pop("__metadata__", None)
    return {str(k): v for k, v in header.items()}


def _tensor(header: dict[str, Any], name: str, rank: int, where: Path,
            dtypes: set[str]) -> list[int]:
    shape = [int(n) for n in header[name]["shape"]]
    dtype = str(header[name]["dtype"])
    if len(shape) != rank:
        raise ConfigError(f"{where}: {name} has shape {shape}, expected rank {rank}")
    if dtype not in dtypes:
        raise ConfigError(f"{where}: {name} is {dtype}, not supported here (expected one of "
                          f"{sorted(dtypes)}; an integer (quantized) embedding table is not "
                          "served)")
    return shape


def _check_mapping(weights: Path, rows: int) -> None:
    """Every token id's row exists (StaticEmbedding.load fails on one that does not; the
    worker would fail mid-request, or on CUDA lose the device)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="numpy") as handle:
        mapping = handle.get_tensor("mapping")
    if mapping.size and (int(mapping.min()) < 0 or int(mapping.max()) >= rows):
        raise ConfigError(f"{weights}: mapping points outside the {rows} rows of embeddings "
                          f"(values {int(mapping.min())}..{int(mapping.max())})")


def static_config(module_dir: Path) -> dict[str, Any]:
    """The config the worker builds a static model from: the table's layout and sizes."""
    weights = module_dir / "model.safetensors"
    if not weights.is_file():
        found = " (pytorch_model.bin is not read for StaticEmbedding: save with "\
                "safe_serialization)" if (module_dir / "pytorch_model.bin").is_file() else ""
        raise ConfigError(f"{module_dir}: StaticEmbedding weights model.safetensors not "
                          f"found{found}")
    header = _header(weights)
    if "embedding.weight" in header:  # sentence-transformers' own save
        expected = {"embedding.weight"}
        rows, dim = _tensor(header, "embedding.weight", 2, weights, _FLOATS)
        layout, vocab = "embedding_bag", rows
    elif "embeddings" in header:  # model2vec's
        expected = {"embeddings", "mapping", "weights"}
        rows, dim = _tensor(header, "embeddings", 2, weights, _FLOATS)
        layout, vocab = "model2vec", rows
        if "mapping" in header:
            (vocab,) = _tensor(header, "mapping", 1, weights, _INTEGERS)
        if "weights" in header:
            (count,) = _tensor(header, "weights", 1, weights, _FLOATS)
            if count != vocab:
                raise ConfigError(f"{weights}: weights has {count} entries for a vocabulary "
                                  f"of {vocab} token ids")
    else:
        raise ConfigError(f"{weights}: neither embedding.weight (sentence-transformers) nor "
                          f"embeddings (model2vec) found; keys: {sorted(header)}")
    table = "embedding.weight" if layout == "embedding_bag" else "embeddings"
    if header[table]["dtype"] in _HALF and "weights" not in header:
        # StaticEmbedding then averages in that dtype (only per-token weights promote the
        # folded rows to float32): ~1e-4 from a float32 mean, and its Normalize makes NaN of
        # an input without tokens. Served in float32, the vectors would be other ones.
        raise ConfigError(f"{weights}: a {header[table]['dtype']} {table} table is averaged "
                          "in that precision by sentence-transformers, which is not reproduced "
                          "here; convert the table to float32")
    unknown = sorted(set(header) - expected)
    if unknown:
        # StaticEmbedding.load would ignore them; a table stored under another name would
        # then be served as if it were the one read: refuse instead.
        raise ConfigError(f"{weights}: unexpected tensors for a StaticEmbedding: {unknown}")
    if vocab <= 0 or dim <= 0:
        raise ConfigError(f"{weights}: an empty embedding table ({vocab} x {dim})")
    if "mapping" in header:
        _check_mapping(weights, rows)
    return {
        "model_type": STATIC_MODEL_TYPE,
        "architectures": ["StaticEmbedding"],
        "layout": layout,
        "hidden_size": dim,
        "vocab_size": vocab,  # token ids the bag takes
        "table_rows": rows,  # rows stored (fewer than token ids when a mapping shares them)
        "has_mapping": "mapping" in header,
        "has_weights": "weights" in header,
    }


def tokenizer_truncation(module_dir: Path) -> tuple[int, str | None]:
    """The tokenizer file's own truncation, which StaticEmbedding keeps: its length (else no
    limit) and the side it cuts ("right" / "left"; None without one). The file is read once."""
    tokenizer = read_json(module_dir / "tokenizer.json")
    setting = tokenizer.get("truncation") if isinstance(tokenizer, dict) else None
    if not isinstance(setting, dict) or setting.get("max_length") is None:
        return NO_LENGTH_LIMIT, None
    return int(setting["max_length"]), str(setting.get("direction", "Right")).lower()
