"""RoBERTa / XLM-RoBERTa / CamemBERT parity: hidden states against transformers (which derives
the offset positions from the ids), pooled vectors against sentence-transformers, classifier and
re-ranker logits against *ForSequenceClassification, SPLADE against *ForMaskedLM; tiny random
checkpoints, one of them behind multilingual-e5-small's real XLM-R tokenizer. fp32, CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from backend_worker.engine import Engine
from backend_worker.head_modules import ClassifierHead, SpladeHead
from backend_worker.heads import build_head, run_head
from shared.errors import ConfigError
from shared.modelinfo import load_model_info
from tests.fixtures.families import (
    MAX_TOKENS,
    make_tiny,
    make_tiny_xlmr,
    pack_offset,
)
from tests.fixtures.oracles import (
    cosine_rows,
    densify,
    last_hidden,
    mlm_reference,
    padded_inputs,
)
from tests.fixtures.tiny import MIXED_TEXTS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COVERS = frozenset({"roberta", "xlm-roberta", "camembert"})

TEXTS = MIXED_TEXTS
LONG = "A much longer input, with punctuation; digits 0123456789 and MiXeD case. " * 12
MULTILINGUAL: list[str | tuple[str, str]] = [
    "The weather is lovely today.",
    "Il fait très beau aujourd'hui, n'est-ce pas ?",
    ("¿Cuál es la capital de Francia?", "París es la capital de Francia."),
    "今日はとても良い天気ですね。",
    ("Wie spät ist es?", "Es ist halb zehn."),
    "Привет",
    LONG,  # truncated at the model's limit: the last row of the position table is used
]
HIDDEN_TOL = 1e-4
LOGIT_TOL = 1e-4


def serve(model_dir: Path, pooling: str | None = None):
    info = load_model_info(model_dir, pooling_override=pooling)
    engine = Engine.load(info)
    return info, engine


def fairseq_inputs(arrays) -> dict[str, torch.Tensor]:
    """transformers inputs padded with the families' pad id 1 and no token types: transformers
    then derives the positions from the ids, as these models are run in practice."""
    return padded_inputs(arrays, pad_id=1, token_types=False)


def transformers_hidden(model_dir: Path, arrays) -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir)).eval()
    return last_hidden(model, fairseq_inputs(arrays))


@pytest.mark.parametrize(
    ("model_type", "architecture"),
    [
        ("roberta", "RobertaModel"),
        ("roberta", "RobertaForMaskedLM"),  # "roberta." prefix, lm_head ignored
        # Served as their encoder, as sentence-transformers loads them (heads dropped).
        ("xlm-roberta", "XLMRobertaForQuestionAnswering"),
        ("roberta", "RobertaForTokenClassification"),
        ("xlm-roberta", "XLMRobertaModel"),
        ("camembert", "CamembertModel"),
    ],
)
def test_hidden_states_match_transformers(tmp_path: Path, model_type: str,
                                          architecture: str) -> None:
    root = make_tiny(tmp_path / "m", model_type, architecture)
    info, engine = serve(root, "mean")
    assert info.position_offset == 2
    assert engine.max_positions == MAX_TOKENS
    arrays, ids = pack_offset(root, TEXTS, info.position_offset)
    assert len(set(map(len, ids))) == len(ids), "inputs must differ in length"
    assert all(1 not in seq for seq in ids), "the pad id inside a sequence shifts HF's positions"
    diff = (engine.hidden_states(arrays) - transformers_hidden(root, arrays)).abs().max().item()
    print(f"{model_type}/{architecture}: max abs diff of last hidden state {diff:.2e}")
    assert diff <= HIDDEN_TOL


@pytest.mark.parametrize("pad", [1, 0], ids=["pad-id-inside-texts", "pad-token-id-is-bos"])
def test_hidden_states_match_transformers_where_sequences_hold_the_pad_id(tmp_path: Path,
                                                                          pad: int) -> None:
    """transformers numbers a token equal to pad_token_id as padding (position pad_token_id)
    and the later ones on without it: `<pad>` typed inside a text, or a config whose
    pad_token_id is <s>, which starts every sequence. Packed by the router's own `pack`."""
    import asyncio

    from router.packing import pack
    from router.queue import Entry
    from shared.protocol import OutputKind

    root = make_tiny(tmp_path / "m", "roberta", "RobertaModel", pad_token_id=pad)
    info, engine = serve(root, "mean")
    assert info.position_offset == pad + 1
    _, ids = pack_offset(root, TEXTS, info.position_offset)
    sequences = [[*seq[:2], 1, *seq[2:]] if pad == 1 else seq for seq in ids]
    loop = asyncio.new_event_loop()
    try:
        arrays = pack([Entry("", np.asarray(seq, dtype=np.int32), np.zeros(len(seq), np.int32),
                             info.position_offset, OutputKind.POOLED, loop.create_future())
                       for seq in sequences])
    finally:
        loop.close()
    assert all(pad in seq for seq in sequences)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(root)).eval()
    theirs = last_hidden(model, padded_inputs(arrays, pad_id=pad, token_types=False))
    diff = (engine.hidden_states(arrays) - theirs).abs().max().item()
    print(f"pad_token_id {pad}: max abs diff of last hidden state {diff:.2e}")
    assert diff <= HIDDEN_TOL


