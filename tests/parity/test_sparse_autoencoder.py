"""CSR SparseEncoders (Transformer, Pooling, (Normalize), SparseAutoEncoder) served from their own
files, against SparseEncoder.encode of the same directory (fp32, CPU): the module's `normalize`,
a Normalize before it, top-k among more positive latents than k and among fewer, k from the
module or max_active_dims from config_sentence_transformers.json. Tiny random checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from backend_worker.csr_head import CsrHead
from backend_worker.engine import Engine
from backend_worker.heads import build_head, run_head
from shared.modelinfo import load_model_info
from tests.fixtures.oracles import densify
from tests.fixtures.sparse import make_csr
from tests.fixtures.tiny import MIXED_TEXTS, pack

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOL = 1e-4
TEXTS = [t for t in MIXED_TEXTS if isinstance(t, str)] + ["query: cat", "the the the dog"]


def served(model_dir: Path) -> np.ndarray:
    """The texts' vectors as the worker computes them from the model's own files."""
    info = load_model_info(model_dir)
    engine = Engine.load(info)
    head = build_head(info, engine.device)
    assert isinstance(head, CsrHead)
    arrays, _ = pack(model_dir, TEXTS)
    rows, dim, *frames = run_head(engine, head)(arrays)
    assert (rows, dim) == (len(TEXTS), info.embedding_dim)
    return densify(rows, dim, tuple(frames))


def reference(model_dir: Path) -> np.ndarray:
    from sentence_transformers import SparseEncoder

    encoder = SparseEncoder(str(model_dir), device="cpu")
    return encoder.encode(TEXTS, convert_to_tensor=True).to_dense().numpy()


@pytest.mark.parametrize(
    ("standardize", "l2_first", "pooling", "max_active_dims", "latent_shift", "v5_names"), [
        (False, False, "mean", None, 0.0, False),  # the module's k = 6 of ~32 positive latents
        (True, True, "cls", 9, 0.0, False),  # max_active_dims above k
        (True, False, "max", 3, 0.0, True),  # below k; sentence-transformers 5's type name
        (False, True, "mean", None, -0.9, False),  # fewer positive latents than k
    ])
def test_csr_files_match_sparse_encoder(
        tmp_path: Path, standardize: bool, l2_first: bool, pooling: str,
        max_active_dims: int | None, latent_shift: float, v5_names: bool) -> None:
    model_dir = make_csr(tmp_path / "enc", k=6, max_active_dims=max_active_dims,
                         standardize=standardize, l2_first=l2_first, pooling=pooling,
                         latent_shift=latent_shift, v5_names=v5_names)
    info = load_model_info(model_dir)
    assert info.csr is not None and info.embedding_dim == 64
    k = max_active_dims or 6
    assert (info.csr.k, info.csr.standardize, info.csr.l2_first) == (k, standardize, l2_first)
    ours, expected = served(model_dir), reference(model_dir)
    diff = float(np.abs(ours - expected).max())
    assert diff <= TOL, diff
    assert np.array_equal(ours > 0, expected > 0)
    kept = (ours > 0).sum(axis=1)
    if latent_shift == 0.0:
        assert (kept == k).all(), kept  # top-k chose among more positive entries
    else:
        assert (kept < k).any() and (kept > 0).any(), kept  # relu zeroed some of the k
