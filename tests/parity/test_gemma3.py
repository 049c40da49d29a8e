"""Gemma 3 text parity (EmbeddingGemma's architecture): our Engine against transformers'
Gemma3TextModel (hidden states) and sentence-transformers (mean pooling + two bias-free Dense
modules), on tiny random checkpoints built offline, fp32 on CPU; and the values we refuse."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from backend_worker.engine import Engine
from shared.errors import ConfigError
from shared.modelinfo import load_model_info
from tests.fixtures import gemma
from tests.fixtures.checks import assert_batch_invariant, assert_packed_equals_padded
from tests.fixtures.decoders import (
    GEMMA_STYLE,
    TINY_EMBEDDING_GEMMA,
    TINY_GEMMA,
    make_decoder_dir,
    make_embedding_gemma,
    set_config,
)
from tests.fixtures.gemma import (
    HIDDEN_TOL,
    TEXTS,
    assert_hidden_matches,
    assert_null_window_refused,
    hidden_diff,
)
from tests.fixtures.oracles import cosine_rows
from tests.fixtures.tiny import pack

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Model types this module proves against their oracle (tests/parity/test_zoo_coverage.py).
COVERS = frozenset({"gemma3_text"})

POOLING = "mean"
GEMMA = TINY_GEMMA
EMBEDDING_GEMMA = TINY_EMBEDDING_GEMMA

HIDDEN_CASES = [
    ("bidirectional", EMBEDDING_GEMMA, None),
    ("bidirectional-odd-window", {**EMBEDDING_GEMMA, "sliding_window": 7}, None),
    ("causal", GEMMA, None),
    ("linear-rope-global", {**EMBEDDING_GEMMA, "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        "full_attention": {"rope_type": "linear", "rope_theta": 5000.0, "factor": 4.0}}}, None),
    ("attention-bias", {**EMBEDDING_GEMMA, "attention_bias": True}, None),
    ("causal-lm", GEMMA, "Gemma3ForCausalLM"),
]


def make(root: Path, overrides: dict, architecture: str | None = None) -> Path:
    return make_decoder_dir(root, "gemma3_text", style=GEMMA_STYLE, overrides=overrides,
                            architecture=architecture)


def engine_hidden(model_dir: Path) -> tuple[torch.Tensor, list[list[int]]]:
    return gemma.engine_hidden(model_dir, POOLING)


@pytest.mark.parametrize(("case", "overrides", "architecture"), HIDDEN_CASES,
                         ids=[c[0] for c in HIDDEN_CASES])
def test_hidden_states_match_transformers(tmp_path: Path, case: str, overrides: dict,
                                          architecture: str | None) -> None:
    root = make(tmp_path / case, overrides, architecture)
    assert_hidden_matches(root, POOLING, overrides["sliding_window"], case)


@pytest.mark.parametrize(("case", "change"), [
    ("bidirectional", {"use_bidirectional_attention": None}),
    ("bidirectional", {"sliding_window": 64}),
    ("bidirectional", {"rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 5000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 5000.0}}}),
    ("bidirectional", {"query_pre_attn_scalar": 16}),
    ("linear-rope-global", {"rope_parameters": EMBEDDING_GEMMA["rope_parameters"]}),
])
def test_the_setting_under_test_changes_the_output(tmp_path: Path, case: str,
                                                   change: dict) -> None:
    """What the cases above exercise shows in the output: the direction, the local window,
    the per-layer-type rotary base, the score scale, the global rope scaling."""
    _, overrides, architecture = next(c for c in HIDDEN_CASES if c[0] == case)
    root = make(tmp_path / case, overrides, architecture)
    with_setting, _ = engine_hidden(root)
    set_config(root, **change)
    without, _ = engine_hidden(root)
    assert (with_setting - without).abs().max().item() > 1e-2


def test_older_config_format(tmp_path: Path) -> None:
    """Hub configs written before transformers 5: sliding_window_pattern instead of
    layer_types, rope_theta / rope_local_base_freq / rope_scaling instead of rope_parameters."""
    overrides = {**EMBEDDING_GEMMA, "num_hidden_layers": 4, "layer_types": None,
                 "sliding_window_pattern": 2}
    root = make(tmp_path / "m", overrides)
    set_config(root, layer_types=None, sliding_window_pattern=2, rope_parameters=None,
               rope_theta=5000.0, rope_local_base_freq=100.0,
               rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert hidden_diff(root, POOLING) <= HIDDEN_TOL


def test_rope_parameters_without_a_base_take_the_top_level_ones(tmp_path: Path) -> None:
    """rope_parameters whose layer types name no rope_theta: transformers fills them from
    config.json's rope_theta (global) and rope_local_base_freq (local), not its defaults."""
    root = make(tmp_path / "m", EMBEDDING_GEMMA)
    set_config(root, rope_parameters={"sliding_attention": {"rope_type": "default"},
                                      "full_attention": {"rope_type": "default"}},
               rope_theta=5000.0, rope_local_base_freq=100.0)
    assert hidden_diff(root, POOLING) <= HIDDEN_TOL


@pytest.fixture(scope="module")
def embedding_gemma(tmp_path_factory) -> Path:
    return make_embedding_gemma(tmp_path_factory.mktemp("st") / "gemma")


