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

from shared.st_modules import read_json
from shared.tokenizer_class import special_tokens

HEAD_FILES = ("sparse_linear.safetensors", "sparse_linear.pt")
# The special tokens FlagEmbedding leaves out of the lexical weights, by tokenizer attribute.
_IGNORED = ("cls_token", "eos_token", "pad_token", "unk_token")
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
