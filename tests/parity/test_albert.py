"""ALBERT parity: hidden states (groups of shared layers, narrow embeddings, every checkpoint
class sentence-transformers loads the encoder of) against transformers, pooled vectors against
sentence-transformers, classifier logits against AlbertForSequenceClassification, and what is
refused. Tiny random checkpoints, fp32, CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from backend_worker.engine import Engine
from backend_worker.head_modules import ClassifierHead
from backend_worker.heads import build_head, run_head
from shared.errors import ConfigError
from shared.modelinfo import load_model_info
from tests.fixtures.albert import make_tiny_albert
from tests.fixtures.families import MAX_TOKENS, rename_to_tf_layer_norms
from tests.fixtures.oracles import hf_hidden, padded_inputs
from tests.fixtures.tiny import MIXED_TEXTS, pack

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COVERS = frozenset({"albert"})

TEXTS = MIXED_TEXTS
HIDDEN_TOL = 1e-4
LOGIT_TOL = 1e-4


def serve(model_dir: Path, pooling: str | None = None):
    info = load_model_info(model_dir, pooling_override=pooling)
    return info, Engine.load(info)


CASES = {
    "groups": ("AlbertModel", {}),
    # albert-base-v2's shape: one layer run at every step.
    "one-layer": ("AlbertModel", {"num_hidden_groups": 1, "inner_group_num": 1}),
    "as-many-groups-as-layers": ("AlbertModel", {"num_hidden_groups": 5, "inner_group_num": 1}),
    # Layers 0-4 run groups 0, 1, 3, 4, 6 (int(i / (5 / 8))); 2, 5 and 7 are never used.
    "more-groups-than-layers": ("AlbertModel", {"num_hidden_groups": 8, "inner_group_num": 1}),
    "embeddings-as-wide": ("AlbertModel", {"embedding_size": 32}),  # still projected
    "gelu": ("AlbertModel", {"hidden_act": "gelu"}),
    # Every LayerNorm (the embeddings', both of each layer) takes config.json's epsilon.
    "layer-norm-eps": ("AlbertModel", {"layer_norm_eps": 0.5}),
    "classifier": ("AlbertForSequenceClassification", {"num_labels": 2}),
    "pre-training": ("AlbertForPreTraining", {}),
    "masked-lm": ("AlbertForMaskedLM", {}),
    # Served as their encoder, as sentence-transformers loads them (heads dropped).
    "token-classification": ("AlbertForTokenClassification", {"num_labels": 3}),
    "question-answering": ("AlbertForQuestionAnswering", {}),
    "multiple-choice": ("AlbertForMultipleChoice", {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hidden_states_match_transformers(tmp_path: Path, case: str) -> None:
    from transformers import AlbertModel

    architecture, overrides = CASES[case]
    root = make_tiny_albert(tmp_path / case, architecture, seed=len(case), **overrides)
    _, engine = serve(root, "mean")
    arrays, ids = pack(root, TEXTS, MAX_TOKENS)
    assert len(set(map(len, ids))) == len(ids), "inputs must differ in length"
    ref = hf_hidden(AlbertModel.from_pretrained(str(root)).eval(), arrays)
    diff = (engine.hidden_states(arrays) - ref).abs().max().item()
    print(f"{case}: max abs diff of last hidden state {diff:.2e}")
    assert diff <= HIDDEN_TOL


def test_legacy_layer_norm_names_load(tmp_path: Path) -> None:
    """LayerNorm.gamma / .beta (TF-era saves), as transformers renames them on load."""
    from transformers import AlbertModel

    root = make_tiny_albert(tmp_path / "m", "AlbertForPreTraining", seed=5)
    rename_to_tf_layer_norms(root)
    _, engine = serve(root, "mean")
    arrays, _ = pack(root, TEXTS, MAX_TOKENS)
    ref = hf_hidden(AlbertModel.from_pretrained(str(root)).eval(), arrays)
    assert (engine.hidden_states(arrays) - ref).abs().max().item() <= HIDDEN_TOL


def test_absent_config_keys_read_as_albert_config_defaults(tmp_path: Path) -> None:
    """embedding_size 128, one group of one layer, gelu_new, eps 1e-12, two token types, 512
    positions. The embedding tables are scaled down so that another default epsilon (1e-5)
    would show in the embeddings' LayerNorm."""
    from safetensors.torch import load_file, save_file
    from transformers import AlbertModel

    root = make_tiny_albert(tmp_path / "m", seed=6, embedding_size=128, num_hidden_groups=1,
                            inner_group_num=1, hidden_act="gelu_new", layer_norm_eps=1e-12,
                            max_position_embeddings=512)
    config = json.loads((root / "config.json").read_text())
    for key in ("embedding_size", "num_hidden_groups", "inner_group_num", "hidden_act",
                "layer_norm_eps", "type_vocab_size", "max_position_embeddings"):
        config.pop(key)
    (root / "config.json").write_text(json.dumps(config))
    weights = load_file(str(root / "model.safetensors"))
    for key in weights:
        if key.endswith("_embeddings.weight"):
            weights[key] = weights[key] * 1e-3
    save_file(weights, str(root / "model.safetensors"), metadata={"format": "pt"})
    _, engine = serve(root, "mean")
    arrays, _ = pack(root, TEXTS, MAX_TOKENS)
    ref = hf_hidden(AlbertModel.from_pretrained(str(root)).eval(), arrays)
    assert (engine.hidden_states(arrays) - ref).abs().max().item() <= HIDDEN_TOL


