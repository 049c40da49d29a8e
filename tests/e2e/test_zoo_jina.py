"""A tiny JinaBERT v2 (hub key names, auto_map in config.json) served by the real `embedserve`.

The usual oracle, SentenceTransformer on the same directory, would have to run jina's remote
code, which cannot be loaded offline. /embed is compared instead to the float64 reference of
tests/fixtures/jina.py, mean-pooled (1_Pooling) and normalised (Normalize), cosine >= 0.9999.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.e2e.zoo import embed, serve_model
from tests.fixtures.jina import make_tiny_jina, reference_embeddings
from tests.fixtures.oracles import sequence_token_types
from tests.fixtures.tiny import pack

# The last input is long (words outside the tiny vocabulary split into characters), so the
# ALiBi bias shapes its vector.
TEXTS = ["hello world", "the weather is lovely today", "a cat",
         "jina embeddings read long documents, quickly; " * 4]


@pytest.fixture(scope="module")
def jina(tmp_path_factory):
    # Six heads: the non-power-of-two ALiBi slopes, through the whole serving path.
    model = make_tiny_jina(tmp_path_factory.mktemp("jina") / "m", "base", hidden=48, heads=6,
                           seed=5)
    # The router caps the input limit at --max-batch-tokens: 8192 leaves the config's own.
    with serve_model(model, tmp_path_factory.mktemp("logs"), 8192) as srv:
        yield model, srv


def test_embed_equals_the_reference(jina):
    model, srv = jina
    ours = embed(srv, np.float64, inputs=TEXTS)
    arrays, ids = pack(model, TEXTS)
    assert max(map(len, ids)) > 100
    ref = reference_embeddings(model, ids, sequence_token_types(arrays), "base").numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert ours.shape == (len(TEXTS), 48)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert (ours * ref).sum(1).min() >= 0.9999


def test_info_reports_mean_pooling_and_the_config_limit(jina):
    _, srv = jina
    info = srv.client.get("/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == 8192
