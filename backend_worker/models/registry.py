"""config.json -> model class, as data.

A family registers itself with a decorator naming its `model_type`s (and, where a model type
alone is ambiguous, `architectures`). Configs that look like a supported type but are not (for
example JinaBERT v2, which says `model_type: "bert"` and brings its own code through `auto_map`)
are caught first by a list of refusal markers, so they are never loaded as the family they
imitate: that would give plausible-looking, wrong vectors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Self, TypeVar

import torch

from backend_worker.attention import Attention
from backend_worker.head_modules import FamilyHeads
from backend_worker.loading import WeightMap
from shared.errors import ConfigError


class EncoderModel(Protocol):
    """What the engine needs from a family's model class (an nn.Module)."""

    weight_map: ClassVar[WeightMap]
    # The family's classifier / MLM heads (backend_worker/heads.py builds them); None if none.
    heads: ClassVar[FamilyHeads | None]
    # Rows of the position table: the largest position id + 1 the model accepts.
    max_positions: int

    @classmethod
    def from_config(cls, config: dict[str, Any], attention: Attention) -> Self: ...

    def __call__(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        meta: Any,
    ) -> torch.Tensor:
        """Flat int64 inputs [T] -> last hidden state [T, hidden]."""
        ...


@dataclass(frozen=True)
class Refusal:
    """A config we recognise and refuse; `matches` looks at the whole config.json dict."""

    what: str
    matches: Callable[[dict[str, Any]], bool]


def _auto_map_mentions(model_type: str, *needles: str) -> Callable[[dict[str, Any]], bool]:
    def matches(config: dict[str, Any]) -> bool:
        if config.get("model_type") != model_type:
            return False
        text = json.dumps(config.get("auto_map") or {}).lower()
        return any(needle.lower() in text for needle in needles)

    return matches


REFUSALS: list[Refusal] = [
    # ALiBi + GLU: a plain BERT would load most of its weights and silently compute garbage.
    Refusal("JinaBERT v2 (model_type 'bert' with a JinaBert auto_map)",
            _auto_map_mentions("bert", "jina", "JinaBert")),
]

_BY_MODEL_TYPE: dict[str, type[EncoderModel]] = {}
_BY_ARCHITECTURE: dict[str, type[EncoderModel]] = {}

M = TypeVar("M")


def register(
    *, model_types: tuple[str, ...] = (), architectures: tuple[str, ...] = ()
) -> Callable[[M], M]:
    """Class decorator: this class serves these model types / architectures."""

    def decorate(cls: M) -> M:
        for table, names in ((_BY_MODEL_TYPE, model_types), (_BY_ARCHITECTURE, architectures)):
            for name in names:
                if name in table:
                    raise RuntimeError(f"{name!r} registered twice ({table[name]} and {cls})")
                table[name] = cls  # type: ignore[assignment]
        return cls

    return decorate


def supported() -> list[str]:
    """Registered model types, for messages and docs."""
    return sorted(_BY_MODEL_TYPE)


def model_class(config: dict[str, Any]) -> type[EncoderModel]:
    """The class for a config.json, or a ConfigError saying what was found and what we serve."""
    model_type = str(config.get("model_type", ""))
    architectures = list(config.get("architectures") or [])
    found = f"model_type {model_type!r}, architectures {architectures}"
    for refusal in REFUSALS:
        if refusal.matches(config):
            raise ConfigError(
                f"config.json: {refusal.what} is not supported yet ({found}); "
                f"supported model types: {', '.join(supported())}"
            )
    for architecture in architectures:
        if architecture in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[architecture]
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    raise ConfigError(
        f"config.json: unsupported model ({found}); "
        f"supported model types: {', '.join(supported())}"
    )
