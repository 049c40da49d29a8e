"""config.json -> model class, as data.

A family registers itself with a decorator naming its `model_type`s (and, where a model type
alone is ambiguous, `architectures`). Some checkpoints say a model type they are not: JinaBERT v2
writes `model_type: "bert"` and brings its own code through `auto_map`. Loading those as the
family they imitate would give plausible-looking, wrong vectors, so `Marker`s (the custom code a
config points at) are checked before anything else: a family registered for a marker serves it,
and a marker with no family behind it (`REFUSALS`) fails with a message saying what was found.
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
class Marker:
    """A config that says `model_type` but runs custom code: recognised by a substring of an
    `auto_map` entry (e.g. "jinaai/jina-bert-implementation--modeling_bert.JinaBertModel")."""

    name: str  # how messages, docs and parity tests (COVERS) call what it marks
    model_type: str
    auto_map: tuple[str, ...]  # any of these, case-insensitive, in any auto_map value

    def matches(self, config: dict[str, Any]) -> bool:
        if config.get("model_type") != self.model_type:
            return False
        auto_map = config.get("auto_map") or {}
        values = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
        text = " ".join(json.dumps(value) for value in values).lower()
        return any(needle.lower() in text for needle in self.auto_map)


# Markers no family serves: checked after the registered markers, so they catch the variants of
# a marked family that its registration does not name.
REFUSALS: list[Marker] = [
    # Any other JinaBERT code (a flash-attention variant, or an auto_map without the repository
    # name): ALiBi + GLU under a name we cannot place. Plain BERT would load most of its weights.
    Marker("JinaBERT (model_type 'bert' with a JinaBert auto_map of an implementation not "
           "supported here)", "bert", ("jina", "JinaBert")),
]

_BY_MODEL_TYPE: dict[str, type[EncoderModel]] = {}
_BY_ARCHITECTURE: dict[str, type[EncoderModel]] = {}
_BY_MARKER: dict[Marker, type[EncoderModel]] = {}

M = TypeVar("M")


def register(
    *, model_types: tuple[str, ...] = (), architectures: tuple[str, ...] = (),
    markers: tuple[Marker, ...] = (),
) -> Callable[[M], M]:
    """Class decorator: this class serves these model types / architectures / markers."""

    def decorate(cls: M) -> M:
        for table, names in ((_BY_MODEL_TYPE, model_types), (_BY_ARCHITECTURE, architectures)):
            for name in names:
                if name in table:
                    raise RuntimeError(f"{name!r} registered twice ({table[name]} and {cls})")
                table[name] = cls  # type: ignore[assignment]
        for marker in markers:
            if any(marker.name == known.name for known in _BY_MARKER):
                raise RuntimeError(f"marker {marker.name!r} registered twice")
            _BY_MARKER[marker] = cls  # type: ignore[assignment]
        return cls

    return decorate


def registered_classes() -> set[type[EncoderModel]]:
    """Every class the registry can hand out (for tests that must cover each one)."""
    return {*_BY_MODEL_TYPE.values(), *_BY_ARCHITECTURE.values(), *_BY_MARKER.values()}


def supported_with_heads() -> list[str]:
    """Registered names whose family serves classifier or MLM heads, for messages."""
    named = [*_BY_MODEL_TYPE.items(), *((m.name, cls) for m, cls in _BY_MARKER.items())]
    return sorted(name for name, cls in named if cls.heads is not None)


def supported() -> list[str]:
    """Registered model types and marker names, for messages, docs and the parity coverage."""
    return sorted([*_BY_MODEL_TYPE, *(marker.name for marker in _BY_MARKER)])


def model_class(config: dict[str, Any]) -> type[EncoderModel]:
    """The class for a config.json, or a ConfigError saying what was found and what we serve."""
    model_type = str(config.get("model_type", ""))
    architectures = list(config.get("architectures") or [])
    found = f"model_type {model_type!r}, architectures {architectures}"
    for marker, cls in _BY_MARKER.items():
        if marker.matches(config):
            return cls
    for refusal in REFUSALS:
        if refusal.matches(config):
            raise ConfigError(
                f"config.json: {refusal.name} is not supported ({found}, auto_map "
                f"{config.get('auto_map')}); supported model types: {', '.join(supported())}"
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