def test_pooled_matches_sentence_transformers(embedding_gemma: Path) -> None:
    from sentence_transformers import SentenceTransformer

    info = load_model_info(embedding_gemma)
    assert [(d.bias, d.activation) for d in info.dense] == [(False, "identity")] * 2
    engine = Engine.load(info)
    arrays, _ = pack(embedding_gemma, TEXTS, max_length=info.max_input_length)
    ours = engine.embed(arrays)
    assert ours.shape == (len(TEXTS), 24)
    model = SentenceTransformer(str(embedding_gemma), device="cpu")
    unnormalized = SentenceTransformer(modules=list(model)[:-1], device="cpu")
    ref = unnormalized.encode(TEXTS, convert_to_numpy=True, batch_size=64)
    cosine = cosine_rows(ours, ref)
    print(f"min cosine {cosine.min():.7f}, max abs diff {np.abs(ours - ref).max():.2e}")
    assert cosine.min() >= 0.9999
    assert np.abs(ours - ref).max() <= 1e-4


def test_batch_invariance(embedding_gemma: Path) -> None:
    engine = Engine.load(load_model_info(embedding_gemma))
    assert_batch_invariant(engine, embedding_gemma, TEXTS)


def test_packed_path_and_graphs_equal_the_padded_path(embedding_gemma: Path) -> None:
    """The CUDA path's logic on the CPU (see tests/fixtures/varlen.py): the bidirectional
    local window and the query_pre_attn_scalar scale convert to the varlen kernel's terms."""
    assert_packed_equals_padded(embedding_gemma, TEXTS, (1, 2, len(TEXTS)))


REFUSALS = [
    ("softcapping", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
    ("is-causal-false", {"is_causal": False}, "is_causal=False"),
    ("is-causal-contradiction", {"is_causal": True}, "is_causal=True"),
    ("rope-not-per-layer-type", {"rope_parameters": {"rope_type": "default",
                                                     "rope_theta": 1e4}},
     "must give sliding_attention and full_attention"),
    ("rope-yarn", {"rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        "full_attention": {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0}}},
     r"rope \(full_attention\): rope type 'yarn'"),
    ("partial-rotary", {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ("layer-types", {"layer_types": ["full_attention", "chunked_attention", "full_attention"]},
     "layer_types"),
]


@pytest.mark.parametrize(("case", "changes", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refused_configs(tmp_path: Path, case: str, changes: dict, message: str) -> None:
    root = make(tmp_path / case, EMBEDDING_GEMMA)
    set_config(root, **changes)
    with pytest.raises(ConfigError, match=message):
        Engine.load(load_model_info(root, pooling_override="mean"))


def test_final_logit_softcapping_is_irrelevant(tmp_path: Path) -> None:
    """It caps LM-head logits, which an embedder never computes: accepted, output unchanged."""
    root = make(tmp_path / "m", EMBEDDING_GEMMA)
    before, _ = engine_hidden(root)
    set_config(root, final_logit_softcapping=30.0)
    after, _ = engine_hidden(root)
    assert (before - after).abs().max().item() == 0.0


def test_embedding_scale_is_rounded_to_the_model_dtype(tmp_path: Path) -> None:
    """transformers multiplies the bfloat16 embeddings by sqrt(hidden) cast to bfloat16
    (5.65625 for hidden 32, not 5.65685): the scaled embeddings are bit for bit the same."""
    from transformers import AutoModel

    root = make(tmp_path / "m", EMBEDDING_GEMMA)
    engine = Engine.load(load_model_info(root, pooling_override="mean"), dtype=torch.bfloat16)
    hf = AutoModel.from_pretrained(str(root), dtype=torch.bfloat16).eval()
    ids = torch.arange(40)
    scale = engine.model._embed_scale(torch.bfloat16)
    assert scale == 5.65625
    with torch.no_grad():
        assert torch.equal(engine.model.embed(ids) * scale, hf.embed_tokens(ids[None])[0])


def test_hidden_act_does_not_choose_the_activation(tmp_path: Path) -> None:
    """Gemma3TextConfig knows only hidden_activation (default gelu_pytorch_tanh): a hidden_act
    in config.json is an attribute its MLP never reads, so it must not pick ours either."""
    root = make(tmp_path / "m", EMBEDDING_GEMMA)
    set_config(root, hidden_activation=None, hidden_act="gelu")
    assert hidden_diff(root, POOLING) <= HIDDEN_TOL


def test_config_defaults_of_kv_heads_and_window(tmp_path: Path) -> None:
    """Omitted num_key_value_heads is Gemma3TextConfig's 4 (not the head count), an omitted
    window its 4096; a null window, which transformers' forward fails on, is refused."""
    from transformers import Gemma3TextConfig

    from backend_worker.attention import PaddedSDPA
    from backend_worker.models.gemma3 import Gemma3TextModel

    given = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 8, "head_dim": 8,
             "layer_types": ["sliding_attention", "full_attention"]}
    ref = Gemma3TextConfig(**given)
    with torch.device("meta"):
        model = Gemma3TextModel.from_config({"model_type": "gemma3_text", **given}, PaddedSDPA())
    local = model.layers[0].attention
    assert local.kv_heads == ref.num_key_value_heads == 4
    assert local.mask.window == ref.sliding_window - 1
    assert_null_window_refused(make(tmp_path / "m", EMBEDDING_GEMMA), POOLING)
