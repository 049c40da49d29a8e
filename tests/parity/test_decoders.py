"""Decoder parity (qwen2, qwen3, mistral, llama): our Engine against transformers (hidden
states, classifier logits) and sentence-transformers (last-token and mean pooled vectors), on
tiny random checkpoints built offline, fp32 on CPU; and the config values we refuse."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from backend_worker.engine import Engine
from backend_worker.heads import build_head, run_head
from backend_worker.models.decoder import LastTokenClassifier
from shared.errors import ConfigError
from shared.modelinfo import load_model_info
from tests.fixtures.checks import assert_batch_invariant, assert_packed_equals_padded
from tests.fixtures.decoders import (
    decoder_vocab,
    make_decoder_dir,
    make_st_decoder,
    right_padded,
    set_config,
    transformers_hidden,
)
from tests.fixtures.oracles import cosine_rows
from tests.fixtures.tiny import pack

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Model types this module proves against their oracle (tests/parity/test_zoo_coverage.py).
COVERS = frozenset({"qwen2", "qwen3", "mistral", "llama"})

# Different lengths, up to ~120 tokens: longer than every sliding window below.
TEXTS: list[str | tuple[str, str]] = [
    "The weather is lovely today.",
    "hi",
    ("what is the capital of france?", "Paris is the capital and largest city of France."),
    "A much longer input, with punctuation; digits 0123456789 and MiXeD case: it spans "
    "well over forty word pieces so that padding inside the batch is substantial.",
    "short",
]
HIDDEN_TOL = 1e-4
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

# (id, model_type, config overrides, architecture)
HIDDEN_CASES = [
    ("qwen2", "qwen2", {}, None),
    ("qwen2-causal-lm", "qwen2", {}, "Qwen2ForCausalLM"),
    ("qwen2-bidirectional", "qwen2", {"is_causal": False}, None),
    ("qwen2-window", "qwen2",
     {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}, None),
    ("qwen3-head-dim", "qwen3", {"head_dim": 16}, None),
    ("qwen3-attention-bias", "qwen3", {"attention_bias": True, "rope_theta": 1000.0}, None),
    ("qwen3-bidirectional", "qwen3", {"is_causal": False}, None),
    ("mistral-window", "mistral", {"sliding_window": 5, "head_dim": 16}, None),
    ("mistral-bidirectional-window", "mistral", {"sliding_window": 5, "is_causal": False}, None),
    ("llama-bias-linear-rope", "llama",
     {"attention_bias": True, "mlp_bias": True,
      "rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}}, None),
    ("llama3-rope", "llama", {"rope_parameters": LLAMA3_ROPE}, "LlamaForCausalLM"),
]


def engine_hidden(model_dir: Path) -> tuple[torch.Tensor, list[list[int]]]:
    engine = Engine.load(load_model_info(model_dir, pooling_override="last-token"))
    arrays, ids = pack(model_dir, TEXTS)
    return engine.hidden_states(arrays), ids


@pytest.mark.parametrize(("case", "model_type", "overrides", "architecture"), HIDDEN_CASES,
                         ids=[c[0] for c in HIDDEN_CASES])
def test_hidden_states_match_transformers(tmp_path: Path, case: str, model_type: str,
                                          overrides: dict, architecture: str | None) -> None:
    root = make_decoder_dir(tmp_path / case, model_type, overrides=overrides,
                            architecture=architecture)
    ours, ids = engine_hidden(root)
    assert len(set(map(len, ids))) == len(ids), "inputs must differ in length"
    ref = transformers_hidden(root, ids)
    diff = (ours - ref).abs().max().item()
    print(f"{case}: max abs diff of last hidden state {diff:.2e}")
    assert diff <= HIDDEN_TOL


@pytest.mark.parametrize(("case", "change"), [
    ("qwen2-bidirectional", {"is_causal": None}),
    ("qwen2-window", {"use_sliding_window": False, "layer_types": None}),
    ("mistral-window", {"sliding_window": None}),
    ("mistral-bidirectional-window", {"is_causal": None}),
    ("llama3-rope", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
])
def test_the_setting_under_test_changes_the_output(tmp_path: Path, case: str,
                                                   change: dict) -> None:
    """Each special case above is exercised: without its setting the output differs (the
    window is shorter than the long input, the rope scaling reaches the positions used)."""
    _, model_type, overrides, architecture = next(c for c in HIDDEN_CASES if c[0] == case)
    root = make_decoder_dir(tmp_path / case, model_type, overrides=overrides,
                            architecture=architecture)
    with_setting, _ = engine_hidden(root)
    set_config(root, **change)
    without, _ = engine_hidden(root)
    assert (with_setting - without).abs().max().item() > 1e-2


def test_layer_types_derived_from_max_window_layers(tmp_path: Path) -> None:
    """Hub configs older than transformers 5 carry no layer_types: Qwen's rule (layers from
    max_window_layers on use the window) gives the same model."""
    overrides = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}
    root = make_decoder_dir(tmp_path / "m", "qwen2", overrides=overrides)
    ref, ids = engine_hidden(root)
    assert json.loads((root / "config.json").read_text())["layer_types"] == [
        "full_attention", "sliding_attention"]
    set_config(root, layer_types=None)
    ours, _ = engine_hidden(root)
    assert (ours - ref).abs().max().item() == 0.0
    assert (ours - transformers_hidden(root, ids)).abs().max().item() <= HIDDEN_TOL


def test_rope_scaling_in_the_older_config_format(tmp_path: Path) -> None:
    """rope_theta + rope_scaling (what Hub configs say) equals rope_parameters."""
    root = make_decoder_dir(tmp_path / "m", "llama", overrides={"rope_parameters": LLAMA3_ROPE})
    ref, ids = engine_hidden(root)
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k not in ("rope_type", "rope_theta")}
    set_config(root, rope_parameters=None, rope_theta=LLAMA3_ROPE["rope_theta"],
               rope_scaling={"type": "llama3", **scaling})
    ours, _ = engine_hidden(root)
    assert (ours - ref).abs().max().item() == 0.0
    assert (ours - transformers_hidden(root, ids)).abs().max().item() <= HIDDEN_TOL


def test_rope_scaling_wins_over_rope_parameters(tmp_path: Path) -> None:
    """A config carrying both (hand-edited Hub configs do): transformers uses rope_scaling."""
    root = make_decoder_dir(tmp_path / "m", "llama", overrides={"rope_parameters": LLAMA3_ROPE})
    set_config(root, rope_scaling={"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0})
    ours, ids = engine_hidden(root)
    assert (ours - transformers_hidden(root, ids)).abs().max().item() <= HIDDEN_TOL


def test_a_top_level_original_max_position_embeddings_wins_over_the_rope_dicts(
    tmp_path: Path,
) -> None:
    """transformers lets config.json's own original_max_position_embeddings override the one
    inside llama3's rope settings: the context the frequencies are scaled against."""
    root = make_decoder_dir(tmp_path / "m", "llama", overrides={"rope_parameters": LLAMA3_ROPE})
    inside, _ = engine_hidden(root)
    set_config(root, original_max_position_embeddings=64)
    ours, ids = engine_hidden(root)
    assert (ours - inside).abs().max().item() > 1e-2  # 64, not the 16 inside, is used
    assert (ours - transformers_hidden(root, ids)).abs().max().item() <= HIDDEN_TOL


