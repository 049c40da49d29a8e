"""DeBERTa-v2 / v3 parity: the log buckets, hidden states of every config switch against
transformers, pooled vectors against sentence-transformers, classifier logits against
DebertaV2ForSequenceClassification, all on tiny random checkpoints (fp32, CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from backend_worker.engine import Engine
from backend_worker.heads import build_head, run_head
from backend_worker.models.deberta_v2 import ContextPoolerHead
from backend_worker.models.disentangled import log_buckets
from shared.errors import ConfigError
from shared.modelinfo import load_model_info
from tests.fixtures.deberta import MAX_TOKENS, V2, make_tiny_deberta
from tests.fixtures.oracles import hf_hidden, padded_inputs
from tests.fixtures.tiny import MIXED_TEXTS, pack

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COVERS = frozenset({"deberta-v2"})

SENTENCE = "A much longer input, with punctuation; digits 0123456789 and MiXeD case. "
LONG = SENTENCE * 3  # over 128 tokens: cut there
# Lengths from 4 to 128 tokens: past the 16 buckets' exact range (8) and v2's clamp (24).
TEXTS = [*MIXED_TEXTS, SENTENCE * 2, LONG]
HIDDEN_TOL = 1e-4
LOGIT_TOL = 1e-4


def serve(model_dir: Path, pooling: str | None = None):
    info = load_model_info(model_dir, pooling_override=pooling)
    return info, Engine.load(info)


@pytest.mark.parametrize(("buckets", "max_position"), [(256, 512), (16, 128), (32, 64), (8, 9)])
def test_log_buckets_match_transformers(buckets: int, max_position: int) -> None:
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    relative = torch.arange(-1500, 1501)
    expected = make_log_bucket_position(relative, buckets, max_position).to(torch.long)
    assert torch.equal(log_buckets(relative, buckets, max_position), expected)
    assert expected.abs().max() > buckets // 2, "the log range must be reached"


CASES = {
    "v3": ("DebertaV2Model", {}),
    "v3-classifier-prefix": ("DebertaV2ForSequenceClassification", {"num_labels": 2}),
    "v3-masked-lm-legacy": ("DebertaV2ForMaskedLM", {}),
    "v3-masked-lm": ("DebertaV2ForMaskedLM", {"legacy": False}),
    "v3-question-answering": ("DebertaV2ForQuestionAnswering", {}),  # heads dropped
    "v3-c2p-only": ("DebertaV2Model", {"pos_att_type": "c2p"}),
    "v3-p2c-only-list": ("DebertaV2Model", {"pos_att_type": ["p2c"]}),
    "v3-more-buckets": ("DebertaV2Model", {"position_buckets": 64, "max_relative_positions": 96}),
    "v3-no-relative": ("DebertaV2Model", {"relative_attention": False}),
    "v3-embed-proj": ("DebertaV2Model", {"embedding_size": 16}),
    "v3-relu": ("DebertaV2Model", {"hidden_act": "relu"}),
    "v2": ("DebertaV2Model", {"base": V2}),
    "v2-own-c2p": ("DebertaV2Model", {"base": V2, "pos_att_type": "c2p"}),
    # Absolute positions and token types summed before the projection to the hidden size.
    "v2-embed-proj": ("DebertaV2Model", {"base": V2, "embedding_size": 16}),
    "v2-shared-keys-positions-only": ("DebertaV2Model", {"base": V2, "share_att_key": True,
                                                         "relative_attention": False}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hidden_states_match_transformers(tmp_path: Path, case: str) -> None:
    from transformers import AutoModel

    architecture, overrides = CASES[case]
    root = make_tiny_deberta(tmp_path / case, architecture, seed=len(case), **overrides)
    _, engine = serve(root, "mean")
    arrays, ids = pack(root, TEXTS, MAX_TOKENS)
    assert len(set(map(len, ids))) == len(ids), "inputs must differ in length"
    assert max(map(len, ids)) == MAX_TOKENS
    token_types = "type_vocab_size" in overrides or overrides.get("base") is V2
    ref = hf_hidden(AutoModel.from_pretrained(str(root)).eval(), arrays, token_types=token_types)
    diff = (engine.hidden_states(arrays) - ref).abs().max().item()
    print(f"{case}: max abs diff of last hidden state {diff:.2e}")
    assert diff <= HIDDEN_TOL


# Keys DebertaV2Config / the modeling code read with a default (transformers writes its declared
# fields to config.json; the others appear only where a checkpoint sets them).
DEFAULTED = ("max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_act",
             "relative_attention", "max_relative_positions", "position_biased_input",
             "pos_att_type", "pooler_hidden_act", "pooler_hidden_size", "share_att_key",
             "position_buckets", "norm_rel_ebd", "embedding_size")


@pytest.mark.parametrize("keep", [
    # The string form (as v2 checkpoints save it); 0 relative positions: the table length.
    {"relative_attention": True, "pos_att_type": "C2P | p2c", "max_relative_positions": 0},
    {},
], ids=["relative", "minimal"])
def test_absent_config_keys_read_as_transformers_defaults(tmp_path: Path, keep: dict) -> None:
    """A config.json without the optional keys (older conversions): every default as
    DebertaV2Config's (share_att_key false, no buckets, no table norm, eps 1e-7, absolute
    positions, no token types, gelu). The checkpoint is built with those defaults and its
    embeddings scaled so small that the LayerNorm's eps shows."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoModelForSequenceClassification

    root = make_tiny_deberta(tmp_path / "m", "DebertaV2ForSequenceClassification", seed=13,
                             base={}, num_labels=2, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=64, pad_token_id=0,
                             **({"relative_attention": True, "pos_att_type": ["c2p", "p2c"]}
                                if keep else {}))
    config = json.loads((root / "config.json").read_text())
    assert config["max_position_embeddings"] == 512 and config["type_vocab_size"] == 0
    config = {key: value for key, value in config.items() if key not in DEFAULTED}
    (root / "config.json").write_text(json.dumps({**config, **keep}))
    path = root / "model.safetensors"
    state = load_file(str(path))
    for name in ("word_embeddings", "position_embeddings"):  # variance ~1e-7: eps counts
        state[f"deberta.embeddings.{name}.weight"] *= 3e-4 / state[
            f"deberta.embeddings.{name}.weight"].std()
    save_file(state, str(path), metadata={"format": "pt"})
    info, engine = serve(root)
    arrays, _ = pack(root, TEXTS, MAX_TOKENS)
    ref = hf_hidden(AutoModel.from_pretrained(str(root)).eval(), arrays, token_types=False)
    assert (engine.hidden_states(arrays) - ref).abs().max().item() <= HIDDEN_TOL
    _, _, logits = run_head(engine, build_head(info, engine.device))(arrays)
    hf = AutoModelForSequenceClassification.from_pretrained(str(root)).eval()
    with torch.no_grad():
        expected = hf(**padded_inputs(arrays, token_types=False)).logits.numpy()
    assert np.abs(logits - expected).max() <= LOGIT_TOL


