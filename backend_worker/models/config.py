"""The ConfigErrors every family raises alike when it reads config.json.

A family refuses a config it would compute wrongly, and a config that lacks a size it needs;
both messages name the family, so that a user with several models knows which one to fix, and
tests match them by these exact words.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from shared.errors import ConfigError


def refusal(family: str, setting: str) -> ConfigError:
    """`config.json: {family} with {setting} is not supported`, to raise."""
    return ConfigError(f"config.json: {family} with {setting} is not supported")


def refuse_values(config: dict[str, Any], unsupported: dict[str, Any], family: str) -> None:
    """Refuse a config that sets any key of `unsupported` to the value given there (a switch
    whose other value this implementation would silently compute differently)."""
    for key, bad in unsupported.items():
        if config.get(key) == bad:
            raise refusal(family, f"{key}={bad!r}")


@contextmanager
def required_keys(family: str) -> Iterator[None]:
    """Inside the block, a missing key (the KeyError of `config[key]`) becomes a ConfigError
    naming the family and the key, rather than a bare KeyError from deep in the worker."""
    try:
        yield
    except KeyError as exc:
        raise ConfigError(f"config.json: {family} config lacks {exc.args[0]!r}") from exc