def test_a_top_level_rope_theta_in_the_older_config_format(tmp_path: Path) -> None:
    """Hub configs older than transformers 5 give rope_theta beside no rope dict at all."""
    theta = {"rope_type": "default", "rope_theta": 500.0}
    root = make_decoder_dir(tmp_path / "m", "llama", overrides={"rope_parameters": theta})
    ref, ids = engine_hidden(root)
    set_config(root, rope_parameters=None, rope_scaling=None, rope_theta=500.0)
    ours, _ = engine_hidden(root)
    assert (ours - ref).abs().max().item() == 0.0
    assert (ours - transformers_hidden(root, ids)).abs().max().item() <= HIDDEN_TOL


def test_use_bidirectional_attention_means_is_causal_false(tmp_path: Path) -> None:
    """Qwen3 embedders that attend bidirectionally say use_bidirectional_attention (TEI reads
    it; transformers reads is_causal): both switches give transformers' bidirectional model."""
    root = make_decoder_dir(tmp_path / "m", "qwen3", overrides={"is_causal": False})
    ours_causal_flag, ids = engine_hidden(root)
    ref = transformers_hidden(root, ids)
    set_config(root, is_causal=None, use_bidirectional_attention=True)
    ours, _ = engine_hidden(root)
    assert (ours - ref).abs().max().item() <= HIDDEN_TOL
    assert (ours - ours_causal_flag).abs().max().item() == 0.0