def test_token_types_count_in_v2(tmp_path: Path) -> None:
    """type_vocab_size 2 adds the pair's token types (the hidden states test would pass without
    them only if the second text's types were 0)."""
    root = make_tiny_deberta(tmp_path / "m", base=V2)
    _, engine = serve(root, "mean")
    arrays, _ = pack(root, [("short", "pair")])
    assert arrays.token_type_ids.any()
    ours = engine.hidden_states(arrays)
    untyped = engine.hidden_states(arrays._replace(token_type_ids=0 * arrays.token_type_ids))
    assert (ours - untyped).abs().max() > 1e-3


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooled_matches_sentence_transformers(tmp_path: Path, pooling: str) -> None:
    from sentence_transformers import SentenceTransformer

    root = make_tiny_deberta(tmp_path / "m", pooling=pooling, seed=3)
    texts = [t for t in TEXTS if isinstance(t, str)]
    info, engine = serve(root)
    assert (info.max_input_length, engine.max_positions) == (MAX_TOKENS, MAX_TOKENS)
    arrays, _ = pack(root, texts, info.max_input_length)
    ours = engine.embed(arrays)
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    ref = SentenceTransformer(str(root), device="cpu").encode(texts, convert_to_numpy=True)
    assert np.abs(ours - ref).max() <= 1e-5


@pytest.mark.parametrize(("labels", "pooler_act"), [(3, None), (1, None), (1, "tanh")])
def test_classifier_logits_match_transformers(tmp_path: Path, labels: int,
                                              pooler_act: str | None) -> None:
    from transformers import AutoModelForSequenceClassification

    extra = {} if pooler_act is None else {"pooler_hidden_act": pooler_act}
    root = make_tiny_deberta(tmp_path / "c", "DebertaV2ForSequenceClassification", seed=5,
                             num_labels=labels, **extra)
    info, engine = serve(root)
    assert info.kind == ("reranker" if labels == 1 else "classifier")
    head = build_head(info, engine.device)
    assert isinstance(head, ContextPoolerHead)
    arrays, _ = pack(root, TEXTS, MAX_TOKENS)
    rows, dim, logits = run_head(engine, head)(arrays)
    assert (rows, dim) == (len(TEXTS), labels)
    hf = AutoModelForSequenceClassification.from_pretrained(str(root)).eval()
    with torch.no_grad():
        expected = hf(**padded_inputs(arrays, token_types=False)).logits.numpy()
    assert np.abs(logits - expected).max() <= LOGIT_TOL


