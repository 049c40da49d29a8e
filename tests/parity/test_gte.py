"""GTE parity, fp32 on CPU, tiny random checkpoints built offline.

model_type "gte" is transformers' native port: it is the oracle for hidden states, classifier
logits and the MLM (SPLADE) head, and SentenceTransformer for pooled vectors. model_type "new"
(Alibaba's own code, what the Hub's gte-*-v1.5 / mGTE repos say) is not in transformers: it is
checked against an independent float64 reference written here from that code, and, through a
key-mapping test, against transformers' native model loading the same tensors (with its rotary
settings translated, NTK scaling included).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from backend_worker.attention import select_attention
from backend_worker.engine import Engine
from backend_worker.head_modules import ClassifierHead, SpladeHead
from backend_worker.heads import build_head, run_head
from backend_worker.models import model_class
from backend_worker.models.gte import WEIGHT_MAP
from shared.errors import ConfigError
from shared.modelinfo import load_model_info
from tests.fixtures.checks import assert_batch_invariant, assert_dropped, assert_maps
from tests.fixtures.oracles import cosine_rows, hf_hidden, padded_inputs, splade_max
from tests.fixtures.rotary import (
    ACT,
    TINY,
    add_sentence_transformers,
    gte_new_config,
    layer_norm,
    reprefix,
    rotate,
    save_model,
    self_attention,
    sequences,
    tiny_model,
    write_checkpoint,
)
from tests.fixtures.tiny import MIXED_TEXTS, pack, tiny_vocab

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COVERS = frozenset({"new", "gte"})

TEXTS = MIXED_TEXTS
HIDDEN_TOL = 1e-4
VOCAB = len(tiny_vocab())
HEAD_DIM = TINY["hidden_size"] // TINY["num_attention_heads"]


def check_hidden(root: Path, expected_of, engine_root: Path | None = None) -> float:
    """Max abs diff between our engine on `engine_root` (default `root`) and `expected_of`
    (a function of the packed batch) on the ragged mixed inputs."""
    engine = Engine.load(load_model_info(engine_root or root, pooling_override="cls"))
    arrays, ids = pack(root, TEXTS)
    assert len(set(map(len, ids))) == len(ids), "inputs must differ in length"
    return float((engine.hidden_states(arrays) - expected_of(arrays)).abs().max())


@pytest.mark.parametrize(
    ("case", "overrides"),
    [("base", {"type_vocab_size": 2}), ("no-token-types", {"type_vocab_size": 0}),
     ("silu", {"hidden_act": "silu", "type_vocab_size": 2}),
     ("rope-theta", {"rope_theta": 500_000.0, "type_vocab_size": 2})],
)
def test_native_hidden_states_match_transformers(tmp_path: Path, case: str, overrides: dict
                                                 ) -> None:
    model = tiny_model("GteModel", **overrides)
    root = save_model(model, tmp_path / case)
    diff = check_hidden(root, lambda arrays: hf_hidden(model, arrays))
    print(f"{case}: max abs diff {diff:.2e}")
    assert diff <= HIDDEN_TOL


def test_in_memory_names_load_too(tmp_path: Path) -> None:
    model = tiny_model("GteModel", seed=1, type_vocab_size=2)
    root = save_model(model, tmp_path / "in-memory", in_memory_names=True)
    assert "layers.0.mlp.gate_proj.weight" in load_file(str(root / "model.safetensors"))
    assert check_hidden(root, lambda arrays: hf_hidden(model, arrays)) <= HIDDEN_TOL


# --- Alibaba's model_type "new" ---------------------------------------------------------------

def native_twin(config: dict[str, Any], seed: int, architecture: str = "GteModel",
                **extra: Any) -> Any:
    """transformers' GteModel computing what a "new" config describes. Alibaba's fixed NTK
    (base * f, every frequency / f^(2/d)) is transformers' "linear" rope type over base * f."""
    theta, scaling = config["rope_theta"], config["rope_scaling"]
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if scaling is not None and scaling["factor"] > 1:
        factor = scaling["factor"]
        rope = {"rope_type": "linear", "factor": factor ** (2 / HEAD_DIM),
                "rope_theta": theta * factor}
    return tiny_model(architecture, seed, hidden_act=config["hidden_act"],
                      type_vocab_size=config["type_vocab_size"],
                      layer_norm_eps=config["layer_norm_eps"], rope_parameters=rope, **extra)