def test_strict_loading_names_a_stray_key(tmp_path: Path) -> None:
    """Qwen2's output projection has no bias: a checkpoint that carries one is refused."""
    root = make_decoder_dir(tmp_path / "m", "qwen2")
    state = load_file(str(root / "model.safetensors"))
    state["layers.0.self_attn.o_proj.bias"] = torch.zeros(32)
    save_file(state, str(root / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"unexpected keys: layers\.0\.self_attn\.o_proj\.bias"):
        Engine.load(load_model_info(root, pooling_override="last-token"))


# ---------------------------------------------------------------- sentence-transformers


ST_CASES = [
    # (id, model_type, pooling, overrides)
    ("qwen3-lasttoken", "qwen3", "lasttoken", {"head_dim": 16}),
    ("qwen2-bidirectional-lasttoken", "qwen2", "lasttoken", {"is_causal": False}),
    ("mistral-window-lasttoken", "mistral", "lasttoken", {"sliding_window": 5}),
    ("llama-mean", "llama", "mean", {}),
]


@pytest.fixture(scope="module", params=ST_CASES, ids=[c[0] for c in ST_CASES])
def st_model(request, tmp_path_factory) -> Path:
    name, model_type, pooling, overrides = request.param
    return make_st_decoder(tmp_path_factory.mktemp("st") / name, model_type, pooling=pooling,
                           overrides=overrides)


def st_reference(model_dir: Path, texts: list[str]) -> np.ndarray:
    """SentenceTransformer's vectors before Normalize (our worker leaves normalising to the
    router), with its own tokenizer: end-of-text appended, batch padded on the left."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    assert model.tokenizer.padding_side == "left"
    unnormalized = SentenceTransformer(modules=list(model)[:-1], device="cpu")
    return unnormalized.encode(texts, convert_to_numpy=True, batch_size=64)


def test_pooled_matches_sentence_transformers(st_model: Path) -> None:
    texts = [t for t in TEXTS if isinstance(t, str)]
    info = load_model_info(st_model)
    engine = Engine.load(info)
    arrays, ids = pack(st_model, texts, max_length=info.max_input_length)
    eos = decoder_vocab()["<|endoftext|>"]
    assert all(seq[-1] == eos for seq in ids), "the tokenizer appends end-of-text"
    ours = engine.embed(arrays)
    ref = st_reference(st_model, texts)
    cosine = cosine_rows(ours, ref)
    print(f"{st_model.name}: min cosine {cosine.min():.7f}, max abs diff "
          f"{np.abs(ours - ref).max():.2e}")
    assert cosine.min() >= 0.9999
    assert np.abs(ours - ref).max() <= 1e-4


def test_batch_invariance(st_model: Path) -> None:
    info = load_model_info(st_model)
    assert_batch_invariant(Engine.load(info), st_model, TEXTS, info.max_input_length)


def test_tokenizer_json_alone_decides_the_end_of_text(tmp_path: Path) -> None:
    """The router tokenizes with tokenizer.json's post-processor (as TEI does). transformers 5,
    hence sentence-transformers, uses the same one and does not apply tokenizer_config.json's
    add_bos_token / add_eos_token on top: if that changed, last-token vectors would differ."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    root = make_decoder_dir(tmp_path / "m", "qwen3")
    config_path = root / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "add_bos_token": True, "add_eos_token": False}))
    ours = [e.ids for e in Tokenizer.from_file(str(root / "tokenizer.json")).encode_batch(
        ["a cat", "the weather is lovely today"])]
    theirs = AutoTokenizer.from_pretrained(str(root))(["a cat", "the weather is lovely today"])
    assert ours == theirs["input_ids"]
    assert all(ids[-1] == decoder_vocab()["<|endoftext|>"] for ids in ours)


def test_packed_path_and_graphs_equal_the_padded_path(st_model: Path) -> None:
    """The CUDA path's logic on the CPU: packed varlen attention (the kernel's documented
    window semantics, tests/fixtures/varlen.py) and replayed graph buckets give the padded
    path's vectors, so each MaskSpec (causal, window, GQA) converts to the kernel's terms."""
    assert_packed_equals_padded(st_model, TEXTS, (1, 3, len(TEXTS)))


# ---------------------------------------------------------------------------- classifier

CLASSIFIER_CASES = [
    ("Qwen2ForSequenceClassification", "qwen2", 3),
    ("Qwen3ForSequenceClassification", "qwen3", 1),
    ("MistralForSequenceClassification", "mistral", 3),
    ("LlamaForSequenceClassification", "llama", 2),
]


