"""The router never imports torch: it must stay small and CUDA-free; only workers touch a device."""

import subprocess
import sys

CHECK = """
import pkgutil, importlib, sys
import router
for module in pkgutil.walk_packages(router.__path__, "router."):
    importlib.import_module(module.name)
import shared.config, shared.modelinfo, shared.protocol, shared.resolve, shared.logs
heavy = sorted(m for m in ("torch", "transformers", "sentence_transformers") if m in sys.modules)
print(",".join(heavy))
"""


def test_router_and_shared_do_not_import_torch():
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                            check=True, timeout=60)
    assert result.stdout.strip() == ""
