"""Gemma 2 parity (bge-multilingual-gemma2's architecture): our Engine against transformers'
Gemma2Model (hidden states, its eager attention with the score cap) and sentence-transformers
(last-token pooling), on tiny random checkpoints built offline, fp32 on CPU; and the values we
refuse."""

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
from tests.fixtures.decoders import (
    GEMMA_STYLE,
    TINY_GEMMA2,
    make_decoder_dir,
    make_st_decoder,
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
COVERS = frozenset({"gemma2"})

POOLING = "last-token"
GEMMA2 = TINY_GEMMA2

HIDDEN_CASES = [
    ("capped", GEMMA2, None),
    ("default-cap", {**GEMMA2, "attn_logit_softcapping": 50.0}, None),
    ("uncapped", {**GEMMA2, "attn_logit_softcapping": None}, None),
    ("causal-lm", GEMMA2, "Gemma2ForCausalLM"),
    ("global-first", {**GEMMA2, "layer_types": ["full_attention", "sliding_attention",
                                                "full_attention"]}, None),
]


def make(root: Path, overrides: dict, architecture: str | None = None) -> Path:
    return make_decoder_dir(root, "gemma2", style=GEMMA_STYLE, overrides=overrides,
                            architecture=architecture)


def engine_hidden(model_dir: Path) -> tuple[torch.Tensor, list[list[int]]]:
    return gemma.engine_hidden(model_dir, POOLING)


@pytest.mark.parametrize(("case", "overrides", "architecture"), HIDDEN_CASES,
                         ids=[c[0] for c in HIDDEN_CASES])
def test_hidden_states_match_transformers(tmp_path: Path, case: str, overrides: dict,
                                          architecture: str | None) -> None:
    root = make(tmp_path / case, overrides, architecture)
    assert_hidden_matches(root, POOLING, overrides["sliding_window"], case)


@pytest.mark.parametrize("change", [
    {"attn_logit_softcapping": None},
    {"attn_logit_softcapping": 3.0},
    {"sliding_window": 64},
    {"query_pre_attn_scalar": 16},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}},
])
def test_the_setting_under_test_changes_the_output(tmp_path: Path, change: dict) -> None:
    """What the cases above exercise shows in the output: the cap and its size, the local
    window, the score scale, the rotary base."""
    root = make(tmp_path / "m", GEMMA2)
    with_setting, _ = engine_hidden(root)
    set_config(root, **change)
    without, _ = engine_hidden(root)
    assert (with_setting - without).abs().max().item() > 1e-2


def test_older_config_format(tmp_path: Path) -> None:
    """Hub configs written before transformers 5 (bge-multilingual-gemma2's): no layer_types
    (local and global layers alternate, the first local), rope_theta at the top level."""
    root = make(tmp_path / "m", {**GEMMA2, "num_hidden_layers": 4})
    set_config(root, layer_types=None, rope_parameters=None, rope_theta=500.0)
    assert hidden_diff(root, POOLING) <= HIDDEN_TOL


def test_rotary_base_defaults_to_ten_thousand(tmp_path: Path) -> None:
    """A config with neither rope_parameters nor rope_theta: transformers' default base,
    10,000 (Gemma 3's global layers default to 1,000,000; Gemma 2 has no such split). The
    fixtures always write a base, so a wrong default passed every other case."""
    root = make(tmp_path / "m", GEMMA2)
    set_config(root, rope_parameters=None, rope_theta=None)
    assert hidden_diff(root, POOLING) <= HIDDEN_TOL