@pytest.mark.parametrize(("model_type", "pooling"), [("roberta", "mean"), ("camembert", "cls"),
                                                     ("xlm-roberta", "max")])
def test_pooled_matches_sentence_transformers(tmp_path: Path, model_type: str,
                                              pooling: str) -> None:
    from sentence_transformers import SentenceTransformer

    architecture = {"roberta": "RobertaModel", "camembert": "CamembertModel",
                    "xlm-roberta": "XLMRobertaModel"}[model_type]
    root = make_tiny(tmp_path / "m", model_type, architecture, pooling=pooling, seed=4)
    texts = [t for t in TEXTS if isinstance(t, str)] + [LONG]
    info, engine = serve(root)
    arrays, _ = pack_offset(root, texts, info.position_offset, info.max_input_length)
    ours = engine.embed(arrays)
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    ref = SentenceTransformer(str(root), device="cpu").encode(texts, convert_to_numpy=True)
    assert cosine_rows(ours, ref).min() >= 0.99999
    assert np.abs(ours - ref).max() <= 1e-5


@pytest.fixture(scope="module")
def xlmr_dir(tmp_path_factory) -> Path:
    return make_tiny_xlmr(tmp_path_factory.mktemp("xlmr") / "m", pooling="mean", max_tokens=64)


def test_real_xlmr_tokenizer_end_to_end(xlmr_dir: Path) -> None:
    """Unigram pieces, </s></s> between the two texts of a pair, positions 2..65 up to the last
    row of the table, and truncation at the model's limit, against both oracles."""
    from sentence_transformers import SentenceTransformer

    info, engine = serve(xlmr_dir)
    assert (info.position_offset, info.max_input_length, engine.max_positions) == (2, 64, 64)
    arrays, ids = pack_offset(xlmr_dir, MULTILINGUAL, info.position_offset,
                              info.max_input_length)
    assert [seq[:1] + seq[-1:] for seq in ids] == [[0, 2]] * len(ids)
    assert [2, 2] in [seq[i : i + 2] for seq in ids for i in range(len(seq))], "pair separator"
    assert max(map(len, ids)) == 64 and int(arrays.position_ids.max()) == 65
    assert all(1 not in seq for seq in ids)
    assert int(arrays.input_ids.max()) > 100_000, "ids from deep in the 250k vocabulary"

    diff = (engine.hidden_states(arrays) - transformers_hidden(xlmr_dir, arrays)).abs().max().item()
    assert diff <= HIDDEN_TOL, diff

    texts = [t for t in MULTILINGUAL if isinstance(t, str)]
    single, _ = pack_offset(xlmr_dir, texts, info.position_offset, info.max_input_length)
    ours = engine.embed(single)
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    ref = SentenceTransformer(str(xlmr_dir), device="cpu").encode(texts, convert_to_numpy=True)
    assert cosine_rows(ours, ref).min() >= 0.99999


def test_real_xlmr_tokenizer_reranker_pairs(tmp_path: Path) -> None:
    """bge-reranker's shape (XLMRobertaForSequenceClassification, one label) on real pairs."""
    from transformers import AutoModelForSequenceClassification

    root = make_tiny_xlmr(tmp_path / "reranker", "XLMRobertaForSequenceClassification",
                          seed=6, num_labels=1)
    info, engine = serve(root)
    head = build_head(info, engine.device)
    assert info.kind == "reranker" and isinstance(head, ClassifierHead)
    pairs = [p for p in MULTILINGUAL if isinstance(p, tuple)]
    pairs += [("what is the capital of france?", text) for text in MULTILINGUAL[:2]]
    arrays, _ = pack_offset(root, pairs, info.position_offset, info.max_input_length)
    _, _, logits = run_head(engine, head)(arrays)
    hf = AutoModelForSequenceClassification.from_pretrained(str(root)).eval()
    with torch.no_grad():
        expected = hf(**fairseq_inputs(arrays)).logits.numpy()
    assert np.abs(logits - expected).max() <= LOGIT_TOL


