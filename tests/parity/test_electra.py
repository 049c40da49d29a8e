"""ELECTRA parity: hidden states (with and without the embeddings' projection, from every
checkpoint class sentence-transformers loads the encoder of) against transformers, pooled
vectors against sentence-transformers, classifier logits against
ElectraForSequenceClassification and re-ranker scores against CrossEncoder; the tokenizer its
files name (ElectraTokenizer) as transformers 5 builds it. Tiny random checkpoints, fp32, CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, normalizers

from backend_worker.engine import Engine
from backend_worker.head_modules import ClassifierHead
from backend_worker.heads import build_head, run_head
from shared.errors import ConfigError
from shared.modelinfo import load_model_info
from tests.fixtures.families import MAX_TOKENS, make_tiny, rename_to_tf_layer_norms
from tests.fixtures.oracles import hf_hidden, padded_inputs
from tests.fixtures.tiny import MIXED_TEXTS, pack
from tests.fixtures.tokenizer_oracle import router_tokens, transformers_tokens

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COVERS = frozenset({"electra"})

TEXTS = MIXED_TEXTS
HIDDEN_TOL = 1e-4
LOGIT_TOL = 1e-4


def serve(model_dir: Path, pooling: str | None = None):
    info = load_model_info(model_dir, pooling_override=pooling)
    return info, Engine.load(info)


@pytest.mark.parametrize(("architecture", "overrides"), [
    ("ElectraModel", {}),
    ("ElectraModel", {"embedding_size": 32}),  # as wide as the layers: no projection
    ("ElectraForPreTraining", {}),  # the discriminator checkpoints (google/electra-*)
    ("ElectraForMaskedLM", {}),  # the generator checkpoints
    ("ElectraForSequenceClassification", {"num_labels": 2}),
    # Served as their encoder, as sentence-transformers loads them (heads dropped).
    ("ElectraForTokenClassification", {"num_labels": 3}),
    ("ElectraForQuestionAnswering", {}),
    ("ElectraForMultipleChoice", {}),
])
def test_hidden_states_match_transformers(tmp_path: Path, architecture: str,
                                          overrides: dict) -> None:
    from transformers import ElectraModel

    root = make_tiny(tmp_path / "m", "electra", architecture, seed=len(architecture),
                     **overrides)
    _, engine = serve(root, "mean")
    arrays, ids = pack(root, TEXTS, MAX_TOKENS)
    assert len(set(map(len, ids))) == len(ids), "inputs must differ in length"
    ref = hf_hidden(ElectraModel.from_pretrained(str(root)).eval(), arrays)
    diff = (engine.hidden_states(arrays) - ref).abs().max().item()
    print(f"{architecture} {overrides}: max abs diff of last hidden state {diff:.2e}")
    assert diff <= HIDDEN_TOL


def test_legacy_layer_norm_names_load(tmp_path: Path) -> None:
    """LayerNorm.gamma / .beta (TF-era saves), as transformers renames them on load."""
    from transformers import ElectraModel

    root = make_tiny(tmp_path / "m", "electra", "ElectraForPreTraining", seed=5)
    rename_to_tf_layer_norms(root)
    _, engine = serve(root, "mean")
    arrays, _ = pack(root, TEXTS, MAX_TOKENS)
    ref = hf_hidden(ElectraModel.from_pretrained(str(root)).eval(), arrays)
    assert (engine.hidden_states(arrays) - ref).abs().max().item() <= HIDDEN_TOL


def test_embedding_size_defaults_to_electras(tmp_path: Path) -> None:
    """A config.json without embedding_size reads ElectraConfig's 128."""
    from transformers import ElectraModel

    root = make_tiny(tmp_path / "m", "electra", "ElectraModel", seed=4, embedding_size=128)
    config = json.loads((root / "config.json").read_text())
    del config["embedding_size"]
    (root / "config.json").write_text(json.dumps(config))
    _, engine = serve(root, "mean")
    arrays, _ = pack(root, TEXTS, MAX_TOKENS)
    ref = hf_hidden(ElectraModel.from_pretrained(str(root)).eval(), arrays)
    assert (engine.hidden_states(arrays) - ref).abs().max().item() <= HIDDEN_TOL