def test_defaults_of_omitted_keys_are_gemma2_configs(tmp_path: Path) -> None:
    """A config.json that leaves keys out gets Gemma2Config's defaults. save_pretrained writes
    every key, so the parity cases never reach ours: a 1e-5 norm epsilon or a score scalar of
    128 passed them, and a kv-head default of num_attention_heads (Gemma2Config's is 4) would
    refuse a valid checkpoint at weight loading."""
    from transformers import Gemma2Config

    from backend_worker.attention import PaddedSDPA
    from backend_worker.models.gemma2 import Gemma2Model

    given = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 8}
    ref = Gemma2Config(**given)
    with torch.device("meta"):
        model = Gemma2Model.from_config({"model_type": "gemma2", **given}, PaddedSDPA())
    local, full = (layer.attention for layer in model.layers)
    assert model.layer_types == ref.layer_types
    assert (local.kv_heads, local.head_dim) == (ref.num_key_value_heads, ref.head_dim)
    assert local.mask.scale == full.mask.scale == ref.query_pre_attn_scalar**-0.5
    assert local.mask.softcap == full.mask.softcap == ref.attn_logit_softcapping
    assert local.mask.window == ref.sliding_window - 1 and full.mask.window is None
    norms = [m for m in model.modules() if hasattr(m, "eps")]
    assert norms and {m.eps for m in norms} == {ref.rms_norm_eps}
    assert local.qkv.bias is None and ref.attention_bias is False
    theta = ref.rope_parameters["rope_theta"]
    expected = 1.0 / theta ** (torch.arange(0, ref.head_dim, 2).float() / ref.head_dim)
    torch.testing.assert_close(model.rotaries["full_attention"].inv_freq, expected)


def test_hidden_act_does_not_choose_the_activation(tmp_path: Path) -> None:
    """Gemma2Config knows only hidden_activation (default gelu_pytorch_tanh): a hidden_act in
    config.json (Gemma 1's key, "gelu" there) is kept as an attribute that Gemma2MLP never
    reads. Taking it when hidden_activation is absent ran exact GELU, silently off."""
    root = make(tmp_path / "m", GEMMA2)
    set_config(root, hidden_activation=None, hidden_act="gelu")
    assert hidden_diff(root, POOLING) <= HIDDEN_TOL


def test_null_sliding_window_is_refused(tmp_path: Path) -> None:
    """sliding_window: null loads in transformers (Gemma2Config allows None) but its forward
    fails (TypeError); serving it with a 4,096-token window of our own choosing (what `or 4096`
    did) would be a model nobody can check."""
    assert_null_window_refused(make(tmp_path / "m", GEMMA2), POOLING)


@pytest.mark.parametrize(("change", "message"), [
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=true"),
    ({"is_causal": False}, "is_causal=false"),
    ({"attn_logit_softcapping": 0}, "attn_logit_softcapping=0"),
    ({"attn_logit_softcapping": "50"}, "attn_logit_softcapping='50'"),
    ({"attn_logit_softcapping": True}, "attn_logit_softcapping=True"),
    # transformers' window 0 masks every key (`or 4096` took it for absent).
    ({"sliding_window": 0}, "sliding_window 0 must be >= 1"),
])
def test_refused_settings(tmp_path: Path, change: dict, message: str) -> None:
    root = make(tmp_path / "m", GEMMA2)
    set_config(root, **change)
    with pytest.raises(ConfigError, match=message):
        Engine.load(load_model_info(root, pooling_override="last-token"))


def test_pooled_matches_sentence_transformers(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    root = make_st_decoder(tmp_path / "st", "gemma2", style=GEMMA_STYLE, overrides=GEMMA2)
    info = load_model_info(root)
    assert info.pooling == "last-token"
    engine = Engine.load(info)
    arrays, _ = pack(root, TEXTS, max_length=info.max_input_length)
    ours = engine.embed(arrays)
    model = SentenceTransformer(str(root), device="cpu")
    unnormalized = SentenceTransformer(modules=list(model)[:-1], device="cpu")
    ref = unnormalized.encode(TEXTS, convert_to_numpy=True, batch_size=64)
    cosine = cosine_rows(ours, ref)
    print(f"min cosine {cosine.min():.7f}, max abs diff {np.abs(ours - ref).max():.2e}")
    assert np.abs(ours - ref).max() <= 1e-4
