"""Strict weight loading: every checkpoint key is used or explicitly ignored, every parameter is
filled, every shape matches, or loading fails with a ConfigError naming the keys.

A family describes its checkpoint layout as data (a `WeightMap`): prefixes to strip, key
normalisations, rules from checkpoint names to our parameter names (including the parts fused
into one tensor, such as Q, K and V), and the keys it deliberately drops.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from shared.errors import ConfigError

# Looked for in this order; the first that exists is the checkpoint.
CHECKPOINT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_MAX_NAMED = 10  # keys listed in one error message; the count says how many more
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _template_regex(template: str) -> re.Pattern[str]:
    """"layers.{i}.out.{w}" -> a regex with one named group per placeholder (one name segment)."""
    pieces = _PLACEHOLDER.split(template)
    # split() alternates literal text and placeholder names.
    regex = "".join(
        re.escape(piece) if i % 2 == 0 else f"(?P<{piece}>[^.]+)" for i, piece in enumerate(pieces)
    )
    return re.compile(regex)


class Resolved(NamedTuple):
    target: str  # our parameter name; "" for an ignored key
    part: str | None = None  # which slice of a fused parameter
    fuse: tuple[str, ...] = ()  # all slices of that parameter, in concatenation order


IGNORED = Resolved("")


@dataclass(frozen=True)
class Rule:
    """A checkpoint key template and the parameter template it fills, e.g.
    Rule("encoder.layer.{i}.output.dense.{w}", "layers.{i}.mlp.down.{w}").

    Templates work both ways: checkpoint -> parameter when loading, parameter -> checkpoint to
    name the key that is missing. With `fuse`, the source's {part} placeholder takes each value
    of `fuse` and those tensors are concatenated along dim 0, in that order, into the target.
    """

    source: str
    target: str
    fuse: tuple[str, ...] = ()
    _source_re: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _target_re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_source_re", _template_regex(self.source))
        object.__setattr__(self, "_target_re", _template_regex(self.target))

    def forward(self, key: str) -> Resolved | None:
        match = self._source_re.fullmatch(key)
        if match is None:
            return None
        values = match.groupdict()
        part = values.pop("part", None) if self.fuse else None
        if self.fuse and part not in self.fuse:
            return None
        return Resolved(self.target.format(**values), part, self.fuse)

    def sources_of(self, name: str) -> list[str]:
        """The checkpoint key(s) that would fill parameter `name`; [] if not this rule's."""
        match = self._target_re.fullmatch(name)
        if match is None:
            return []
        values = match.groupdict()
        if not self.fuse:
            return [self.source.format(**values)]
        return [self.source.format(**values, part=part) for part in self.fuse]


@dataclass(frozen=True)
class WeightMap:
    """How one family's checkpoints name their tensors, as data."""

    rules: tuple[Rule, ...]
    # Stripped from the front of a key when the rest is a known name ("bert." in BertForMaskedLM).
    prefixes: tuple[str, ...] = ()
    # (regex, replacement) applied with re.sub before matching: legacy spellings.
    normalize: tuple[tuple[str, str], ...] = ()
    # Full-match regexes of keys dropped on purpose (unused heads, stale buffers).
    ignore: tuple[str, ...] = ()

    def resolve(self, key: str) -> Resolved | None:
        """Where a checkpoint key goes: IGNORED if dropped on purpose, None if unknown."""
        for name in self._candidates(key):
            for rule in self.rules:
                resolved = rule.forward(name)
                if resolved is not None:
                    return resolved
            if any(re.fullmatch(p, name) for p in self.ignore):
                return IGNORED
        return None

    def expected_keys(self, name: str) -> list[str]:
        """The checkpoint key(s), without prefix, that fill our parameter `name`."""
        for rule in self.rules:
            keys = rule.sources_of(name)
            if keys:
                return keys
        return []

    def _candidates(self, key: str) -> Iterator[str]:
        for pattern, replacement in self.normalize:
            key = re.sub(pattern, replacement, key)
        yield key
        for prefix in self.prefixes:
            if key.startswith(prefix):
                yield key[len(prefix):]


