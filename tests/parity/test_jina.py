"""JinaBERT v2 parity: our Engine against an independent float64 reference of jina's math
(tests/fixtures/jina.py), on tiny random checkpoints with the hub's key names.

transformers does not implement JinaBERT and jina's remote code cannot be loaded offline, so
neither transformers nor sentence-transformers can be the oracle here: pooled vectors are
compared to the reference's hidden states, mean-pooled (jina's encode()) and normalised.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from backend_worker.attention import alibi_slopes
from backend_worker.engine import Engine
from backend_worker.loading import IGNORED
from backend_worker.models import model_class
from backend_worker.models.bert import BertModel
from backend_worker.models.jina import (
    CODE_WEIGHT_MAP,
    WEIGHT_MAP,
    JinaBertModel,
    JinaCodeBertModel,
)
from shared.errors import ConfigError
from shared.modelinfo import load_model_info
from tests.fixtures.checks import assert_batch_invariant
from tests.fixtures.jina import (
    auto_map,
    jina_config,
    load_state,
    make_tiny_jina,
    reference_embeddings,
    reference_hidden,
    reference_slopes,
)
from tests.fixtures.oracles import cosine_rows, sequence_token_types
from tests.fixtures.tiny import MIXED_TEXTS, pack

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Marker names this module proves against the reference (tests/parity/test_zoo_coverage.py).
COVERS = frozenset({"jina-bert-v2", "jina-bert-v2-code"})

# Ragged, with pairs (token type 1) and one input long enough (~190 tokens) that ALiBi's
# distance penalty reaches every head: the smallest slope is 2^-8.
LONG = ("ALiBi penalises attention by distance, so a long input is where a missing or "
        "mirrored bias shows: " + "the quick brown fox jumps over the lazy dog; " * 3)
TEXTS = [*MIXED_TEXTS, LONG]
HIDDEN_TOL = 1e-4

CASES = [
    # (id, variant, make_tiny_jina kwargs)
    ("base", "base", {}),
    ("base-6-heads", "base", {"hidden": 48, "heads": 6}),
    ("base-reglu-bert-prefix", "base", {"feed_forward_type": "reglu", "prefix": "bert."}),
    ("code", "code", {}),
    ("code-12-heads-bert-prefix", "code", {"hidden": 48, "heads": 12, "prefix": "bert."}),
]


@pytest.mark.parametrize(("case", "variant", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_hidden_states_match_reference(tmp_path: Path, case: str, variant: str,
                                       kwargs: dict) -> None:
    root = make_tiny_jina(tmp_path / case, variant, **kwargs)  # type: ignore[arg-type]
    engine = Engine.load(load_model_info(root))
    arrays, ids = pack(root, TEXTS)
    assert max(map(len, ids)) > 150 and arrays.token_type_ids.max() == 1
    ours = engine.hidden_states(arrays).double()

    config, state = json.loads((root / "config.json").read_text()), load_state(root)
    types = sequence_token_types(arrays)
    ref = torch.cat([reference_hidden(state, config, variant, seq, seq_types)  # type: ignore[arg-type]
                     for seq, seq_types in zip(ids, types, strict=True)])
    diff = (ours - ref).abs().max().item()
    print(f"{case}: max abs diff of last hidden state {diff:.2e}")
    assert diff <= HIDDEN_TOL

    # The inputs depend on the bias: without it the reference is far from ours.
    no_alibi = torch.cat([reference_hidden(state, config, variant, seq, seq_types,  # type: ignore[arg-type]
                                           alibi=False)
                          for seq, seq_types in zip(ids, types, strict=True)])
    assert (ours - no_alibi).abs().max().item() > 0.1


@pytest.fixture(scope="module", params=["base", "code"])
def st_model(request, tmp_path_factory) -> tuple[Path, str]:
    variant = request.param
    root = make_tiny_jina(tmp_path_factory.mktemp("st") / variant, variant, hidden=48, heads=6,
                          seed=3)
    return root, variant


def test_pooled_matches_reference_mean_pooling(st_model: tuple[Path, str]) -> None:
    # sentence-transformers cannot load jina's remote code offline: the oracle is the float64
    # reference, mean-pooled as modules.json's 1_Pooling says (and jina's encode() does).
    root, variant = st_model
    texts = [t for t in TEXTS if isinstance(t, str)]
    info = load_model_info(root)
    assert info.pooling == "mean" and info.has_normalize
    engine = Engine.load(info)
    arrays, ids = pack(root, texts, max_length=info.max_input_length)
    ours = engine.embed(arrays)
    assert ours.dtype == np.float32 and ours.shape == (len(texts), 48)
    ref = reference_embeddings(root, ids, sequence_token_types(arrays), variant).numpy()  # type: ignore[arg-type]
    assert cosine_rows(ours, ref).min() >= 0.9999
    assert np.abs(ours - ref).max() <= 1e-4


def test_batch_invariance(st_model: tuple[Path, str]) -> None:
    root, _ = st_model
    engine = Engine.load(load_model_info(root))
    assert_batch_invariant(engine, root, TEXTS)


def test_max_length_comes_from_config(tmp_path: Path) -> None:
    root = make_tiny_jina(tmp_path / "m", st_files=False)
    info = load_model_info(root)
    assert info.max_input_length == 8192
    assert Engine.load(info).max_positions == 8192
    shorter = make_tiny_jina(tmp_path / "short", max_position_embeddings=1024, st_files=False)
    info = load_model_info(shorter)
    assert info.max_input_length == 1024
    assert Engine.load(info).max_positions == 1024


def test_emb_pooler_gives_mean_without_sentence_transformers_files(tmp_path: Path) -> None:
    root = make_tiny_jina(tmp_path / "m", st_files=False)
    info = load_model_info(root)
    assert info.pooling == "mean"
    arrays, ids = pack(root, ["hello world", LONG])
    ours = Engine.load(info).embed(arrays)
    ref = reference_embeddings(root, ids, sequence_token_types(arrays), "base").numpy()
    assert np.abs(ours - ref).max() <= 1e-4


def test_emb_pooler_we_do_not_know_is_refused(tmp_path: Path) -> None:
    root = make_tiny_jina(tmp_path / "m", st_files=False, emb_pooler="attention")
    with pytest.raises(ConfigError, match="emb_pooler 'attention'"):
        load_model_info(root)


def test_alibi_slopes() -> None:
    expected_12 = [2.0**-k for k in range(1, 9)] + [2.0**-e for e in (0.5, 1.5, 2.5, 3.5)]
    assert alibi_slopes(12) == pytest.approx(expected_12, rel=1e-12)
    assert alibi_slopes(8) == pytest.approx(expected_12[:8], rel=1e-12)
    assert alibi_slopes(6) == pytest.approx([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1,
                                             2.0**-3], rel=1e-12)
    for heads in (1, 2, 3, 4, 5, 7, 12, 16, 20, 24):
        assert alibi_slopes(heads) == pytest.approx(reference_slopes(heads).tolist(), rel=1e-12)


# One layer of each hub checkpoint, as jina's JinaBertModel state dicts name them.
HUB_KEYS = {
    "base": [
        "embeddings.word_embeddings.weight", "embeddings.token_type_embeddings.weight",
        "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias",
        "encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.query.bias",
        "encoder.layer.0.attention.self.key.weight", "encoder.layer.0.attention.self.key.bias",
        "encoder.layer.0.attention.self.value.weight", "encoder.layer.0.attention.self.value.bias",
        "encoder.layer.0.attention.output.dense.weight",
        "encoder.layer.0.attention.output.dense.bias",
        "encoder.layer.0.attention.output.LayerNorm.weight",
        "encoder.layer.0.attention.output.LayerNorm.bias",
        "encoder.layer.0.mlp.gated_layers.weight",
        "encoder.layer.0.mlp.wo.weight", "encoder.layer.0.mlp.wo.bias",
        "encoder.layer.0.mlp.layernorm.weight", "encoder.layer.0.mlp.layernorm.bias",
        "pooler.dense.weight", "pooler.dense.bias",
    ],
    "code": [
        "embeddings.word_embeddings.weight", "embeddings.token_type_embeddings.weight",
        "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias",
        "encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.query.bias",
        "encoder.layer.0.attention.self.key.weight", "encoder.layer.0.attention.self.key.bias",
        "encoder.layer.0.attention.self.value.weight", "encoder.layer.0.attention.self.value.bias",
        "encoder.layer.0.attention.self.layer_norm_q.weight",
        "encoder.layer.0.attention.self.layer_norm_q.bias",
        "encoder.layer.0.attention.self.layer_norm_k.weight",
        "encoder.layer.0.attention.self.layer_norm_k.bias",
        "encoder.layer.0.attention.output.dense.weight",
        "encoder.layer.0.attention.output.dense.bias",
        "encoder.layer.0.attention.output.LayerNorm.weight",
        "encoder.layer.0.attention.output.LayerNorm.bias",
        "encoder.layer.0.layer_norm_1.weight", "encoder.layer.0.layer_norm_1.bias",
        "encoder.layer.0.mlp.up_gated_layer.weight",
        "encoder.layer.0.mlp.down_layer.weight", "encoder.layer.0.mlp.down_layer.bias",
        "encoder.layer.0.layer_norm_2.weight", "encoder.layer.0.layer_norm_2.bias",
        "pooler.dense.weight", "pooler.dense.bias",
    ],
}
MAPS = {"base": (WEIGHT_MAP, JinaBertModel), "code": (CODE_WEIGHT_MAP, JinaCodeBertModel)}


@pytest.mark.parametrize("variant", ["base", "code"])
def test_hub_key_names_fill_every_parameter(variant: str) -> None:
    weight_map, cls = MAPS[variant]
    with torch.device("meta"):
        model = cls.from_config(jina_config(variant, layers=1), attention=None)  # type: ignore[arg-type]
    params = set(model.state_dict())
    filled: dict[str, set[str | None]] = {}
    for prefix in ("", "bert."):  # JinaBertModel, and JinaBertForMaskedLM's encoder
        for key in HUB_KEYS[variant]:
            resolved = weight_map.resolve(prefix + key)
            assert resolved is not None, f"hub key {prefix + key} is unknown"
            if key.startswith("pooler."):
                assert resolved is IGNORED
                continue
            assert resolved.target in params, (key, resolved.target)
            filled.setdefault(resolved.target, set()).add(resolved.part)
    assert set(filled) == params
    assert filled["layers.0.attention.qkv.weight"] == {"query", "key", "value"}
    # The other variant's MLP and norms are unknown here: a checkpoint of the wrong variant
    # fails strict loading instead of half-loading.
    other = HUB_KEYS["code" if variant == "base" else "base"]
    assert [k for k in other if weight_map.resolve(k) is None]


def test_markers_pick_the_variant_and_never_plain_bert() -> None:
    for variant, cls in (("base", JinaBertModel), ("code", JinaCodeBertModel)):
        for architectures in (["JinaBertForMaskedLM"], ["BertModel"], []):
            config = {"model_type": "bert", "architectures": architectures,
                      "auto_map": auto_map(variant)}  # type: ignore[arg-type]
            assert model_class(config) is cls
            assert model_class(config) is not BertModel
    assert model_class({"model_type": "bert", "architectures": ["BertModel"]}) is BertModel


def test_other_jina_code_is_refused() -> None:
    # Saved locally, auto_map loses the repository: we cannot tell which implementation it is.
    config = {"model_type": "bert", "architectures": ["JinaBertForMaskedLM"],
              "auto_map": {"AutoModel": "modeling_bert.JinaBertModel"}}
    with pytest.raises(ConfigError, match="JinaBert auto_map of an implementation"):
        model_class(config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"position_embedding_type": "absolute"}, "position_embedding_type 'absolute'"),
        ({"feed_forward_type": "original"}, "feed_forward_type 'original'"),
        ({"feed_forward_type": None}, "feed_forward_type None"),
        ({"is_decoder": True}, "is_decoder=True"),
        ({"hidden_size": 30}, "not divisible by num_attention_heads 4"),
    ],
)
def test_refused_configs(tmp_path: Path, overrides: dict, message: str) -> None:
    root = make_tiny_jina(tmp_path / "m", st_files=False)
    config = json.loads((root / "config.json").read_text()) | overrides
    (root / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        Engine.load(load_model_info(root))


def test_wrong_variant_checkpoint_names_the_keys(tmp_path: Path) -> None:
    root = make_tiny_jina(tmp_path / "m", "code", st_files=False)
    config = json.loads((root / "config.json").read_text())
    config["auto_map"] = auto_map("base")
    (root / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="layer_norm_q"):
        Engine.load(load_model_info(root))

