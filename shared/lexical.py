"""BGE-M3's lexical weights: the sparse vectors of its `sparse_linear` head, served by
/embed_sparse beside the dense vectors (TEI serves BGE-M3's dense vectors only).

FlagEmbedding's M3Embedder gives each token the weight relu(sparse_linear(h)) from its last
hidden state h, then keeps, per vocabulary id, the largest weight among its tokens, for every
id except those of the tokenizer's cls, eos, pad and unk tokens, and only weights > 0. The
head's file sits beside the model's weights (`sparse_linear.pt`, which FlagEmbedding reads, or
the same tensors in `sparse_linear.safetensors`). Pure data: the worker computes the weights
(backend_worker/lexical.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from shared.st_modules import optional_json, read_json
from shared.tokenizer_class import tokenizer_class

HEAD_FILES = ("sparse_linear.safetensors", "sparse_linear.pt")
# The special tokens FlagEmbedding leaves out of the lexical weights, by tokenizer attribute.
_IGNORED = ("cls_token", "eos_token", "pad_token", "unk_token")
# Those a tokenizer class takes when no file names them (its __init__ defaults, transformers
# 5.25's models/*/tokenization_*.py); the generic backend has none.
_ROBERTA = {"cls_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
CLASS_DEFAULTS: dict[str, dict[str, str]] = {
    "BertTokenizer": {"cls_token": "[CLS]", "pad_token": "[PAD]", "unk_token": "[UNK]"},
    "DistilBertTokenizer": {"cls_token": "[CLS]", "pad_token": "[PAD]", "unk_token": "[UNK]"},
    "RobertaTokenizer": _ROBERTA, "CamembertTokenizer": _ROBERTA, "XLMRobertaTokenizer": _ROBERTA,
    "MPNetTokenizer": {"cls_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                       "unk_token": "[UNK]"},
    "DebertaV2Tokenizer": {"cls_token": "[CLS]", "eos_token": "[SEP]", "pad_token": "[PAD]",
                           "unk_token": "[UNK]"},
    "Qwen2Tokenizer": {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                       "unk_token": "<|endoftext|>"},
}


class LexicalWeights(msgspec.Struct, frozen=True):
    """Where the head is, and the ids that never get a weight."""

    path: str
    ignored_ids: list[int]


def _content(token: Any) -> str | None:
    # A special token is saved as its text, or as an AddedToken dict ({"content": ...}).
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _token_id(tokenizer: dict[str, Any], content: str) -> int | None:
    for added in tokenizer.get("added_tokens") or []:
        if added.get("content") == content:
            return int(added["id"])
    vocab = (tokenizer.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):  # WordPiece, BPE, WordLevel
        found = vocab.get(content)
        return int(found) if found is not None else None
    if isinstance(vocab, list):  # Unigram: [piece, score] by id
        return next((i for i, (piece, _) in enumerate(vocab) if piece == content), None)
    return None


def special_tokens(model_dir: Path, model_type: str,
                   config_class: str | None = None) -> dict[str, Any]:
    """The named special tokens as transformers 5 resolves them: the tokenizer class's defaults
    (shared/tokenizer_class.py), over them tokenizer_config.json's (a null names none), and over
    those special_tokens_map.json's, which it reads only where tokenizer_config.json has no
    `added_tokens_decoder` (transformers 4 wrote that file and did not have that key)."""
    tokenizer_config = optional_json(model_dir / "tokenizer_config.json") or {}
    named: dict[str, Any] = dict(CLASS_DEFAULTS.get(
        tokenizer_class(tokenizer_config, model_type, config_class), {}))
    named.update(tokenizer_config)
    if "added_tokens_decoder" not in tokenizer_config:
        named.update(optional_json(model_dir / "special_tokens_map.json") or {})
    return named


def lexical_weights(model_dir: Path, model_type: str = "",
                    config_class: str | None = None) -> LexicalWeights | None:
    """The lexical-weights head of the model at `model_dir`, None when it has none."""
    path = next((model_dir / name for name in HEAD_FILES if (model_dir / name).is_file()), None)
    if path is None:
        return None
    named = special_tokens(model_dir, model_type, config_class)
    tokenizer = read_json(model_dir / "tokenizer.json")
    ignored = set()
    for key in _IGNORED:
        content = _content(named.get(key))
        found = _token_id(tokenizer, content) if content is not None else None
        if found is not None:
            ignored.add(found)
    return LexicalWeights(str(path), sorted(ignored))