# A sentence-transformers Dense module directory holds its nn.Linear as "linear.*", and with
# use_residual where the sizes differ, the projection of its input as "residual.weight".
DENSE_WEIGHT_MAP = WeightMap(rules=(Rule("linear.{w}", "linear.{w}"),
                                    Rule("residual.weight", "residual.weight")))


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The weight files of a directory: single or sharded safetensors, else pytorch_model.bin."""
    root = Path(model_dir)
    for name in CHECKPOINT_NAMES:
        path = root / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: unreadable shard index: {exc!r}") from exc
        if not (isinstance(weight_map, dict) and weight_map
                and all(isinstance(v, str) for v in weight_map.values())):
            raise ConfigError(f"{path}: the shard index's weight_map must map tensor names to "
                              "shard files")
        shards = [root / shard for shard in sorted(set(weight_map.values()))]
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise ConfigError(f"{path}: shards listed but not found: {missing}")
        _check_listed(path, set(weight_map), shards)
        return shards
    raise ConfigError(f"{root}: no weights found (looked for {', '.join(CHECKPOINT_NAMES)})")


def _check_listed(index: Path, listed: set[str], shards: list[Path]) -> None:
    """Every tensor the index lists must be in a shard: one that is not, even one we would
    ignore, means a truncated or mixed-up download. (Safetensors headers are read without
    the data; .bin shards would have to be unpickled whole, so they are not checked here.)"""
    if not all(shard.suffix == ".safetensors" for shard in shards):
        return
    held: set[str] = set()
    for shard in shards:
        with _open_safetensors(shard) as handle:
            held.update(handle.keys())
    absent = listed - held
    if absent:
        raise ConfigError(f"{index}: listed but in no shard (an incomplete download?): "
                          f"{_named(list(absent))}")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, CPU tensor) for every tensor of the files, read lazily, one file at a time."""
    for path in files:
        if path.suffix == ".safetensors":
            with _open_safetensors(path) as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield key, handle.get_tensor(key)
        else:
            state = _torch_load(path)
            if not isinstance(state, dict):
                raise ConfigError(f"{path}: not a state dict")
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    raise ConfigError(f"{path}: {key!r} is a {type(value).__name__}, not a "
                                      "tensor (a nested or non-weight state dict?)")
                yield key, value