def test_pooled_matches_sentence_transformers(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    root = make_tiny(tmp_path / "m", "electra", "ElectraModel", pooling="mean", seed=3)
    texts = [t for t in TEXTS if isinstance(t, str)]
    info, engine = serve(root)
    arrays, _ = pack(root, texts, info.max_input_length)
    ours = engine.embed(arrays)
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    ref = SentenceTransformer(str(root), device="cpu").encode(texts, convert_to_numpy=True)
    assert np.abs(ours - ref).max() <= 1e-5


@pytest.mark.parametrize("labels", [1, 3])
def test_classifier_logits_match_transformers(tmp_path: Path, labels: int) -> None:
    """out_proj(gelu(dense(h[CLS]))): the exact gelu, whatever hidden_act says."""
    from transformers import ElectraForSequenceClassification

    root = make_tiny(tmp_path / "c", "electra", "ElectraForSequenceClassification", seed=7,
                     num_labels=labels, hidden_act="relu")
    info, engine = serve(root)
    assert info.kind == ("reranker" if labels == 1 else "classifier")
    head = build_head(info, engine.device)
    assert isinstance(head, ClassifierHead)
    arrays, _ = pack(root, TEXTS, MAX_TOKENS)
    rows, dim, logits = run_head(engine, head)(arrays)
    assert (rows, dim) == (len(TEXTS), labels)
    hf = ElectraForSequenceClassification.from_pretrained(str(root)).eval()
    with torch.no_grad():
        expected = hf(**padded_inputs(arrays)).logits.numpy()
    assert np.abs(logits - expected).max() <= LOGIT_TOL


def test_no_mlm_head(tmp_path: Path) -> None:
    """The generator's MLM head is not served as SPLADE (nor is ELECTRA in TEI at all)."""
    root = make_tiny(tmp_path / "m", "electra", "ElectraForMaskedLM", seed=2)
    info, engine = serve(root, "splade")
    with pytest.raises(ConfigError, match=r"electra has no MLM \(SPLADE\) head"):
        build_head(info, engine.device)


def test_the_named_tokenizer_class_is_berts(tmp_path: Path) -> None:
    """ElectraTokenizer (the name ELECTRA's files give) is BertTokenizer in transformers 5: a
    cased tokenizer.json under a tokenizer_config.json that does not say do_lower_case false is
    lower-cased, as sentence-transformers tokenizes."""
    root = make_tiny(tmp_path / "m", "electra", "ElectraModel")
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False)
    tokenizer.save(str(root / "tokenizer.json"))
    texts, pairs = ["Hello World", "THE WEATHER is Lovely"], [("Short", "PAIR")]
    expected, _ = transformers_tokens(root, "BertTokenizer", texts, pairs)
    # (ids, type ids and offsets: the tiny file has no decoder, which the class would add)
    assert router_tokens(root, "electra", texts, pairs)[0] == expected
    file_alone = Tokenizer.from_file(str(root / "tokenizer.json"))
    assert file_alone.encode(texts[0]).ids != expected[0][0]


def test_named_special_tokens_are_bert_tokenizers(tmp_path: Path) -> None:
    """A tokenizer_config.json that names ElectraTokenizer and no special tokens: BertTokenizer's
    defaults, as transformers 5 builds it."""
    from transformers import AutoTokenizer

    from shared.tokenizer_class import special_tokens

    root = make_tiny(tmp_path / "m", "electra", "ElectraModel")
    names = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
    cfg = json.loads((root / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "ElectraTokenizer"
    cfg = {key: value for key, value in cfg.items() if key not in names}
    (root / "tokenizer_config.json").write_text(json.dumps(cfg))
    (root / "special_tokens_map.json").unlink(missing_ok=True)
    hf = AutoTokenizer.from_pretrained(str(root))
    named = special_tokens(root, "electra")
    assert {key: named[key] for key in names} == {key: getattr(hf, key) for key in names}
