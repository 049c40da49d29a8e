"""Tokenizing for a static model (sentence-transformers' StaticEmbedding, ModelInfo.empty_bag_id).

StaticEmbedding runs its tokenizer.json as the file is: no transformers class rebuild, no
lower-casing, padding off, but the file's own truncation kept; and never adds special tokens
(`encode_batch(texts, add_special_tokens=False)`). So does the router, for embedding requests
and for /tokenize alike, whatever /tokenize's `add_special_tokens` says: /tokenize shows the
ids the model averages. Over the router's own limit (the batch budget, ModelInfo) an input is
cut on the side a request asks for, or refused, as for any model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class StaticTokens:
    """One tokenizer's static settings: its file's truncation, and the empty bag's id."""

    def __init__(self, tokenizer: Any, empty_bag_id: int) -> None:
        self._tokenizer = tokenizer
        # The file's truncation (a dict of enable_truncation's arguments), read before the
        # pool's loader clears it.
        self._file_truncation: dict[str, Any] | None = tokenizer.truncation
        self.empty_bag_id = empty_bag_id

    def _truncate(self, max_length: int | None, direction: str) -> None:
        own = self._file_truncation
        if max_length is not None and (own is None or own["max_length"] > max_length):
            self._tokenizer.enable_truncation(max_length, direction=direction)
        elif own is not None:
            self._tokenizer.enable_truncation(**own)
        else:
            self._tokenizer.no_truncation()

    def encodings(self, texts: Sequence[str | tuple[str, str]], max_length: int | None = None,
                  direction: str = "right") -> list:
        """The model's encodings (tokenizers.Encoding) of `texts`: no special tokens, the
        file's truncation, and `max_length`'s where it is shorter."""
        self._truncate(max_length, direction)
        return self._tokenizer.encode_batch(list(texts), add_special_tokens=False)

    def bag_ids(self, encoding: Any) -> np.ndarray:
        """What the worker gets for one encoding: its ids, or the empty bag's id for none.
        Raises ValueError for an id past the table (StaticEmbedding raises IndexError)."""
        ids = np.asarray(encoding.ids, dtype=np.int32)
        if ids.size == 0:
            return np.asarray([self.empty_bag_id], dtype=np.int32)
        if int(ids.max()) >= self.empty_bag_id:
            raise ValueError(f"token id {int(ids.max())} has no row in the model's "
                             f"{self.empty_bag_id}-row embedding table")
        return ids
