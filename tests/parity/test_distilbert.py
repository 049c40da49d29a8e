"""DistilBERT parity: hidden states against transformers (pairs numbered 1 by the tokenizer,
ignored as transformers ignores them), pooled vectors against sentence-transformers, classifier
logits against DistilBertForSequenceClassification, SPLADE against DistilBertForMaskedLM; tiny
random checkpoints, fp32 on CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from backend_worker.engine import Engine
from backend_worker.heads import build_head, run_head
from backend_worker.models.distilbert import DistilBertClassifierHead
from shared.errors import ConfigError
from shared.modelinfo import load_model_info
from tests.fixtures.families import MAX_TOKENS, make_tiny
from tests.fixtures.oracles import densify, hf_hidden, mlm_reference, padded_inputs
from tests.fixtures.tiny import MIXED_TEXTS, pack

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COVERS = frozenset({"distilbert"})

TEXTS = MIXED_TEXTS
LONG = "A much longer input, with punctuation; digits 0123456789 and MiXeD case. " * 12
HIDDEN_TOL = 1e-4
LOGIT_TOL = 1e-4


def serve(model_dir: Path, pooling: str | None = None):
    info = load_model_info(model_dir, pooling_override=pooling)
    return info, Engine.load(info)


@pytest.mark.parametrize(
    ("case", "architecture", "overrides"),
    [
        ("base", "DistilBertModel", {}),
        ("masked-lm-prefix", "DistilBertForMaskedLM", {}),
        ("question-answering", "DistilBertForQuestionAnswering", {}),  # heads dropped
        ("relu", "DistilBertModel", {"activation": "relu"}),
        # The saved table (random here, not a sinusoid) is what transformers uses.
        ("sinusoidal", "DistilBertModel", {"sinusoidal_pos_embds": True}),
    ],
)
def test_hidden_states_match_transformers(tmp_path: Path, case: str, architecture: str,
                                          overrides: dict) -> None:
    from transformers import AutoModel

    root = make_tiny(tmp_path / case, "distilbert", architecture, **overrides)
    info, engine = serve(root, "mean")
    assert (info.position_offset, engine.max_positions) == (0, MAX_TOKENS)
    arrays, ids = pack(root, TEXTS)
    assert len(set(map(len, ids))) == len(ids), "inputs must differ in length"
    assert arrays.token_type_ids.max() == 1, "the pair template numbers the second text 1"
    # DistilBERT takes no token types.
    ref = hf_hidden(AutoModel.from_pretrained(str(root)).eval(), arrays, token_types=False)
    diff = (engine.hidden_states(arrays) - ref).abs().max().item()
    print(f"{case}: max abs diff of last hidden state {diff:.2e}")
    assert diff <= HIDDEN_TOL


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooled_matches_sentence_transformers(tmp_path: Path, pooling: str) -> None:
    from sentence_transformers import SentenceTransformer

    root = make_tiny(tmp_path / "m", "distilbert", "DistilBertModel", pooling=pooling, seed=3)
    texts = [t for t in TEXTS if isinstance(t, str)] + [LONG]
    info, engine = serve(root)
    arrays, _ = pack(root, texts, max_length=info.max_input_length)
    ours = engine.embed(arrays)
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    ref = SentenceTransformer(str(root), device="cpu").encode(texts, convert_to_numpy=True)
    cosine = (ours * ref).sum(1) / np.linalg.norm(ref, axis=1)
    assert cosine.min() >= 0.99999
    assert np.abs(ours - ref).max() <= 1e-5


@pytest.mark.parametrize("labels", [3, 1])
def test_classifier_logits_match_transformers(tmp_path: Path, labels: int) -> None:
    from transformers import AutoModelForSequenceClassification

    root = make_tiny(tmp_path / "c", "distilbert", "DistilBertForSequenceClassification",
                     seed=5, num_labels=labels)
    info, engine = serve(root)
    assert info.kind == ("reranker" if labels == 1 else "classifier")
    head = build_head(info, engine.device)
    assert isinstance(head, DistilBertClassifierHead)
    arrays, _ = pack(root, TEXTS)
    rows, dim, logits = run_head(engine, head)(arrays)
    assert (rows, dim) == (len(TEXTS), labels)
    hf = AutoModelForSequenceClassification.from_pretrained(str(root)).eval()
    with torch.no_grad():
        expected = hf(**padded_inputs(arrays, token_types=False)).logits.numpy()
    assert np.abs(logits - expected).max() <= LOGIT_TOL


@pytest.mark.parametrize("tied", [True, False])
def test_splade_matches_masked_lm(tmp_path: Path, tied: bool) -> None:
    # The MLM head applies the config's activation too: relu, so a gelu there would show.
    root = make_tiny(tmp_path / "mlm", "distilbert", "DistilBertForMaskedLM", seed=6,
                     tie_word_embeddings=tied, activation="relu")
    assert ("vocab_projector.weight" in load_file(str(root / "model.safetensors"))) is not tied
    info, engine = serve(root, "splade")
    arrays, _ = pack(root, TEXTS)
    rows, dim, *frames = run_head(engine, build_head(info, engine.device))(arrays)
    ours = densify(rows, dim, tuple(frames))
    expected = mlm_reference(root, padded_inputs(arrays, token_types=False))
    assert np.abs(ours - expected).max() <= 1e-4


def test_missing_head_key_is_named(tmp_path: Path) -> None:
    root = make_tiny(tmp_path / "c", "distilbert", "DistilBertForSequenceClassification")
    path = root / "model.safetensors"
    state = load_file(str(path))
    del state["pre_classifier.bias"]
    save_file(state, str(path), metadata={"format": "pt"})
    info, engine = serve(root)
    with pytest.raises(ConfigError, match=r"missing \(.*pre_classifier\.bias"):
        build_head(info, engine.device)


def test_missing_position_table_is_named(tmp_path: Path) -> None:
    # With sinusoidal_pos_embds transformers would compute the table; we load it or fail.
    root = make_tiny(tmp_path / "m", "distilbert", "DistilBertModel", sinusoidal_pos_embds=True)
    path = root / "model.safetensors"
    state = load_file(str(path))
    del state["embeddings.position_embeddings.weight"]
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"missing \(.*embeddings\.position_embeddings\.weight"):
        serve(root, "mean")


@pytest.mark.parametrize(("edit", "message"), [
    ({"activation": "mish"}, "DistilBERT activation 'mish'"),
    ({"n_heads": None}, "DistilBERT config lacks 'n_heads'"),
])
def test_refused_configs(tmp_path: Path, edit: dict, message: str) -> None:
    root = make_tiny(tmp_path / "m", "distilbert", "DistilBertModel")
    config = json.loads((root / "config.json").read_text())
    config.update(edit)
    config = {k: v for k, v in config.items() if v is not None}
    (root / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        serve(root, "mean")
