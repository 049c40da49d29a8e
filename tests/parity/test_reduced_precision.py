"""bfloat16 parity: our bf16 Engine on the real all-MiniLM-L6-v2 (shipped in the venv) against
sentence-transformers in float32, the oracle. The tolerance for reduced precision is
cosine >= 0.999 per vector; pooling accumulates in float32 whatever the model dtype."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from backend_worker.engine import Engine
from shared.modelinfo import load_model_info
from tests.fixtures.tiny import pack

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MIN_COSINE = 0.999

# Lengths from 3 to ~250 word pieces, so one batch spans several of PaddedSDPA's length groups.
TEXTS = [
    "hi",
    "The weather is lovely today.",
    "what is the capital of france?",
    "Paris is the capital and largest city of France, on the Seine.",
    " ".join(["A longer passage about embeddings and retrieval, with numbers 12345."] * 6),
    " ".join(["Sentence transformers map text to dense vectors for semantic search."] * 12),
    " ".join(["Padding, masking and pooling must agree across every sequence length."] * 20),
    "ünïcödé, emoji 🙂 and MiXeD case; punctuation!?",
]


@pytest.fixture(scope="module")
def minilm():
    from shared.resolve import default_model_dir

    try:
        return default_model_dir()
    except Exception as exc:  # pragma: no cover - the model ships with the dev venv
        pytest.skip(f"real MiniLM not available: {exc}")


def test_bf16_cosine_against_fp32_sentence_transformers(minilm) -> None:
    from sentence_transformers import SentenceTransformer

    info = load_model_info(minilm)
    arrays, _ = pack(minilm, TEXTS, max_length=info.max_input_length)
    ours = Engine.load(info, "cpu", torch.bfloat16).embed(arrays)
    assert ours.dtype == np.float32

    model = SentenceTransformer(str(minilm), device="cpu")
    ref = model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True, batch_size=64)
    ours = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    cosine = (ours * ref).sum(1)
    print(f"bf16 vs fp32 sentence-transformers: min cosine {cosine.min():.6f}")
    assert cosine.min() >= MIN_COSINE
