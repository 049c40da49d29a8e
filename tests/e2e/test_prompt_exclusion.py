"""A model whose Pooling leaves the prompt out (include_prompt=false, as INSTRUCTOR's): /embed
with a prompt equals SentenceTransformer.encode with it, over real HTTP and the real worker."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import PROMPTS
from tests.e2e.server import serving

SENTENCES = ["What is Deep Learning?", "The weather is lovely today.", "a",
             "naïve café — unicode, émojis 🚀 and punctuation?!"]
LONG = " ".join(["embedding servers batch requests by token budget"] * 80)  # > 256 tokens


@pytest.fixture(scope="module")
def excluding_dir(minilm_prompts_dir: Path, tmp_path_factory) -> Path:
    """MiniLM with prompts whose mean pooling leaves them out."""
    root = tmp_path_factory.mktemp("minilm-exclude")
    for item in minilm_prompts_dir.iterdir():
        if item.name != "1_Pooling":
            (root / item.name).symlink_to(item.resolve())
    config = json.loads((minilm_prompts_dir / "1_Pooling" / "config.json").read_text())
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps(config | {"include_prompt": False}))
    return root


@pytest.fixture(scope="module")
def excluding(excluding_dir: Path, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with serving("--model-id", str(excluding_dir), "--max-batch-tokens", "4096",
                 log_path=log) as srv:
        yield srv


@pytest.fixture(scope="module")
def st_excluding(excluding_dir: Path):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(excluding_dir), device="cpu")
    assert model[1].include_prompt is False
    return model


def embed(server, **body) -> np.ndarray:
    response = server.client.post("/embed", json=body)
    assert response.status_code == 200, response.text
    return np.asarray(response.json(), dtype=np.float64)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("prompt_name", sorted(PROMPTS))
def test_prompt_is_left_out_as_sentence_transformers_does(excluding, st_excluding, prompt_name):
    inputs = [*SENTENCES, LONG]  # (LONG: cut on the right, the prompt kept whole)
    ours = embed(excluding, inputs=inputs, prompt_name=prompt_name)
    theirs = st_excluding.encode(inputs, prompt_name=prompt_name)
    assert cosines(ours, theirs).min() >= 0.99999
    # The prompt still reached the model (its tokens are attended to, just not pooled).
    assert cosines(ours, embed(excluding, inputs=inputs)).min() < 0.9999


def test_without_a_prompt_every_token_is_pooled(excluding, st_excluding):
    assert cosines(embed(excluding, inputs=SENTENCES),
                   st_excluding.encode(SENTENCES)).min() >= 0.99999


def test_left_truncation_leaves_out_only_what_is_left_of_the_prompt(excluding):
    # Cut on the left, the prompt's tokens go first: of the tokens sentence-transformers counts
    # as the prompt's, only [CLS] is left to leave out (read the states from /embed_all).
    body = {"inputs": LONG, "prompt_name": "query", "truncation_direction": "Left"}
    ours = embed(excluding, **body)
    response = excluding.client.post("/embed_all", json=body)
    assert response.status_code == 200, response.text
    states = np.asarray(response.json()[0], dtype=np.float64)
    assert states.shape[0] == 256
    mean = states[1:].mean(0)
    assert cosines(ours[0], mean) >= 0.99999
    assert cosines(ours[0], states.mean(0)) < 0.99999
