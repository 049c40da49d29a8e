"""CUDA tests: run by bench/gpu_check.sh on a GPU host, skipped everywhere else."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (bench/gpu_check.sh runs these)")
    for item in items:
        if "tests/gpu/" in str(item.fspath):
            item.add_marker(skip)
