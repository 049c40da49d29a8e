"""router/query_route.py's weights file on its own, written here (no model): one tensor
`weight` of one float per vocabulary id, anything else refused at start naming the file
(mutation testing, round 8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from router.inputs import InputRules
from router.query_route import QueryVectors
from shared.errors import ConfigError
from shared.sparse_router import QueryRoute


def _vectors(path: Path) -> QueryVectors:
    route = QueryRoute(query="query", document="document", default="document",
                       weights_path=str(path), max_length=None)
    return QueryVectors(route, None, 4, InputRules(512, 32, 4, {}, None))


def test_a_weight_beside_other_tensors_is_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "model.safetensors"
    save_file({"weight": np.ones(4, dtype=np.float32),
               "bias": np.ones(4, dtype=np.float32)}, str(path))
    with pytest.raises(ConfigError) as refused:
        _vectors(path)
    assert str(refused.value) == (
        f"{path}: expected one tensor `weight` of [4] (one per vocabulary id), found "
        "{'bias': [4], 'weight': [4]}")


def test_float8_weights_are_refused_by_name(tmp_path: Path) -> None:
    """numpy has no float8 either: safetensors.numpy fails on it with an AttributeError."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"weight": torch.ones(4, dtype=torch.float8_e4m3fn)}, str(path))
    with pytest.raises(ConfigError) as refused:
        _vectors(path)
    assert str(refused.value).startswith(f"{path}: not read (")
    assert str(refused.value).endswith(
        "); the query route's weights are read as float16/32/64")


def test_a_file_cut_short_is_refused_by_name(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "model.safetensors"
    save_file({"weight": np.ones(4, dtype=np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:-5])  # a copy that stopped early
    with pytest.raises(ConfigError) as refused:
        _vectors(path)
    assert str(refused.value).startswith(f"{path}: not read (")
    assert "float16/32/64" not in str(refused.value)


def test_float_weights_are_read_as_float32(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "model.safetensors"
    save_file({"weight": np.array([0.0, 1.5, 0.0, -2.0], dtype=np.float16)}, str(path))
    assert _vectors(path)._weight.dtype == np.float32