def _open_safetensors(path: Path) -> Any:
    """safetensors' handle on `path`; a file it cannot open (a copy cut short, a corrupt
    header) is refused by name."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:
        raise ConfigError(f"{path}: cannot read weights: {exc}") from exc


def _torch_load(path: Path) -> object:
    # weights_only: a .bin is a pickle; never execute code from a model repo. mmap avoids a
    # second copy of big checkpoints but needs the zip format (torch >= 1.6), hence the retry.
    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{path}: cannot read weights: {exc}") from exc


def _named(keys: list[str]) -> str:
    shown = ", ".join(sorted(keys)[:_MAX_NAMED])
    more = len(keys) - _MAX_NAMED
    return shown + (f" and {more} more" if more > 0 else "")


def _slice_rows(module: nn.Module, name: str) -> tuple[int, ...]:
    """Rows of each slice of the fused parameter `name` (e.g. q, k and v of a qkv weight),
    as the module that splits it declares in `fused_rows`: the concatenation's total alone
    would let two wrong slices that add up pass."""
    owner, _, attr = name.rpartition(".")[0].rpartition(".")
    rows = getattr(module.get_submodule(owner), "fused_rows", {}).get(attr)
    if rows is None:
        raise RuntimeError(f"{name} is loaded fused but its module declares no fused_rows")
    return rows


def load_strict(module: nn.Module, files: list[Path], weight_map: WeightMap) -> None:
    """Fill every parameter and persistent buffer of `module` from `files`, or raise.

    Values are copied into the existing tensors (which may live on any device, in any dtype),
    so the module may be built on the meta device and `to_empty`-ed first: strictness
    guarantees that no uninitialised memory survives.
    """
    targets = module.state_dict(keep_vars=True)
    where = files[0].parent
    filled: dict[str, str] = {}  # our name -> checkpoint key(s) that filled it
    rejected: set[str] = set()  # names already reported (bad shape), not to be "missing" too
    parts: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, torch.Tensor]]]] = {}
    unexpected: list[str] = []
    problems: list[str] = []

    def assign(name: str, source: str, value: torch.Tensor) -> None:
        target = targets.get(name)
        if target is None:
            unexpected.append(source)
        elif name in filled:
            # One tied tensor saved under both its names is the same value twice; two values
            # are two candidates, and keeping whichever came last would be a silent choice.
            if not (value.is_floating_point() and value.shape == target.shape
                    and torch.equal(target, value.to(target.device, target.dtype))):
                problems.append(f"{name} filled twice, by different tensors "
                                f"({filled[name]} and {source})")
        elif tuple(value.shape) != tuple(target.shape):
            rejected.add(name)
            problems.append(
                f"shape mismatch for {source}: checkpoint {tuple(value.shape)}, "
                f"model {tuple(target.shape)}"
            )
        elif target.is_floating_point() != value.is_floating_point():
            # copy_ would cast int8 or bool weights without a word (not what was trained), or
            # truncate float values into an integer buffer (a StaticEmbedding's id mapping).
            rejected.add(name)
            problems.append(f"dtype mismatch for {source}: checkpoint {value.dtype}, model "
                            f"{'floating point' if target.is_floating_point() else target.dtype}")
        else:
            with torch.no_grad():
                target.copy_(value)
            filled[name] = source

    for key, value in iter_tensors(files):
        resolved = weight_map.resolve(key)
        if resolved is None:
            unexpected.append(key)
        elif resolved is IGNORED:
            continue
        elif resolved.part is None:
            assign(resolved.target, key, value)
        else:
            slot = parts.setdefault(resolved.target, (resolved.fuse, {}))[1]
            if resolved.part in slot:
                problems.append(f"{key} and {slot[resolved.part][0]} both fill one slice")
            slot[resolved.part] = (key, value)

    # Fused parameters are assembled once all their slices were read (they may sit in
    # different shards); each slice's shape is checked through the concatenation's.
    for name, (order, got) in parts.items():
        target = targets.get(name)
        if target is None:  # e.g. a layer past num_hidden_layers
            unexpected.extend(key for key, _ in got.values())
            continue
        if len(got) < len(order):
            expected = dict(zip(order, weight_map.expected_keys(name), strict=False))
            absent = [expected.get(p, p) for p in order if p not in got]
            problems.append(f"missing (slices of fused {name}): {_named(absent)}")
            continue
        sources = " + ".join(got[p][0] for p in order)
        # Slices stack along dim 0: each has the target's rank and its trailing dimensions.
        bad = [got[p][0] for p in order
               if got[p][1].dim() != target.dim() or got[p][1].shape[1:] != target.shape[1:]]
        if bad:
            shape = tuple(target.shape)
            problems.append(f"shape mismatch for {_named(bad)}: slices of {name} {shape}")
            continue
        rows = _slice_rows(module, name)
        short = [f"{got[p][0]} {tuple(got[p][1].shape)}" for p, n in zip(order, rows, strict=True)
                 if got[p][1].shape[0] != n]
        if short:
            problems.append(f"shape mismatch for {_named(short)}: slices of {name} have "
                            f"{' + '.join(map(str, rows))} rows")
            continue
        # Checked here too: concatenation would promote an integer slice to float.
        integral = [got[p][0] for p in order if not got[p][1].is_floating_point()]
        if integral:
            problems.append(f"dtype mismatch for {_named(integral)}: slices of {name} must be "
                            "floating point")
            continue
        assign(name, sources, torch.cat([got[p][1] for p in order], dim=0))

    missing = [
        " + ".join(weight_map.expected_keys(name)) or name
        for name in targets
        if name not in filled and name not in parts and name not in rejected
    ]
    if unexpected:
        problems.append(f"unexpected keys: {_named(unexpected)}")
    if missing:
        problems.append(f"missing (no checkpoint key fills): {_named(missing)}")
    if problems:
        raise ConfigError(f"{where}: cannot load weights strictly: " + "; ".join(problems))

