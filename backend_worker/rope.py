"""config.json's rotary settings -> a `Rotary`, for the families whose positions are rotary.

Checkpoints spell these settings two ways: transformers 5 writes `rope_parameters` (one dict, or
one per layer type such as Gemma 3's "sliding_attention" / "full_attention"), older configs on
the Hub write `rope_theta` plus an optional `rope_scaling` dict. `flat_rope_settings` reads
either into one dict; a family with per-layer-type settings assembles its dicts itself.

Only the rope types real embedding checkpoints use are implemented; any other type, and any key
a type does not define, is a ConfigError naming it (a scaling we ignored would move every
vector a little, which no one would notice).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from backend_worker.layers import Rotary, rope_inv_freq
from shared.errors import ConfigError

# Keys each rope type reads; "type" is the older spelling of "rope_type".
_COMMON = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})
_KEYS = {
    "default": _COMMON,
    "linear": _COMMON | {"factor"},
    "llama3": _COMMON | {"factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings"},
}


def flat_rope_settings(config: dict[str, Any], default_theta: float) -> dict[str, Any]:
    """One rope settings dict (rope_type, rope_theta, ...) from either config.json format."""
    # transformers' precedence: rope_scaling, when a config carries both.
    params = config.get("rope_scaling") or config.get("rope_parameters")
    if params and (not isinstance(params, dict)
                   or any(isinstance(v, dict) for v in params.values())):
        raise ConfigError(
            f"config.json: rope settings {params!r}: per-layer-type rope settings are not "
            f"supported for model_type {config.get('model_type')!r}"
        )
    settings = dict(params) if params else {}
    settings.setdefault("rope_theta", config.get("rope_theta") or default_theta)
    if config.get("partial_rotary_factor") is not None:
        settings.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    if rope_type(settings) == "llama3" and "original_max_position_embeddings" in config:
        # transformers lets the top-level value win over the one inside the rope dict.
        settings["original_max_position_embeddings"] = config["original_max_position_embeddings"]
    return settings


def rope_type(settings: dict[str, Any]) -> str:
    return str(settings.get("rope_type", settings.get("type", "default")))


def rotary(settings: dict[str, Any], head_dim: int, max_positions: int, where: str) -> Rotary:
    """The Rotary for one settings dict; `where` names the setting in error messages.

    Every feature of each head is rotated: transformers' Llama, Qwen, Mistral and Gemma code
    does so and fails on a shorter table, so a partial_rotary_factor other than 1 is refused.
    """
    kind = rope_type(settings)
    allowed = _KEYS.get(kind)
    if allowed is None:
        raise ConfigError(f"{where}: rope type {kind!r} is not supported "
                          f"(supported: {', '.join(_KEYS)})")
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise ConfigError(f"{where}: rope type {kind!r} with {unknown} is not supported")
    try:
        base = float(settings["rope_theta"])
        fraction = float(settings.get("partial_rotary_factor", 1.0))
        if fraction != 1.0:
            raise ConfigError(f"{where}: partial_rotary_factor {fraction} is not supported "
                              "for this model type")
        inv_freq = rope_inv_freq(head_dim, base)
        if kind == "linear":
            inv_freq = inv_freq / float(settings["factor"])
        elif kind == "llama3":
            inv_freq = _llama3(inv_freq, settings, max_positions)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: rope type {kind!r} settings {settings!r} are incomplete "
                          f"or malformed ({exc!r})") from exc
    return Rotary(inv_freq)


def _llama3(inv_freq: torch.Tensor, settings: dict[str, Any], max_positions: int) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: wavelengths longer than the pre-training
    context / low_freq_factor are divided by `factor`, those shorter than context /
    high_freq_factor are kept, and the band between is interpolated linearly in
    context / wavelength."""
    factor = float(settings["factor"])
    low = float(settings["low_freq_factor"])
    high = float(settings["high_freq_factor"])
    context = float(settings.get("original_max_position_embeddings", max_positions))
    wavelength = 2 * math.pi / inv_freq
    smooth = (context / wavelength - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    middle = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(middle, blended, scaled)
