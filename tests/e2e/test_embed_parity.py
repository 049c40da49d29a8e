"""/embed on the real all-MiniLM-L6-v2 (from its PyPI wheel) equals SentenceTransformer.encode."""

from __future__ import annotations

import numpy as np
import pytest

from tests.e2e.conftest import PROMPTS

SENTENCES = [
    "What is Deep Learning?",
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
    "naïve café — unicode, émojis 🚀 and punctuation?!",
    "a",
]
LONG = " ".join(["embedding servers batch requests by token budget"] * 80)  # > 256 tokens


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def embed(server, **body) -> np.ndarray:
    response = server.client.post("/embed", json=body)
    assert response.status_code == 200, response.text
    return np.asarray(response.json(), dtype=np.float32)


def test_single_input_equals_sentence_transformers(server, st_minilm):
    ours = embed(server, inputs=SENTENCES[0])
    assert ours.shape == (1, 384)
    theirs = st_minilm.encode([SENTENCES[0]])
    assert cosines(ours, theirs).min() >= 0.99999
    assert np.abs(ours - theirs).max() < 1e-4


def test_batch_equals_sentence_transformers(server, st_minilm):
    ours = embed(server, inputs=SENTENCES)
    theirs = st_minilm.encode(SENTENCES)
    assert ours.shape == theirs.shape
    assert cosines(ours, theirs).min() >= 0.99999


def test_known_pair_cosine(server):
    a, b = embed(server, inputs=["The weather is lovely today.", "It's so sunny outside!"])
    assert float(a @ b) == pytest.approx(0.6660, abs=5e-4)


def test_long_input_is_truncated_like_sentence_transformers(server, st_minilm):
    response = server.client.post("/embed", json={"inputs": LONG})
    assert response.status_code == 200
    assert response.headers["x-compute-tokens"] == "256"
    ours = np.asarray(response.json(), dtype=np.float32)
    assert cosines(ours, st_minilm.encode([LONG])).min() >= 0.99999


def test_left_truncation_keeps_the_end(server, st_minilm):
    tokenizer = st_minilm.tokenizer
    ids = tokenizer(LONG, add_special_tokens=False)["input_ids"]
    tail = [tokenizer.cls_token_id, *ids[-254:], tokenizer.sep_token_id]
    ours = embed(server, inputs=LONG, truncation_direction="Left")
    theirs = embed(server, inputs=tail)
    assert cosines(ours, theirs).min() >= 0.99999
    assert np.allclose(embed(server, inputs=LONG, truncation_direction="left"), ours, atol=1e-6)


def test_normalize_false_is_the_vector_before_normalize(server, st_minilm):
    from sentence_transformers import SentenceTransformer

    unnormalized = SentenceTransformer(modules=[st_minilm[0], st_minilm[1]], device="cpu")
    ours = embed(server, inputs=SENTENCES, normalize=False)
    theirs = unnormalized.encode(SENTENCES)
    assert cosines(ours, theirs).min() >= 0.99999
    assert np.allclose(np.linalg.norm(ours, axis=1), np.linalg.norm(theirs, axis=1), rtol=1e-4)
    assert not np.allclose(np.linalg.norm(ours, axis=1), 1.0)


@pytest.mark.parametrize("dims", [1, 64, 384])
def test_dimensions_truncate_then_renormalize(server, st_minilm, dims):
    ours = embed(server, inputs=SENTENCES, dimensions=dims)
    theirs = st_minilm.encode(SENTENCES, truncate_dim=dims, normalize_embeddings=True)
    assert ours.shape == (len(SENTENCES), dims)
    assert np.abs(ours - theirs).max() < 1e-4
    raw = embed(server, inputs=SENTENCES, dimensions=dims, normalize=False)
    assert np.allclose(raw, embed(server, inputs=SENTENCES, normalize=False)[:, :dims], atol=1e-6)


@pytest.mark.parametrize("prompt_name", sorted(PROMPTS))
def test_prompts_equal_sentence_transformers(server, minilm_prompts_dir, prompt_name):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_prompts_dir), device="cpu")
    ours = embed(server, inputs=SENTENCES, prompt_name=prompt_name)
    theirs = st.encode(SENTENCES, prompt_name=prompt_name)
    assert cosines(ours, theirs).min() >= 0.99999
    plain = embed(server, inputs=SENTENCES)
    assert cosines(ours, plain).min() < 0.999  # the prompt really changed the input


def test_token_id_inputs_equal_text_inputs(server, st_minilm):
    ids = [st_minilm.tokenizer(s)["input_ids"] for s in SENTENCES[:3]]
    from_text = embed(server, inputs=SENTENCES[:3])
    assert cosines(embed(server, inputs=ids[0]), from_text[:1]).min() >= 0.99999
    assert cosines(embed(server, inputs=ids), from_text).min() >= 0.99999
    mixed = embed(server, inputs=[SENTENCES[0], ids[1], SENTENCES[2]])
    assert cosines(mixed, from_text).min() >= 0.99999


def test_batch_invariance(server):
    batch = embed(server, inputs=[*SENTENCES, LONG])
    for index, text in enumerate([*SENTENCES, LONG]):
        alone = embed(server, inputs=text)[0]
        assert np.abs(alone - batch[index]).max() < 1e-5, text


def test_default_dtype_on_this_cpu_stays_close_to_the_oracle(minilm_dir, st_minilm, tmp_path):
    """Without --dtype the worker picks its device's default (bfloat16 on a CPU with native
    bfloat16, shared/dtypes.py): /info says which, and the vectors keep the precision
    the README promises (cosine >= 0.999, the bound for float16/bfloat16 against float32)."""
    from shared.dtypes import default_dtype
    from tests.e2e.server import serving

    with serving("--model-id", str(minilm_dir), "--max-batch-tokens", "2048",
                 log_path=tmp_path / "server.log", dtype=None) as srv:
        assert srv.client.get("/info").json()["model_dtype"] == default_dtype("cpu")
        ours = embed(srv, inputs=[*SENTENCES, LONG])
    theirs = st_minilm.encode([*SENTENCES, LONG])
    assert cosines(ours, theirs).min() >= 0.999
