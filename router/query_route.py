"""An inference-free SPLADE model's query route (shared/sparse_router.py), computed in the router.

sentence-transformers' SparseStaticEmbedding gives a query the weight of each vocabulary id its
tokens have (no special tokens; an id counts once, however often it occurs), then SparseEncoder
keeps the `max_active_dims` largest by magnitude where the model names that. That is a lookup
in one float per vocabulary id: no worker, no batch. The route is the one a request names by
`prompt_name`, as encode_query / encode_document name theirs; otherwise the Router's default.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from router.inputs import InputRules, resolve_prompt
from router.tokenization import Encoded
from shared.errors import ConfigError, tokenizer, validation
from shared.sparse_router import QueryRoute


class QueryVectors:
    """The query route of one model: which requests take it, and their sparse vectors."""

    def __init__(self, route: QueryRoute, max_active_dims: int | None, vocab_size: int,
                 rules: InputRules) -> None:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            tensors = load_file(route.weights_path)
        except (SafetensorError, OSError) as exc:  # cut short, corrupt, unreadable
            raise ConfigError(f"{route.weights_path}: not read ({exc})") from exc
        except (TypeError, ValueError, AttributeError) as exc:  # numpy has no bfloat16, float8
            raise ConfigError(f"{route.weights_path}: not read ({exc}); the query route's "
                              "weights are read as float16/32/64") from exc
        weight = tensors.get("weight")
        if set(tensors) != {"weight"} or weight is None or weight.shape != (vocab_size,):
            shapes = {name: list(t.shape) for name, t in tensors.items()}
            raise ConfigError(f"{route.weights_path}: expected one tensor `weight` of "
                              f"[{vocab_size}] (one per vocabulary id), found {shapes}")
        if weight.dtype.kind != "f":  # astype would cast an integer weight without a word
            raise ConfigError(f"{route.weights_path}: weight is {weight.dtype}, not floating "
                              "point (the query route's weights are read as float16/32/64)")
        self._weight = weight.astype(np.float32)
        self._route = route
        self._keep = max_active_dims
        # The document route's rules, but the query tokenizer's own length (without special
        # tokens), where it names one.
        self.rules = dataclasses.replace(
            rules, max_input_length=route.max_length or rules.max_input_length)

    def choose(self, prompt_name: str | None) -> tuple[QueryVectors | None, str | None]:
        """(self if the request takes the query route else None, its prompt). A route's name
        picks that route, and its prompt if the model has one of that name, else none: a
        SparseEncoder always has a "query" and a "document" prompt ("" unless set), which
        encode_query / encode_document apply instead of the default prompt. Any other
        `prompt_name` is a prompt on the default route."""
        route = self._route
        named = prompt_name in (route.query, route.document)
        name = prompt_name if named else route.default
        if name is None:
            raise validation(f"Input validation error: this model's Router has no default "
                             f"route: set `prompt_name` to `{route.query}` or "
                             f"`{route.document}`")
        taken = self if name == route.query else None
        if named and prompt_name not in self.rules.prompts:
            return taken, None
        return taken, resolve_prompt(prompt_name, self.rules)

    def vectors(self, encoded: list[Encoded]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each input's (indices ascending, values) of its non-zero entries."""
        rows = []
        for enc in encoded:
            ids = np.unique(enc.ids)
            if ids.shape[0] and ids[-1] >= self._weight.shape[0]:
                raise tokenizer(f"token id {int(ids[-1])} has no weight in the query route's "
                                f"{self._weight.shape[0]} (the tokenizer's vocabulary is larger "
                                "than the model's)")
            values = self._weight[ids]
            nonzero = values != 0
            ids, values = ids[nonzero], values[nonzero]
            if self._keep is not None and ids.shape[0] > self._keep:
                top = np.sort(np.argpartition(-np.abs(values), self._keep - 1)[: self._keep])
                ids, values = ids[top], values[top]
            rows.append((ids.astype(np.int32), values))
        return rows