def new_checkpoint(root: Path, config: dict[str, Any], seed: int, **extra: Any) -> Any:
    """A "new" directory (Alibaba's names, as transformers writes them) and its native twin."""
    model = native_twin(config, seed, **extra)
    twin = save_model(model, root.with_name(root.name + "-native"))
    write_checkpoint(root, config, load_file(str(twin / "model.safetensors")))
    return model


def reference(root: Path, ids: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
    """Alibaba's NewModel (Alibaba-NLP/new-impl modeling.py) in float64, one sequence."""
    cfg = json.loads((root / "config.json").read_text())
    t = {k.removeprefix("new."): v.double()
         for k, v in load_file(str(root / "model.safetensors")).items()}

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        out = x @ t[f"{name}.weight"].T
        return out + t[f"{name}.bias"] if f"{name}.bias" in t else out

    heads, eps, inner = cfg["num_attention_heads"], cfg["layer_norm_eps"], cfg["intermediate_size"]
    head_dim = cfg["hidden_size"] // heads
    base, scaling = cfg["rope_theta"], cfg["rope_scaling"]
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    if scaling is None or scaling["factor"] <= 1:
        inv_freq = 1.0 / base**exponents
    else:  # NTKScalingRotaryEmbedding, mixed_b unset
        factor = scaling["factor"]
        inv_freq = 1.0 / (base * factor) ** exponents / factor ** (2 / head_dim)
    act = ACT[cfg["hidden_act"]]
    x = t["embeddings.word_embeddings.weight"][ids]
    if cfg["type_vocab_size"]:
        x = x + t["embeddings.token_type_embeddings.weight"][types]
    x = layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        if cfg["pack_qkv"]:
            q, k, v = linear(x, p + "attention.qkv_proj").split(cfg["hidden_size"], dim=-1)
        else:
            q, k, v = (linear(x, p + f"attention.{n}_proj") for n in "qkv")
        q, k, v = (y.view(len(ids), heads, head_dim) for y in (q, k, v))
        attended = self_attention(rotate(q, inv_freq), rotate(k, inv_freq), v)
        x = layer_norm(x + linear(attended, p + "attention.o_proj"),
                       t[p + "attn_ln.weight"], t[p + "attn_ln.bias"], eps)
        up, gate = linear(x, p + "mlp.up_gate_proj").split(inner, dim=-1)
        x = layer_norm(x + linear(act(gate) * up, p + "mlp.down_proj"),
                       t[p + "mlp_ln.weight"], t[p + "mlp_ln.bias"], eps)
    return x


def reference_hidden(root: Path, arrays) -> torch.Tensor:
    return torch.cat([reference(root, ids, types) for ids, types in sequences(arrays)])


def split_qkv(root: Path) -> None:
    """Rewrite a "new" checkpoint as Alibaba's code saves it with pack_qkv=false."""
    tensors = load_file(str(root / "model.safetensors"))
    for key in [k for k in tensors if ".attention.qkv_proj." in k]:
        for name, part in zip("qkv", tensors.pop(key).chunk(3), strict=True):
            tensors[key.replace("qkv_proj", f"{name}_proj")] = part
    config = json.loads((root / "config.json").read_text())
    write_checkpoint(root, {**config, "pack_qkv": False}, tensors)


NEW_CASES = [
    ("ntk", {}),
    ("no-scaling-no-types", {"rope_scaling": None, "type_vocab_size": 0, "rope_theta": 500_000.0}),
    ("ntk-factor-1-silu", {"rope_scaling": {"type": "ntk", "factor": 1.0}, "hidden_act": "silu"}),
    ("pack-qkv-false", {}),
]


@pytest.mark.parametrize(("case", "overrides"), NEW_CASES, ids=[c[0] for c in NEW_CASES])
def test_new_matches_the_reference_and_transformers(tmp_path: Path, case: str, overrides: dict
                                                    ) -> None:
    """Our engine on the "new" directory == the float64 reference == transformers' GteModel on
    the same tensors (the key mapping: Alibaba's names onto the native layout)."""
    config = gte_new_config(**overrides)
    root = tmp_path / case
    model = new_checkpoint(root, config, seed=2)
    if case == "pack-qkv-false":
        split_qkv(root)
    arrays, _ = pack(root, TEXTS)
    ours = Engine.load(load_model_info(root, pooling_override="cls")).hidden_states(arrays)
    ref = reference_hidden(root, arrays).float()
    native = hf_hidden(model, arrays)
    print(f"{case}: vs reference {(ours - ref).abs().max():.2e}, "
          f"reference vs transformers {(ref - native).abs().max():.2e}")
    assert (ours - ref).abs().max() <= HIDDEN_TOL
    assert (ref - native).abs().max() <= HIDDEN_TOL


def test_ntk_scaling_changes_the_output(tmp_path: Path) -> None:
    """The scaled frequencies matter at these lengths: dropping rope_scaling must show."""
    config = gte_new_config()
    root = tmp_path / "ntk"
    new_checkpoint(root, config, seed=3)
    plain = tmp_path / "plain"
    write_checkpoint(plain, {**config, "rope_scaling": None},
                     load_file(str(root / "model.safetensors")))
    arrays, _ = pack(root, TEXTS)
    scaled = Engine.load(load_model_info(root, pooling_override="cls")).hidden_states(arrays)
    unscaled = Engine.load(load_model_info(plain, pooling_override="cls")).hidden_states(arrays)
    assert (scaled - unscaled).abs().max() > 100 * HIDDEN_TOL


# gte-large-en-v1.5 / NewForSequenceClassification names, and transformers' in-memory names,
# with the parameter (and fused slice) each must fill.
HUB_NAMES = {
    "embeddings.word_embeddings.weight": ("embeddings.word.weight", None),
    "new.embeddings.token_type_embeddings.weight": ("embeddings.token_type.weight", None),
    "embeddings.LayerNorm.bias": ("embeddings.norm.bias", None),
    "encoder.layer.5.attention.qkv_proj.weight": ("layers.5.attention.qkv.weight", None),
    "new.encoder.layer.5.attention.qkv_proj.bias": ("layers.5.attention.qkv.bias", None),
    "encoder.layer.5.attention.k_proj.weight": ("layers.5.attention.qkv.weight", "k_proj"),
    "encoder.layer.5.attention.o_proj.weight": ("layers.5.attention.out.weight", None),
    "encoder.layer.5.mlp.up_gate_proj.weight": ("layers.5.mlp.gate_up.weight", None),
    "encoder.layer.5.mlp.down_proj.bias": ("layers.5.mlp.down.bias", None),
    "encoder.layer.5.attn_ln.weight": ("layers.5.attention_norm.weight", None),
    "gte.encoder.layer.5.mlp_ln.weight": ("layers.5.mlp_norm.weight", None),
}
IN_MEMORY_NAMES = {
    "layers.5.self_attn.q_proj.weight": ("layers.5.attention.qkv.weight", "q_proj"),
    "layers.5.self_attn.v_proj.bias": ("layers.5.attention.qkv.bias", "v_proj"),
    "layers.5.self_attn.o_proj.bias": ("layers.5.attention.out.bias", None),
    "layers.5.mlp.up_proj.weight": ("layers.5.mlp.gate_up.weight", "up_proj"),
    "layers.5.mlp.gate_proj.weight": ("layers.5.mlp.gate_up.weight", "gate_proj"),
    "layers.5.mlp.down_proj.weight": ("layers.5.mlp.down.weight", None),
    "layers.5.post_attention_layernorm.weight": ("layers.5.attention_norm.weight", None),
    "gte.layers.5.post_mlp_layernorm.bias": ("layers.5.mlp_norm.bias", None),
}


@pytest.mark.parametrize("names", [HUB_NAMES, IN_MEMORY_NAMES], ids=["hub", "in-memory"])
def test_key_mapping(names: dict[str, tuple[str, str | None]]) -> None:
    assert_maps(WEIGHT_MAP, names)
    # up_gate_proj stores the value half first; separate halves are fused in that order.
    assert WEIGHT_MAP.resolve("layers.0.mlp.up_proj.weight").fuse == ("up_proj", "gate_proj")
    assert_dropped(WEIGHT_MAP, ("new.pooler.dense.weight", "classifier.weight",
                                "lm_head.decoder.bias"))


def test_transformers_reads_alibabas_prefix_as_we_do(tmp_path: Path) -> None:
    """The "new." prefix of NewFor* checkpoints: transformers' GteModel loads it (its
    conversion mapping strips it) and agrees with our engine on the same file."""
    from transformers import AutoModel

    model = tiny_model("GteModel", seed=4, type_vocab_size=2)
    root = save_model(model, tmp_path / "prefixed")
    reprefix(root, "new.")
    assert all(k.startswith("new.") for k in load_file(str(root / "model.safetensors")))
    loaded = AutoModel.from_pretrained(str(root)).eval()
    assert check_hidden(root, lambda arrays: hf_hidden(loaded, arrays)) <= HIDDEN_TOL
    assert check_hidden(root, lambda arrays: hf_hidden(model, arrays)) <= HIDDEN_TOL


def test_pooled_matches_sentence_transformers(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    model = tiny_model("GteModel", seed=5, type_vocab_size=2)
    root = add_sentence_transformers(save_model(model, tmp_path / "st"), "cls")
    texts = [t for t in TEXTS if isinstance(t, str)]
    ours = Engine.load(load_model_info(root)).embed(pack(root, texts)[0])
    st = SentenceTransformer(str(root), device="cpu")
    theirs = SentenceTransformer(modules=list(st)[:-1], device="cpu").encode(texts)
    cosine = cosine_rows(ours, theirs)
    assert cosine.min() >= 0.9999
    assert np.abs(ours - theirs).max() <= 1e-5


LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def classifier_logits(root: Path, arrays) -> np.ndarray:
    info = load_model_info(root)
    engine = Engine.load(info)
    head = build_head(info, engine.device)
    assert isinstance(head, ClassifierHead)
    rows, dim, logits = run_head(engine, head)(arrays)
    assert (rows, dim) == (arrays.cu_seqlens.shape[0] - 1, len(LABELS))
    return logits


def test_classifier_logits_match_transformers(tmp_path: Path) -> None:
    """GteForSequenceClassification: BERT's head (pooler + tanh + classifier) on CLS."""
    model = tiny_model("GteForSequenceClassification", seed=6, type_vocab_size=2,
                       id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    root = save_model(model, tmp_path / "gte-classifier")
    arrays, _ = pack(root, TEXTS)
    with torch.no_grad():
        expected = model(**padded_inputs(arrays)).logits.numpy()
    assert np.abs(classifier_logits(root, arrays) - expected).max() <= 1e-4


def test_new_reranker_matches_transformers(tmp_path: Path) -> None:
    """gte-multilingual-reranker-base's shape: NewForSequenceClassification ("new." prefix,
    pooler + classifier), one label, NTK rotary; transformers' native twin is the oracle."""
    config = gte_new_config(architectures=["NewForSequenceClassification"], id2label={0: "LABEL_0"},
                        label2id={"LABEL_0": 0})
    root = tmp_path / "reranker"
    model = new_checkpoint(root, config, seed=7, architecture="GteForSequenceClassification",
                           num_labels=1)
    reprefix(root, "new.")
    assert "new.pooler.dense.weight" in load_file(str(root / "model.safetensors"))
    info = load_model_info(root)
    assert info.kind == "reranker"
    arrays, _ = pack(root, TEXTS)
    engine = Engine.load(info)
    rows, dim, logits = run_head(engine, build_head(info, engine.device))(arrays)
    with torch.no_grad():
        expected = model(**padded_inputs(arrays)).logits.numpy()
    assert (rows, dim) == (len(TEXTS), 1)
    assert np.abs(logits - expected).max() <= 1e-4


def test_splade_matches_the_masked_lm(tmp_path: Path) -> None:
    """GteForMaskedLM (tied decoder): relu -> log1p -> max over tokens of transformers' logits."""
    model = tiny_model("GteForMaskedLM", seed=8, type_vocab_size=2)
    root = save_model(model, tmp_path / "mlm")
    assert "lm_head.decoder.weight" not in load_file(str(root / "model.safetensors"))
    info = load_model_info(root, pooling_override="splade")
    engine = Engine.load(info)
    head = build_head(info, engine.device)
    assert isinstance(head, SpladeHead)
    arrays, _ = pack(root, TEXTS)
    with torch.inference_mode():
        dense = head(engine.hidden_states(arrays),
                     torch.from_numpy(arrays.cu_seqlens.astype(np.int64)))
    expected = splade_max(model, padded_inputs(arrays))
    assert (dense - expected).abs().max() <= 1e-4


def test_batch_invariance(tmp_path: Path) -> None:
    root = tmp_path / "new"
    new_checkpoint(root, gte_new_config(), seed=9)
    engine = Engine.load(load_model_info(root, pooling_override="cls"))
    assert_batch_invariant(engine, root, TEXTS)


REFUSED = [
    (gte_new_config(position_embedding_type="absolute"), "position_embedding_type='absolute'"),
    (gte_new_config(layer_norm_type="rms_norm"), "layer_norm_type='rms_norm'"),
    (gte_new_config(logn_attention_scale=True), "logn_attention_scale=True"),
    (gte_new_config(rope_scaling={"type": "dynamic", "factor": 2.0}),
     "rope_scaling type 'dynamic'"),
    (gte_new_config(rope_scaling={"type": "ntk", "factor": 2.0, "mixed_b": 0.5}), "mixed_b"),
    (gte_new_config(hidden_act="gelu_fast"), "hidden_act 'gelu_fast'"),
    ({"model_type": "gte", **TINY, "intermediate_size": 64, "vocab_size": VOCAB,
      "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "rope_type 'linear'"),
    # transformers reads a legacy "type" as rope_type.
    ({"model_type": "gte", **TINY, "intermediate_size": 64, "vocab_size": VOCAB,
      "rope_parameters": {"type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "rope_type 'dynamic'"),
    ({"model_type": "new", "hidden_size": 32, "vocab_size": VOCAB},
     "lacks 'num_attention_heads'"),
]


@pytest.mark.parametrize(("config", "message"), REFUSED, ids=[r[1] for r in REFUSED])
def test_unsupported_configs_are_refused(config: dict, message: str) -> None:
    with torch.device("meta"), pytest.raises(ConfigError, match=message):
        model_class(config).from_config(config, select_attention("cpu"))


@pytest.mark.parametrize(("model_type", "positions"), [("new", 2048), ("gte", 8192)])
def test_left_out_sizes_are_the_config_classes_defaults(model_type: str, positions: int) -> None:
    # Alibaba's NewConfig (the remote code sentence-transformers runs) defaults to 2048
    # positions and one token type, GteConfig to 8192 and one: a config.json without the
    # keys is read as they read it.
    config = {k: v for k, v in gte_new_config(model_type=model_type, rope_scaling=None).items()
              if k not in ("max_position_embeddings", "type_vocab_size")}
    with torch.device("meta"):
        model = model_class(config).from_config(config, select_attention("cpu"))
    assert model.max_positions == positions
    assert model.embeddings.token_type.weight.shape[0] == 1
