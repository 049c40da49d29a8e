"""The score head of a LogitScore re-ranker (shared/logit_score.py): a causal LM whose score for
a pair is, at its last token, logit[true] - logit[false] (or logit[true] alone).

logits = lm_head(final_norm(hidden)) and the LM head has no bias, so the score is one dot
product: hidden . (W[true] - W[false]). The decoder already ends in its final norm, so the head
is the decoders' one-label `LastTokenClassifier` with that difference as its weight, and it is
served like any re-ranker (LOGITS, raw; the router applies the activation). Only the two rows
are read from the checkpoint: a real LM head is vocabulary x hidden (151k x 4096 for
Qwen3-Reranker-8B), far too much to load for two rows.

W is the checkpoint's lm_head.weight. Without one, transformers ties the head to the input
embeddings only when tie_word_embeddings is true (the type's config default when config.json
leaves it out); untied, a missing lm_head.weight is refused by name, never filled from the
embeddings. A checkpoint that holds lm_head.weight although tied is read as it stands, as
transformers does (it keeps both when their values differ).
"""

from __future__ import annotations

from pathlib import Path

import torch

from backend_worker.loading import checkpoint_files, iter_tensors
from backend_worker.models.decoder import FLAVOURS, WEIGHT_MAP, LastTokenClassifier
from shared.errors import ConfigError
from shared.logit_score import LogitScore
from shared.modelinfo import ModelInfo

LM_HEAD = "lm_head.weight"  # top level in *ForCausalLM, outside the "model." nesting
EMBEDDINGS = "embed_tokens.weight"


def tie_word_embeddings(info: ModelInfo) -> bool:
    """config.json's tie_word_embeddings, else transformers' default for the model type."""
    tied = info.config.get("tie_word_embeddings", FLAVOURS[info.model_type].tied)
    if not isinstance(tied, bool):
        raise ConfigError(f"config.json: tie_word_embeddings must be true or false, "
                          f"found {tied!r}")
    return tied


def _rows(files: list[Path], names: tuple[str, ...],
          ids: list[int]) -> tuple[str, torch.Tensor] | None:
    """(the key found, its rows `ids`) for the first file holding one of `names` (spellings of
    one tensor), or None. Safetensors rows are read alone; a .bin is unpickled whole anyway."""
    from safetensors import safe_open

    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                held = set(handle.keys())
                for name in (n for n in names if n in held):
                    tensor = handle.get_slice(name)
                    _check_shape(path, name, tuple(tensor.get_shape()), ids)
                    return name, torch.cat([tensor[i : i + 1] for i in ids])
        else:
            for key, value in iter_tensors([path]):
                if key in names:
                    _check_shape(path, key, tuple(value.shape), ids)
                    return key, value[ids].clone()
    return None


def _check_shape(path: Path, name: str, shape: tuple[int, ...], ids: list[int]) -> None:
    if len(shape) != 2:
        raise ConfigError(f"{path}: {name} has shape {shape}, not vocabulary x hidden")
    outside = [i for i in ids if not 0 <= i < shape[0]]
    if outside:
        raise ConfigError(f"{path}: LogitScore token id(s) {outside} are outside {name}'s "
                          f"{shape[0]} rows")


def _vocabulary_rows(info: ModelInfo, ids: list[int]) -> torch.Tensor:
    """Rows `ids` of the LM head as transformers builds it, float32 [len(ids), hidden]."""
    files = checkpoint_files(info.model_dir)
    found = _rows(files, (LM_HEAD,), ids)
    if found is None:
        if not tie_word_embeddings(info):
            raise ConfigError(
                f"{info.model_dir}: cannot load weights strictly: missing {LM_HEAD} (the LM "
                "head a LogitScore re-ranker scores with; tie_word_embeddings is false, so the "
                "input embeddings do not stand in for it)")
        # Tied: the embedding matrix, under any of the decoder's key prefixes.
        spellings = (*(p + EMBEDDINGS for p in WEIGHT_MAP.prefixes), EMBEDDINGS)
        found = _rows(files, spellings, ids)
        if found is None:
            raise ConfigError(f"{info.model_dir}: cannot load weights strictly: missing "
                              f"{LM_HEAD} and {EMBEDDINGS} (tied)")
    name, rows = found
    if not rows.is_floating_point():
        raise ConfigError(f"{info.model_dir}: {name} is {rows.dtype}, not floating point")
    if rows.shape[1] != info.hidden_size:
        raise ConfigError(f"{info.model_dir}: {name} has {rows.shape[1]} columns, "
                          f"hidden_size is {info.hidden_size}")
    return rows.float()


def score_weight(info: ModelInfo, score: LogitScore) -> torch.Tensor:
    """W[true] - W[false] (or W[true]), float32 [hidden]: the difference is taken before the
    dot product, in float32, so a low-precision model loses nothing to it."""
    ids = [score.true_token_id]
    if score.false_token_id is not None:
        ids.append(score.false_token_id)
    rows = _vocabulary_rows(info, ids)
    return rows[0] - rows[1] if len(ids) == 2 else rows[0]


def build_logit_score_head(info: ModelInfo, device: torch.device) -> LastTokenClassifier:
    """The one-label last-token head of a LogitScore re-ranker, float32, on `device`."""
    assert info.logit_score is not None
    if info.model_type not in FLAVOURS:
        raise ConfigError(
            f"config.json: model_type {info.model_type!r} as a LogitScore re-ranker is not "
            f"supported (only the decoders {', '.join(FLAVOURS)})")
    head = LastTokenClassifier(info.hidden_size, 1)
    with torch.no_grad():
        head.score.weight.copy_(score_weight(info, info.logit_score).unsqueeze(0))
    return head.to(device).eval()