@pytest.mark.parametrize(("architecture", "model_type", "labels"), CLASSIFIER_CASES)
def test_classifier_logits_match_transformers(tmp_path: Path, architecture: str,
                                              model_type: str, labels: int) -> None:
    from transformers import AutoModelForSequenceClassification

    # pad_token_id must differ from the appended end-of-text token: transformers pools the
    # rightmost token that is not padding (see LastTokenClassifier).
    pad = decoder_vocab()["[PAD]"]
    id2label = {i: f"label_{i}" for i in range(labels)}
    overrides = {"pad_token_id": pad, "id2label": id2label,
                 "label2id": {v: k for k, v in id2label.items()}}
    if model_type == "mistral":
        overrides["sliding_window"] = 5
    root = make_decoder_dir(tmp_path / "m", model_type, overrides=overrides,
                            architecture=architecture)
    info = load_model_info(root)
    assert info.kind == ("reranker" if labels == 1 else "classifier")
    engine = Engine.load(info)
    head = build_head(info, engine.device)
    assert isinstance(head, LastTokenClassifier)
    arrays, ids = pack(root, TEXTS)
    rows, dim, logits = run_head(engine, head)(arrays)
    assert (rows, dim, logits.dtype) == (len(TEXTS), labels, np.float32)

    hf = AutoModelForSequenceClassification.from_pretrained(str(root)).eval()
    input_ids, mask = right_padded(ids, pad)
    with torch.no_grad():
        expected = hf(input_ids=input_ids, attention_mask=mask).logits.numpy()
    diff = float(np.abs(logits - expected).max())
    print(f"{architecture}: max abs diff of logits {diff:.2e}")
    assert diff <= 1e-4


def test_classifier_head_keys_are_strict(tmp_path: Path) -> None:
    root = make_decoder_dir(tmp_path / "m", "qwen3", overrides={"num_labels": 2},
                            architecture="Qwen3ForSequenceClassification")
    state = load_file(str(root / "model.safetensors"))
    del state["score.weight"]
    save_file(state, str(root / "model.safetensors"))
    info = load_model_info(root)
    engine = Engine.load(info)  # the encoder does not need the head's keys
    with pytest.raises(ConfigError, match=r"missing .*score\.weight"):
        build_head(info, engine.device)


# ------------------------------------------------------------------------------ refusals

REFUSALS = [
    # (id, model_type, config changes, message pattern)
    ("yarn-rope", "qwen3", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0},
                            "rope_parameters": None}, "rope type 'yarn' is not supported"),
    ("rope-unknown-key", "llama", {"rope_parameters": {"rope_type": "default",
                                                        "rope_theta": 1e4, "factor": 2.0}},
     r"rope type 'default' with \['factor'\] is not supported"),
    ("contradiction", "qwen3", {"is_causal": True, "use_bidirectional_attention": True},
     "contradicts"),
    ("not-a-bool", "qwen3", {"is_causal": "no"}, "is_causal must be true or false"),
    ("custom-code", "qwen2", {"auto_map": {"AutoModel": "modeling_qwen.Qwen2Model"}},
     "does not say whether its attention is causal"),
    ("mistral-layer-types", "mistral",
     {"layer_types": ["sliding_attention", "full_attention"]}, "layer_types is not supported"),
    ("qwen-window-off", "qwen2", {"layer_types": ["sliding_attention", "full_attention"]},
     "use_sliding_window is false"),
    ("qwen-bad-layer-types", "qwen2",
     {"use_sliding_window": True, "sliding_window": 4, "layer_types": ["full_attention"]},
     "per each of 2 layers"),
    ("activation", "llama", {"hidden_act": "gelu_fast"}, "hidden_act 'gelu_fast'"),
    ("partial-rotary", "qwen2", {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
]


@pytest.mark.parametrize(("case", "model_type", "changes", "message"), REFUSALS,
                         ids=[r[0] for r in REFUSALS])
def test_refused_configs(tmp_path: Path, case: str, model_type: str, changes: dict,
                         message: str) -> None:
    root = make_decoder_dir(tmp_path / case, model_type)
    set_config(root, **changes)
    with pytest.raises(ConfigError, match=message):
        Engine.load(load_model_info(root, pooling_override="last-token"))


def test_custom_code_that_states_its_direction_loads(tmp_path: Path) -> None:
    """gte-Qwen2's config with the direction spelled out is served (bidirectionally)."""
    root = make_decoder_dir(tmp_path / "m", "qwen2", overrides={"is_causal": False})
    ref, _ = engine_hidden(root)
    copy = Path(shutil.copytree(root, tmp_path / "copy"))
    set_config(copy, auto_map={"AutoModel": "modeling_qwen.Qwen2Model"})
    ours, _ = engine_hidden(copy)
    assert (ours - ref).abs().max().item() == 0.0