def test_cross_encoder_scores(tmp_path: Path) -> None:
    """A re-ranker saved by CrossEncoder: sigmoid of our logits is CrossEncoder.predict."""
    from sentence_transformers import CrossEncoder

    root = make_tiny_deberta(tmp_path / "c", "DebertaV2ForSequenceClassification", seed=8,
                             num_labels=1)
    CrossEncoder(str(root), device="cpu").save(str(root))
    info, engine = serve(root)
    pairs = [("what is the capital of france?", "Paris is the capital of France."),
             ("hello", "world"), ("a", LONG)]
    arrays, _ = pack(root, pairs, info.max_input_length)
    _, _, logits = run_head(engine, build_head(info, engine.device))(arrays)
    theirs = CrossEncoder(str(root), device="cpu").predict(pairs)
    assert np.abs(1 / (1 + np.exp(-logits[:, 0])) - theirs).max() <= 1e-5


def test_no_mlm_head(tmp_path: Path) -> None:
    """As in TEI, no SPLADE for DeBERTa: a *ForMaskedLM with --pooling splade fails at start."""
    root = make_tiny_deberta(tmp_path / "m", "DebertaV2ForMaskedLM")
    info, engine = serve(root, "splade")
    with pytest.raises(ConfigError, match="deberta-v2 has no MLM"):
        build_head(info, engine.device)


@pytest.mark.parametrize(("edit", "message"), [
    ({"conv_kernel_size": 3}, "DeBERTa-v2 with conv_kernel_size 3"),
    ({"pos_att_type": "p2c|p2p"}, r"DeBERTa-v2 with pos_att_type \['p2p'\]"),
    ({"hidden_act": "mish"}, "hidden_act 'mish'"),
    ({"pooler_hidden_act": "mish"}, "pooler_hidden_act 'mish'"),
    ({"num_hidden_layers": None}, "DeBERTa-v2 config lacks 'num_hidden_layers'"),
    ({"attention_head_size": 16}, "DeBERTa-v2 with attention_head_size 16"),
])
def test_refused_configs(tmp_path: Path, edit: dict, message: str) -> None:
    root = make_tiny_deberta(tmp_path / "m")
    config = json.loads((root / "config.json").read_text())
    config.update(edit)
    config = {key: value for key, value in config.items() if value is not None}
    (root / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        serve(root, "mean")


def test_relative_index_of_a_query_block_is_a_slice_of_the_whole(tmp_path: Path) -> None:
    """Long sequences attend in query blocks (a bounded mask): each block's d(i, j) must be the
    rows of the whole sequence's, for bucketed (v3) and clamped (v2) distances."""
    for base in (None, V2):
        root = make_tiny_deberta(tmp_path / "m", **({} if base is None else {"base": base}))
        _, engine = serve(root, "mean")
        bias = engine.model.layers[0].attention.mask.content
        whole = bias.index(0, 100, 100, torch.device("cpu"))
        assert torch.equal(bias.index(37, 20, 100, torch.device("cpu")), whole[37:57])
        if base is V2:  # distances of 99 pass the clamp at 24 both ways
            assert whole.min() == 0 and whole.max() == 2 * bias.span - 1


def test_a_saved_position_table_the_model_does_not_use_is_dropped(tmp_path: Path) -> None:
    """Without position_biased_input transformers ignores a saved position table (older
    conversions have one): so do we, and the vectors are unchanged. With it, it is loaded."""
    from safetensors.torch import load_file, save_file

    root = make_tiny_deberta(tmp_path / "m", "DebertaV2ForSequenceClassification")
    arrays, _ = pack(root, TEXTS, MAX_TOKENS)
    before = serve(root, "mean")[1].hidden_states(arrays)
    path = root / "model.safetensors"
    state = load_file(str(path))
    state["deberta.embeddings.position_embeddings.weight"] = torch.randn(MAX_TOKENS, 32)
    save_file(state, str(path), metadata={"format": "pt"})
    assert torch.equal(serve(root, "mean")[1].hidden_states(arrays), before)
    config = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**config, "position_biased_input": True}))
    assert not torch.equal(serve(root, "mean")[1].hidden_states(arrays), before)


def test_the_replaced_token_detection_head_is_ignored(tmp_path: Path) -> None:
    """microsoft/deberta-v3-* ship ELECTRA-style pre-training's discriminator head
    (mask_predictions.*), which every DebertaV2 class of transformers ignores: so do we."""
    from safetensors.torch import load_file, save_file

    root = make_tiny_deberta(tmp_path / "m", "DebertaV2ForMaskedLM", legacy=False)
    arrays, _ = pack(root, TEXTS, MAX_TOKENS)
    before = serve(root, "mean")[1].hidden_states(arrays)
    path = root / "model.safetensors"
    state = load_file(str(path))
    for name, shape in (("dense.weight", (32, 32)), ("dense.bias", (32,)),
                        ("LayerNorm.weight", (32,)), ("LayerNorm.bias", (32,)),
                        ("classifier.weight", (1, 32)), ("classifier.bias", (1,))):
        state[f"mask_predictions.{name}"] = torch.randn(shape)
    save_file(state, str(path), metadata={"format": "pt"})
    assert torch.equal(serve(root, "mean")[1].hidden_states(arrays), before)
