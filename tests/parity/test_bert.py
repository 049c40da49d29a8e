"""BERT parity: our Engine against transformers (hidden states) and sentence-transformers
(pooled vectors), on tiny random checkpoints built offline, fp32 on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from backend_worker.engine import Engine
from shared.modelinfo import load_model_info
from tests.fixtures.checks import assert_batch_invariant
from tests.fixtures.oracles import cosine_rows, hf_hidden
from tests.fixtures.tiny import (
    MIXED_TEXTS,
    make_tiny_bert,
    pack,
    save_bert_weights,
    write_tokenizer,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Model types this module proves against their oracle (tests/parity/test_zoo_coverage.py).
COVERS = frozenset({"bert"})

TEXTS = MIXED_TEXTS
HIDDEN_TOL = 1e-4
POOLED_TOL = 1e-5


def bare_model(root: Path, **weights_kwargs) -> Path:
    """tokenizer + config + weights, no sentence-transformers files (pooling given explicitly)."""
    root.mkdir(parents=True)
    write_tokenizer(root, 128)
    save_bert_weights(root, **weights_kwargs)
    return root


@pytest.mark.parametrize(
    ("case", "weights_kwargs"),
    [
        ("base", {}),
        ("sharded", {"sharded": True}),
        ("bin", {"bin_format": True}),
        ("sharded-bin", {"sharded": True, "bin_format": True}),
        ("masked-lm-prefix", {"architecture": "BertForMaskedLM"}),
        # Served as their encoder, as sentence-transformers loads them (heads dropped).
        ("question-answering", {"architecture": "BertForQuestionAnswering"}),
        ("token-classification", {"architecture": "BertForTokenClassification"}),
        ("pre-training", {"architecture": "BertForPreTraining"}),
        ("gelu_new", {"overrides": {"hidden_act": "gelu_new"}}),
        ("relu", {"overrides": {"hidden_act": "relu"}}),
        ("silu", {"overrides": {"hidden_act": "silu"}}),
    ],
)
def test_hidden_states_match_transformers(tmp_path: Path, case: str, weights_kwargs: dict) -> None:
    from transformers import AutoModel

    root = bare_model(tmp_path / case, **weights_kwargs)
    engine = Engine.load(load_model_info(root, pooling_override="mean"))
    arrays, ids = pack(root, TEXTS)
    assert len(set(map(len, ids))) == len(ids), "inputs must differ in length"
    assert arrays.token_type_ids.max() == 1, "pairs must exercise token type 1"
    ours = engine.hidden_states(arrays)
    ref = hf_hidden(AutoModel.from_pretrained(str(root)).eval(), arrays)
    diff = (ours - ref).abs().max().item()
    print(f"{case}: max abs diff of last hidden state {diff:.2e}")
    assert diff <= HIDDEN_TOL


ST_CASES = [
    # (id, make_tiny_bert kwargs)
    ("mean-v6", {"pooling": "mean"}),
    ("cls-dense-v6", {"pooling": "cls", "dense_out": 16}),
    # sentence-transformers 6's use_residual: the input added back, projected (32 -> 16) or not.
    ("cls-dense-residual-projected", {"pooling": "cls", "dense_out": 16, "dense_residual": True}),
    ("mean-dense-residual", {"pooling": "mean", "dense_out": 32, "dense_residual": True}),
    ("max-v6", {"pooling": "max"}),
    ("lasttoken-v6", {"pooling": "lasttoken"}),
    ("weightedmean-v6", {"pooling": "weightedmean"}),
    ("mean_sqrt_len-v6", {"pooling": "mean_sqrt_len_tokens"}),
    ("mean-classic", {"pooling": "mean", "st_format": "classic"}),
    ("weightedmean-classic", {"pooling": "weightedmean", "st_format": "classic"}),
    ("cls-dense-classic", {"pooling": "cls", "dense_out": 16, "st_format": "classic"}),
    ("max-classic", {"pooling": "max", "st_format": "classic"}),
    ("mean-v6-sharded", {"pooling": "mean", "sharded": True}),
    ("mean-classic-bin", {"pooling": "mean", "st_format": "classic", "bin_format": True}),
    ("cls-dense-v6-sharded-bin",
     {"pooling": "cls", "dense_out": 16, "sharded": True, "bin_format": True}),
]


@pytest.fixture(scope="module", params=ST_CASES, ids=[c[0] for c in ST_CASES])
def st_model(request, tmp_path_factory) -> Path:
    name, kwargs = request.param
    return make_tiny_bert(tmp_path_factory.mktemp("st") / name, **kwargs)


def st_encode(model_dir: Path, texts: list[str], normalized: bool) -> np.ndarray:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize

    model = SentenceTransformer(str(model_dir), device="cpu")
    assert isinstance(model[-1], Normalize), "the fixture ends with Normalize"
    if not normalized:
        # Our worker returns the vector before Normalize (the router normalises per request).
        model = SentenceTransformer(modules=list(model)[:-1], device="cpu")
    return model.encode(texts, normalize_embeddings=False, convert_to_numpy=True, batch_size=64)


def test_pooled_matches_sentence_transformers(st_model: Path) -> None:
    texts = [t for t in TEXTS if isinstance(t, str)]
    info = load_model_info(st_model)
    engine = Engine.load(info)
    arrays, _ = pack(st_model, texts, max_length=info.max_input_length)
    ours = engine.embed(arrays)
    assert ours.dtype == np.float32
    assert ours.shape == (len(texts), info.embedding_dim)

    ref = st_encode(st_model, texts, normalized=False)
    diff = float(np.abs(ours - ref).max())
    print(f"{st_model.name}: max abs diff of pooled vector {diff:.2e}")
    assert cosine_rows(ours, ref).min() >= 0.99999
    assert diff <= POOLED_TOL

    # And what a client gets with normalize=true: ours normalised vs the full pipeline.
    normalized = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    assert np.abs(normalized - st_encode(st_model, texts, normalized=True)).max() <= POOLED_TOL


def test_batch_invariance(st_model: Path) -> None:
    engine = Engine.load(load_model_info(st_model))
    assert_batch_invariant(engine, st_model, TEXTS)


def test_engine_attributes(tmp_path: Path) -> None:
    root = make_tiny_bert(tmp_path / "m", pooling="cls", dense_out=8)
    engine = Engine.load(load_model_info(root))
    assert engine.cost_model.value == "padded"
    assert engine.dtype_name == "float32"
    assert engine.device_name == "cpu"
    assert engine.max_positions == 128
    arrays, _ = pack(root, ["hello world"])
    assert engine.embed(arrays).shape == (1, 8)


def test_out_of_range_ids_fail_loudly(tmp_path: Path) -> None:
    root = make_tiny_bert(tmp_path / "m")
    engine = Engine.load(load_model_info(root))
    arrays, _ = pack(root, ["hello world"])
    too_far = arrays._replace(position_ids=arrays.position_ids + 127)
    with pytest.raises(ValueError, match="position_ids"):
        engine.embed(too_far)

