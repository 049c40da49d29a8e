"""The zoo's bookkeeping: every registered model type has a parity test, and importing the zoo
touches no GPU.

A parity module declares the model types it proves with `COVERS = frozenset({...})`; a family
registered without one fails here, so nothing is served that was never compared to its oracle.
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import tests.parity
from backend_worker.models import supported


def covered_model_types() -> dict[str, str]:
    covered: dict[str, str] = {}
    for module_info in pkgutil.iter_modules(tests.parity.__path__):
        if not module_info.name.startswith("test_"):
            continue
        module = importlib.import_module(f"tests.parity.{module_info.name}")
        for model_type in getattr(module, "COVERS", ()):
            covered[model_type] = module_info.name
    return covered


def test_every_registered_model_type_has_a_parity_test() -> None:
    covered = covered_model_types()
    missing = sorted(set(supported()) - set(covered))
    assert not missing, f"registered without a parity test (COVERS): {missing}"
    stale = sorted(set(covered) - set(supported()))
    assert not stale, f"parity tests for model types the registry does not serve: {stale}"


def test_importing_the_zoo_does_not_initialise_cuda() -> None:
    code = (
        "import torch, backend_worker.models, backend_worker.heads, backend_worker.engine\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'\n"
        "print(len(backend_worker.models.supported()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 1