def test_reranker_limit_without_modules_is_cross_encoders(tmp_path: Path) -> None:
    """A re-ranker saved by transformers alone (no modules.json, as bge-reranker's): CrossEncoder
    truncates pairs at tokenizer_config.json's model_max_length where it is below the position
    table, and so must the router (it had taken the table's 64)."""
    from sentence_transformers import CrossEncoder

    root = make_tiny_xlmr(tmp_path / "reranker", "XLMRobertaForSequenceClassification",
                          seed=6, num_labels=1)
    config_path = root / "tokenizer_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text())
                                      | {"model_max_length": 40}))
    assert not (root / "modules.json").exists()
    assert load_model_info(root).max_input_length == 40
    assert CrossEncoder(str(root), device="cpu").max_seq_length == 40


@pytest.mark.parametrize(("model_type", "architecture", "labels"), [
    ("roberta", "RobertaForSequenceClassification", 3),
    ("xlm-roberta", "XLMRobertaForSequenceClassification", 1),
    ("camembert", "CamembertForSequenceClassification", 2),
])
def test_classifier_logits_match_transformers(tmp_path: Path, model_type: str,
                                              architecture: str, labels: int) -> None:
    from transformers import AutoModelForSequenceClassification

    root = make_tiny(tmp_path / "c", model_type, architecture, seed=7, num_labels=labels)
    info, engine = serve(root)
    head = build_head(info, engine.device)
    assert isinstance(head, ClassifierHead)
    arrays, _ = pack_offset(root, TEXTS, info.position_offset)
    rows, dim, logits = run_head(engine, head)(arrays)
    assert (rows, dim) == (len(TEXTS), labels)
    hf = AutoModelForSequenceClassification.from_pretrained(str(root)).eval()
    with torch.no_grad():
        expected = hf(**fairseq_inputs(arrays)).logits.numpy()
    assert np.abs(logits - expected).max() <= LOGIT_TOL


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta"])
def test_splade_matches_masked_lm(tmp_path: Path, model_type: str, tied: bool) -> None:
    architecture = {"roberta": "RobertaForMaskedLM", "xlm-roberta": "XLMRobertaForMaskedLM"}
    # hidden_act is not the LM head's activation: RobertaLMHead always applies gelu.
    root = make_tiny(tmp_path / "mlm", model_type, architecture[model_type], seed=8,
                     tie_word_embeddings=tied, hidden_act="relu")
    keys = load_file(str(root / "model.safetensors"))
    assert ("lm_head.decoder.weight" in keys) is not tied
    assert ("lm_head.decoder.bias" in keys) is not tied
    info, engine = serve(root, "splade")
    head = build_head(info, engine.device)
    assert isinstance(head, SpladeHead)
    arrays, _ = pack_offset(root, TEXTS, info.position_offset)
    rows, dim, *frames = run_head(engine, head)(arrays)
    ours = densify(rows, dim, tuple(frames))
    assert np.abs(ours - mlm_reference(root, fairseq_inputs(arrays))).max() <= 1e-4


def test_missing_classifier_key_is_named(tmp_path: Path) -> None:
    root = make_tiny(tmp_path / "c", "roberta", "RobertaForSequenceClassification")
    path = root / "model.safetensors"
    state = load_file(str(path))
    del state["classifier.out_proj.weight"]
    save_file(state, str(path), metadata={"format": "pt"})
    info, engine = serve(root)  # the encoder is complete: the head is what fails
    with pytest.raises(ConfigError, match=r"missing \(.*classifier\.out_proj\.weight"):
        build_head(info, engine.device)


@pytest.mark.parametrize(("override", "message"), [
    ({"is_decoder": True}, "RoBERTa with is_decoder=True"),
    ({"position_embedding_type": "relative_key"}, "RoBERTa position_embedding_type"),
    ({"hidden_act": "mish"}, "hidden_act 'mish'"),
])
def test_refused_configs(tmp_path: Path, override: dict, message: str) -> None:
    root = make_tiny(tmp_path / "m", "xlm-roberta", "XLMRobertaModel")
    config = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**config, **override}))
    with pytest.raises(ConfigError, match=message):
        serve(root, "mean")