def test_pooled_matches_sentence_transformers(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    root = make_tiny_albert(tmp_path / "m", pooling="mean", seed=3)
    texts = [t for t in TEXTS if isinstance(t, str)]
    info, engine = serve(root)
    arrays, _ = pack(root, texts, info.max_input_length)
    ours = engine.embed(arrays)
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    ref = SentenceTransformer(str(root), device="cpu").encode(texts, convert_to_numpy=True)
    assert np.abs(ours - ref).max() <= 1e-5


@pytest.mark.parametrize("labels", [1, 3])
def test_classifier_logits_match_transformers(tmp_path: Path, labels: int) -> None:
    from transformers import AlbertForSequenceClassification

    root = make_tiny_albert(tmp_path / "c", "AlbertForSequenceClassification", seed=7,
                            num_labels=labels)
    info, engine = serve(root)
    head = build_head(info, engine.device)
    assert isinstance(head, ClassifierHead)
    arrays, _ = pack(root, TEXTS, MAX_TOKENS)
    rows, dim, logits = run_head(engine, head)(arrays)
    assert (rows, dim) == (len(TEXTS), labels)
    hf = AlbertForSequenceClassification.from_pretrained(str(root)).eval()
    with torch.no_grad():
        expected = hf(**padded_inputs(arrays)).logits.numpy()
    assert np.abs(logits - expected).max() <= LOGIT_TOL


@pytest.mark.parametrize(("edit", "message"), [
    ({"num_hidden_groups": 0}, "num_hidden_groups=0 for 5 layers"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key'"),
    ({"hidden_act": "mish"}, "hidden_act 'mish' is not supported"),
    ({"num_attention_heads": None}, "ALBERT config lacks 'num_attention_heads'"),
])
def test_refused_configs(tmp_path: Path, edit: dict, message: str) -> None:
    root = make_tiny_albert(tmp_path / "m")
    config = json.loads((root / "config.json").read_text())
    config.update(edit)
    config = {key: value for key, value in config.items() if value is not None}
    (root / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        serve(root, "mean")


def test_no_mlm_head(tmp_path: Path) -> None:
    root = make_tiny_albert(tmp_path / "m", "AlbertForMaskedLM", seed=2)
    info, engine = serve(root, "splade")
    with pytest.raises(ConfigError, match=r"albert has no MLM \(SPLADE\) head"):
        build_head(info, engine.device)
