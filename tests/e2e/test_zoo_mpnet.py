"""A tiny random MPNet served by the real `embedserve`: /embed equals sentence-transformers on
the same directory (router position offset 2, relative position bias in every layer)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.e2e.server import serving
from tests.fixtures.families import make_tiny

TEXTS = ["hello world", "the weather is lovely today", "a",
         "A much longer input, with punctuation; digits 0123456789 and MiXeD case. " * 12]


@pytest.fixture(scope="module")
def mpnet(tmp_path_factory):
    model = make_tiny(tmp_path_factory.mktemp("mpnet") / "m", "mpnet", "MPNetModel",
                      pooling="mean", seed=9)
    log = tmp_path_factory.mktemp("logs") / "mpnet.log"
    with serving("--model-id", str(model), "--max-batch-tokens", "512", log_path=log) as srv:
        yield model, srv


def test_embed_equals_sentence_transformers(mpnet) -> None:
    from sentence_transformers import SentenceTransformer

    model, srv = mpnet
    response = srv.client.post("/embed", json={"inputs": TEXTS, "truncate": True})
    assert response.status_code == 200, response.text
    ours = np.asarray(response.json(), dtype=np.float64)
    theirs = SentenceTransformer(str(model), device="cpu").encode(TEXTS).astype(np.float64)
    cosine = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) *
                                       np.linalg.norm(theirs, axis=1))
    assert cosine.min() >= 0.99999
