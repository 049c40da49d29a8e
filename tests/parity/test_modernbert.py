"""ModernBERT parity: our Engine against transformers (hidden states, classifier logits, MLM
head under SPLADE) and sentence-transformers (pooled vectors), on tiny random checkpoints built
offline, fp32 on CPU. The fixtures' local window (4 keys each side) is far shorter than the
longer test inputs, so local layers really are local."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from backend_worker.attention import PaddedSDPA
from backend_worker.engine import Engine
from backend_worker.head_modules import SpladeHead
from backend_worker.heads import build_head, run_head
from backend_worker.models.modernbert import ModernBertClassifierHead, ModernBertModel
from shared.errors import ConfigError
from shared.modelinfo import load_model_info
from tests.fixtures.checks import assert_batch_invariant
from tests.fixtures.modernbert import TINY_MODERNBERT, bare_modernbert, make_tiny_modernbert
from tests.fixtures.oracles import cosine_rows, densify, last_hidden, mlm_reference, padded_inputs
from tests.fixtures.tiny import MIXED_TEXTS, pack

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Model types this module proves against their oracle (tests/parity/test_zoo_coverage.py).
COVERS = frozenset({"modernbert"})

TEXTS = MIXED_TEXTS
HIDDEN_TOL = 1e-4
LOGIT_TOL = 1e-4
WINDOW = TINY_MODERNBERT["local_attention"] // 2


def rewrite_config(root: Path, drop: tuple[str, ...] = (), **values: Any) -> None:
    path = root / "config.json"
    config = json.loads(path.read_text())
    for key in drop:
        config.pop(key, None)
    path.write_text(json.dumps({**config, **values}, indent=2))


def hub_v4_config(root: Path) -> None:
    """The config.json spelling of the Hub releases (written by transformers 4): no
    layer_types / rope_parameters, a period and two rotary bases instead, plus keys that
    mean nothing to the model (layer_norm_eps, position_embedding_type)."""
    rewrite_config(root, drop=("layer_types", "rope_parameters"),
                   global_attn_every_n_layers=2, global_rope_theta=10_000.0,
                   local_rope_theta=50.0, layer_norm_eps=1e-5,
                   position_embedding_type="absolute", reference_compile=True)


HIDDEN_CASES: list[tuple[str, dict[str, Any]]] = [
    ("base", {}),
    ("masked-lm-prefix", {"architecture": "ModernBertForMaskedLM"}),
    ("biases", {"overrides": {"attention_bias": True, "mlp_bias": True, "norm_bias": True}}),
    ("odd-window", {"overrides": {"local_attention": 5}}),
    ("all-global", {"overrides": {"global_attn_every_n_layers": 1}}),
    ("silu", {"overrides": {"hidden_activation": "silu", "norm_eps": 1e-6}}),
    ("hub-v4-config", {}),
    # ModernBertConfig's sliding_window setter makes local_attention twice it: a config.json
    # that writes one (here 2 against local_attention 8) has windows of 2 keys each side.
    ("sliding-window-key", {}),
]


@pytest.mark.parametrize(("case", "kwargs"), HIDDEN_CASES, ids=[c[0] for c in HIDDEN_CASES])
def test_hidden_states_match_transformers(tmp_path: Path, case: str, kwargs: dict) -> None:
    from transformers import AutoModel

    root = bare_modernbert(tmp_path / case, seed=len(case), **kwargs)
    if case == "hub-v4-config":
        hub_v4_config(root)
    if case == "sliding-window-key":
        rewrite_config(root, sliding_window=2)
    engine = Engine.load(load_model_info(root, pooling_override="mean"))
    arrays, ids = pack(root, TEXTS)
    assert len(set(map(len, ids))) == len(ids), "inputs must differ in length"
    assert max(map(len, ids)) > 4 * TINY_MODERNBERT["local_attention"], "longer than the window"
    ours = engine.hidden_states(arrays)

    hf = AutoModel.from_pretrained(str(root)).eval()
    if case == "hub-v4-config":  # transformers read the legacy keys as we do
        assert hf.config.layer_types == ["full_attention", "sliding_attention"] * 2
    if case == "sliding-window-key":
        assert hf.config.local_attention == 4
    # ModernBERT takes no token types.
    ref = last_hidden(hf, padded_inputs(arrays, token_types=False))
    diff = (ours - ref).abs().max().item()
    print(f"{case}: max abs diff of last hidden state {diff:.2e}")
    assert diff <= HIDDEN_TOL


def test_local_layers_see_exactly_the_window(tmp_path: Path) -> None:
    """Layer 1 is local: its output at position 0 moves when the token WINDOW positions away
    changes, and not when the one at WINDOW + 1 does (local_attention // 2 each side)."""
    root = bare_modernbert(tmp_path / "m")
    engine = Engine.load(load_model_info(root, pooling_override="mean"))
    model = engine.model
    assert [layer.is_global for layer in model.layers] == [True, False, False, True]
    length = 3 * WINDOW
    torch.manual_seed(0)
    x = torch.randn(length, TINY_MODERNBERT["hidden_size"])
    cu = np.array([0, length], dtype=np.int64)
    meta = engine.attention.prepare(torch.from_numpy(cu), cu)
    rope = model.local_rotary.tables(torch.arange(length), torch.float32)
    attention = model.layers[1].attention
    with torch.inference_mode():
        base = attention(x, meta, rope)[0]
        for changed, visible in ((WINDOW, True), (WINDOW + 1, False)):
            y = x.clone()
            y[changed] += 1.0
            moved = (attention(y, meta, rope)[0] - base).abs().max().item()
            assert (moved > 1e-4) is visible, (changed, moved)


ST_CASES = [("mean", "modernbert-embed style"), ("cls", "gte-modernbert style")]


@pytest.fixture(scope="module", params=[c[0] for c in ST_CASES])
def st_model(request, tmp_path_factory) -> Path:
    return make_tiny_modernbert(tmp_path_factory.mktemp("st") / request.param,
                                pooling=request.param, seed=3)


def st_encode(model_dir: Path, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    # Our worker returns the vector before Normalize (the router normalises per request).
    model = SentenceTransformer(modules=list(model)[:-1], device="cpu")
    return model.encode(texts, normalize_embeddings=False, convert_to_numpy=True, batch_size=64)


def test_pooled_matches_sentence_transformers(st_model: Path) -> None:
    texts = [t for t in TEXTS if isinstance(t, str)]
    info = load_model_info(st_model)
    assert info.pooling == st_model.name
    engine = Engine.load(info)
    arrays, _ = pack(st_model, texts, max_length=info.max_input_length)
    ours = engine.embed(arrays)
    ref = st_encode(st_model, texts)
    cosine = cosine_rows(ours, ref)
    diff = float(np.abs(ours - ref).max())
    print(f"{st_model.name}: min cosine {cosine.min():.7f}, max abs diff {diff:.2e}")
    assert cosine.min() >= 0.9999
    assert diff <= 1e-4


def test_batch_invariance(st_model: Path) -> None:
    engine = Engine.load(load_model_info(st_model))
    assert_batch_invariant(engine, st_model, TEXTS)


def test_without_pooling_config_defaults_to_cls_like_tei(tmp_path: Path) -> None:
    # TEI defaults every model_type containing "bert" to CLS when 1_Pooling is absent.
    assert load_model_info(bare_modernbert(tmp_path / "m")).pooling == "cls"


CLASSIFIER_CASES: list[tuple[str, dict[str, Any]]] = [
    ("cls-3-labels", {"classifier_pooling": "cls"}),
    ("mean-3-labels", {"classifier_pooling": "mean"}),
    ("mean-biases-tanh", {"classifier_pooling": "mean", "classifier_bias": True,
                          "norm_bias": True, "classifier_activation": "tanh"}),
    ("cls-reranker", {"classifier_pooling": "cls", "num_labels": 1}),
]


@pytest.mark.parametrize(("case", "overrides"), CLASSIFIER_CASES,
                         ids=[c[0] for c in CLASSIFIER_CASES])
def test_classifier_logits_match_transformers(tmp_path: Path, case: str,
                                              overrides: dict[str, Any]) -> None:
    from transformers import AutoModelForSequenceClassification

    overrides = dict(overrides)  # the parameter is shared between runs
    labels = overrides.pop("num_labels", 3)
    id2label = {i: f"LABEL_{i}" for i in range(labels)}
    root = bare_modernbert(tmp_path / case, seed=5,
                           architecture="ModernBertForSequenceClassification",
                           overrides={**overrides, "id2label": id2label,
                                      "label2id": {v: k for k, v in id2label.items()}})
    info = load_model_info(root)
    assert info.kind == ("reranker" if labels == 1 else "classifier")
    engine = Engine.load(info)
    head = build_head(info, engine.device)
    assert isinstance(head, ModernBertClassifierHead)
    arrays, _ = pack(root, TEXTS)
    rows, dim, logits = run_head(engine, head)(arrays)
    assert (rows, dim, logits.dtype) == (len(TEXTS), labels, np.float32)

    hf = AutoModelForSequenceClassification.from_pretrained(str(root)).eval()
    with torch.no_grad():
        expected = hf(**padded_inputs(arrays, token_types=False)).logits.numpy()
    diff = float(np.abs(logits - expected).max())
    print(f"{case}: max abs diff of logits {diff:.2e}")
    assert diff <= LOGIT_TOL


@pytest.mark.parametrize("case", ["tied", "untied", "no-decoder-bias"])
def test_splade_matches_masked_lm(tmp_path: Path, case: str) -> None:
    overrides = {"untied": {"tie_word_embeddings": False},
                 "no-decoder-bias": {"decoder_bias": False, "classifier_bias": True,
                                     "norm_bias": True}}.get(case, {})
    root = bare_modernbert(tmp_path / case, seed=7, architecture="ModernBertForMaskedLM",
                           overrides=overrides)
    keys = load_file(str(root / "model.safetensors"))
    assert ("decoder.weight" in keys) is (case == "untied")
    assert ("decoder.bias" in keys) is (case != "no-decoder-bias")
    info = load_model_info(root, pooling_override="splade")
    engine = Engine.load(info)
    head = build_head(info, engine.device)
    assert isinstance(head, SpladeHead)
    arrays, _ = pack(root, TEXTS)
    rows, dim, *frames = run_head(engine, head)(arrays)
    assert (rows, dim) == (len(TEXTS), info.vocab_size)
    ours = densify(rows, dim, tuple(frames))
    expected = mlm_reference(root, padded_inputs(arrays))
    diff = float(np.abs(ours - expected).max())
    print(f"{case}: max abs diff of SPLADE vectors {diff:.2e}")
    assert diff <= LOGIT_TOL


# -- key mapping and refusals -------------------------------------------------------------------

def edit_weights(root: Path, drop: str | None = None,
                 add: dict[str, torch.Tensor] | None = None) -> None:
    path = root / "model.safetensors"
    state = load_file(str(path))
    if drop is not None:
        del state[drop]
    save_file({**state, **(add or {})}, str(path), metadata={"format": "pt"})


def test_missing_encoder_key_is_named(tmp_path: Path) -> None:
    root = bare_modernbert(tmp_path / "m", architecture="ModernBertForMaskedLM")
    edit_weights(root, drop="model.layers.1.attn_norm.weight")
    with pytest.raises(ConfigError, match=r"missing \(.*layers\.1\.attn_norm\.weight"):
        Engine.load(load_model_info(root, pooling_override="mean"))


def test_layer_zero_has_no_attention_norm(tmp_path: Path) -> None:
    root = bare_modernbert(tmp_path / "m")
    edit_weights(root, add={"layers.0.attn_norm.weight": torch.ones(32)})
    with pytest.raises(ConfigError, match=r"unexpected keys: layers\.0\.attn_norm\.weight"):
        Engine.load(load_model_info(root, pooling_override="mean"))


def test_decoder_bias_must_agree_with_config(tmp_path: Path) -> None:
    root = bare_modernbert(tmp_path / "m", architecture="ModernBertForMaskedLM",
                           overrides={"decoder_bias": False})
    edit_weights(root, add={"decoder.bias": torch.zeros(len(load_file(
        str(root / "model.safetensors"))["model.embeddings.tok_embeddings.weight"]))})
    with pytest.raises(ConfigError, match=r"unexpected keys: decoder\.bias"):
        build_head(load_model_info(root, pooling_override="splade"), torch.device("cpu"))


@pytest.mark.parametrize("untied", [False, True])
def test_a_stray_decoder_key_is_named(tmp_path: Path, untied: bool) -> None:
    # decoder.* is the MLM head's whole space (the encoder ignores it): nothing in it is
    # dropped unseen, tied (decoder.weight absent) or not.
    root = bare_modernbert(tmp_path / "m", architecture="ModernBertForMaskedLM",
                           overrides={"tie_word_embeddings": False} if untied else {})
    edit_weights(root, add={"decoder.extra": torch.zeros(2)})
    with pytest.raises(ConfigError, match=r"unexpected keys: decoder\.extra"):
        build_head(load_model_info(root, pooling_override="splade"), torch.device("cpu"))


def test_missing_classifier_head_key_is_named(tmp_path: Path) -> None:
    root = bare_modernbert(tmp_path / "m", architecture="ModernBertForSequenceClassification")
    edit_weights(root, drop="head.norm.weight")
    info = load_model_info(root)
    Engine.load(info)  # the encoder is complete: the head is what fails
    with pytest.raises(ConfigError, match=r"missing \(.*head\.norm\.weight"):
        build_head(info, torch.device("cpu"))


def tiny_config(**changes: Any) -> dict[str, Any]:
    import transformers

    config = transformers.ModernBertConfig(vocab_size=64, **TINY_MODERNBERT).to_dict()
    return {**config, **changes}


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("scaled-rope",
     {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0,
                                             "rope_theta": 1e4},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     r"rope_type 'linear' \(full_attention\) is not supported"),
    ("legacy-rope-scaling", {"rope_parameters": None, "rope_scaling": {"type": "dynamic",
                                                                       "factor": 2.0}},
     r"rope_type 'dynamic'"),
    ("null-theta", {"rope_parameters": None, "local_rope_theta": None},
     r"rope_theta None \(sliding_attention\)"),
    ("unknown-layer-type", {"layer_types": ["full_attention", "chunked_attention"] * 2},
     r"layer_types \['chunked_attention'\] are not supported"),
    ("layer-count", {"layer_types": ["full_attention"] * 3}, r"names 3 layers"),
    ("activation", {"hidden_activation": "gelu_fast"}, r"hidden_activation 'gelu_fast'"),
    ("heads", {"num_attention_heads": 5}, r"not divisible by 5 heads"),
    # transformers fails on it (None * 2 in the setter).
    ("null-sliding-window", {"sliding_window": None}, r"sliding_window None must be an integer"),
]


@pytest.mark.parametrize(("case", "changes", "message"), REFUSED, ids=[c[0] for c in REFUSED])
def test_unsupported_config_is_refused(case: str, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModernBertModel.from_config(tiny_config(**changes), PaddedSDPA())


def test_missing_config_key_is_named() -> None:
    config = tiny_config()
    del config["intermediate_size"]
    with pytest.raises(ConfigError, match=r"lacks 'intermediate_size'"):
        ModernBertModel.from_config(config, PaddedSDPA())


def test_unsupported_classifier_pooling_is_refused(tmp_path: Path) -> None:
    root = bare_modernbert(tmp_path / "m", architecture="ModernBertForSequenceClassification")
    rewrite_config(root, classifier_pooling="max")
    with pytest.raises(ConfigError, match=r"classifier_pooling 'max' is not supported"):
        build_head(load_model_info(root), torch.device("cpu"))
