"""NomicBERT parity, fp32 on CPU, tiny random checkpoints built offline.

Oracles: transformers' native NomicBertModel (hidden states, classifier logits) and
SentenceTransformer (pooled vectors) for what transformers implements; for the options of
nomic-ai's own code that transformers lacks (biases, partial rotary, plain or GLU MLPs, no
token types, a padded vocabulary, v2-moe's mixture-of-experts layers), an independent float64
reference written here from that code's description and itself checked against transformers
where the two overlap.
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

from backend_worker.attention import PackedVarlen, select_attention, torch_varlen_kernel
from backend_worker.engine import Engine
from backend_worker.experts import MixtureOfExperts
from backend_worker.head_modules import ClassifierHead
from backend_worker.heads import build_head, run_head
from backend_worker.models import model_class
from backend_worker.models.nomic_bert import WEIGHT_MAP
from shared.errors import ConfigError
from shared.modelinfo import load_model_info
from tests.fixtures.capture import opaque, strict_capture
from tests.fixtures.checks import assert_batch_invariant, assert_dropped, assert_maps
from tests.fixtures.oracles import cosine_rows, hf_hidden, padded_inputs
from tests.fixtures.rotary import (
    ACT,
    NOMIC_MOE,
    TINY,
    add_sentence_transformers,
    hub_tensors,
    layer_norm,
    nomic_hub_config,
    reprefix,
    rotate,
    save_model,
    self_attention,
    sequences,
    tiny_model,
    write_checkpoint,
)
from tests.fixtures.tiny import MIXED_TEXTS, pack, tiny_vocab
from tests.fixtures.varlen import cpu_varlen

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COVERS = frozenset({"nomic_bert"})

TEXTS = MIXED_TEXTS
HIDDEN_TOL = 1e-4
VOCAB = len(tiny_vocab())


def native_model(architecture: str = "NomicBertModel", seed: int = 0, **overrides: Any):
    return tiny_model(architecture, seed, **overrides)


def assert_matches_transformers(root: Path, model: Any) -> None:
    engine = Engine.load(load_model_info(root, pooling_override="mean"))
    arrays, ids = pack(root, TEXTS)
    assert len(set(map(len, ids))) == len(ids), "inputs must differ in length"
    assert arrays.token_type_ids.max() == 1, "pairs must exercise token type 1"
    diff = (engine.hidden_states(arrays) - hf_hidden(model, arrays)).abs().max().item()
    print(f"{root.name}: max abs diff of last hidden state {diff:.2e}")
    assert diff <= HIDDEN_TOL


@pytest.mark.parametrize(
    ("case", "overrides"),
    [("base", {}), ("gelu", {"hidden_act": "gelu"}), ("rope-theta", {"rope_theta": 10_000.0}),
     ("head-dim", {"head_dim": 16}), ("eps", {"layer_norm_eps": 1e-5})],
)
def test_hidden_states_match_transformers(tmp_path: Path, case: str, overrides: dict) -> None:
    model = native_model(**overrides)
    assert_matches_transformers(save_model(model, tmp_path / case), model)


def test_in_memory_names_load_too(tmp_path: Path) -> None:
    """save_pretrained(save_original_format=False) writes transformers' own names."""
    model = native_model(seed=1)
    root = save_model(model, tmp_path / "in-memory", in_memory_names=True)
    assert "layers.0.self_attn.q_proj.weight" in load_file(str(root / "model.safetensors"))
    assert_matches_transformers(root, model)


# One layer of nomic-embed-text-v1.5 (and its embeddings) as the Hub stores it, and transformers'
# in-memory names, with the parameter (and fused slice) each must fill.
HUB_NAMES = {
    "embeddings.word_embeddings.weight": ("embeddings.word.weight", None),
    "embeddings.token_type_embeddings.weight": ("embeddings.token_type.weight", None),
    "emb_ln.weight": ("embeddings.norm.weight", None),
    "emb_ln.bias": ("embeddings.norm.bias", None),
    "encoder.layers.3.attn.Wqkv.weight": ("layers.3.attention.qkv.weight", None),
    "encoder.layers.3.attn.out_proj.weight": ("layers.3.attention.out.weight", None),
    "encoder.layers.3.mlp.fc11.weight": ("layers.3.mlp.gate_up.weight", "fc11"),
    "encoder.layers.3.mlp.fc12.weight": ("layers.3.mlp.gate_up.weight", "fc12"),
    "encoder.layers.3.mlp.fc2.weight": ("layers.3.mlp.down.weight", None),
    "encoder.layers.3.norm1.weight": ("layers.3.attention_norm.weight", None),
    "encoder.layers.3.norm2.bias": ("layers.3.mlp_norm.bias", None),
    "bert.encoder.layers.3.mlp.fc1.bias": ("layers.3.mlp.up.bias", None),
    # nomic-embed-text-v2-moe's expert layers.
    "encoder.layers.1.mlp.router.layer.weight": ("layers.1.mlp.router", None),
    "encoder.layers.1.mlp.experts.mlp.w1": ("layers.1.mlp.w1", None),
    "encoder.layers.1.mlp.experts.mlp.w2": ("layers.1.mlp.w2", None),
    "encoder.layers.1.mlp.experts.bias": ("layers.1.mlp.bias", None),
}
IN_MEMORY_NAMES = {
    "embeddings.LayerNorm.weight": ("embeddings.norm.weight", None),
    "layers.3.self_attn.q_proj.weight": ("layers.3.attention.qkv.weight", "q_proj"),
    "layers.3.self_attn.v_proj.weight": ("layers.3.attention.qkv.weight", "v_proj"),
    "layers.3.self_attn.o_proj.weight": ("layers.3.attention.out.weight", None),
    "layers.3.mlp.gate_proj.weight": ("layers.3.mlp.gate_up.weight", "gate_proj"),
    "layers.3.mlp.up_proj.weight": ("layers.3.mlp.gate_up.weight", "up_proj"),
    "layers.3.mlp.down_proj.weight": ("layers.3.mlp.down.weight", None),
    "layers.3.post_attention_layernorm.bias": ("layers.3.attention_norm.bias", None),
    "nomic_bert.layers.3.post_mlp_layernorm.weight": ("layers.3.mlp_norm.weight", None),
}


@pytest.mark.parametrize("names", [HUB_NAMES, IN_MEMORY_NAMES], ids=["hub", "in-memory"])
def test_key_mapping(names: dict[str, tuple[str, str | None]]) -> None:
    assert_maps(WEIGHT_MAP, names)
    # The activated half goes first in our gate_up, whichever spelling fills it.
    assert WEIGHT_MAP.resolve("encoder.layers.0.mlp.fc12.weight").fuse == ("fc12", "fc11")
    assert WEIGHT_MAP.resolve("layers.0.mlp.up_proj.weight").fuse == ("gate_proj", "up_proj")
    assert_dropped(WEIGHT_MAP, ("cls.predictions.decoder.weight", "bert.pooler.dense.weight",
                                "classifier.bias"))


def test_pretraining_checkpoint_with_bert_prefix(tmp_path: Path) -> None:
    model = native_model(seed=2)
    root = save_model(model, tmp_path / "pretraining")
    reprefix(root, "bert.", {"cls.predictions.decoder.weight": torch.zeros(VOCAB, 32)})
    assert_matches_transformers(root, model)


# --- nomic-ai's config spelling --------------------------------------------------------------

def reference(root: Path, ids: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
    """nomic-ai's NomicBertModel (post-norm, prenorm=false) in float64, one sequence."""
    cfg = json.loads((root / "config.json").read_text())
    t = {k.removeprefix("bert."): v.double()
         for k, v in load_file(str(root / "model.safetensors")).items()}

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        out = x @ t[f"{name}.weight"].T
        return out + t[f"{name}.bias"] if f"{name}.bias" in t else out

    heads, eps = cfg["n_head"], cfg["layer_norm_epsilon"]
    head_dim = cfg["n_embd"] // heads
    rotary_dim = int(head_dim * cfg["rotary_emb_fraction"])
    inv_freq = 1.0 / cfg["rotary_emb_base"] ** (
        torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    act = {"swiglu": ACT["silu"], "geglu": ACT["gelu"], "glu": ACT["sigmoid"],
           "gelu": ACT["gelu"]}[cfg["activation_function"]]
    x = t["embeddings.word_embeddings.weight"][ids]
    if cfg["type_vocab_size"]:
        x = x + t["embeddings.token_type_embeddings.weight"][types]
    x = layer_norm(x, t["emb_ln.weight"], t["emb_ln.bias"], eps)
    for i in range(cfg["n_layer"]):
        p = f"encoder.layers.{i}."
        q, k, v = linear(x, p + "attn.Wqkv").view(len(ids), 3, heads, head_dim).unbind(1)
        attended = self_attention(rotate(q, inv_freq), rotate(k, inv_freq), v)
        x = layer_norm(x + linear(attended, p + "attn.out_proj"),
                       t[p + "norm1.weight"], t[p + "norm1.bias"], eps)
        every = cfg.get("moe_every_n_layers") or 0
        if every and i % every == 1:
            mlp = experts(x, t, p + "mlp.", cfg["num_experts"], cfg["moe_top_k"], act)
        elif cfg["activation_function"] == "gelu":
            mlp = linear(act(linear(x, p + "mlp.fc1")), p + "mlp.fc2")
        else:
            mlp = linear(linear(x, p + "mlp.fc11") * act(linear(x, p + "mlp.fc12")),
                         p + "mlp.fc2")
        x = layer_norm(x + mlp, t[p + "norm2.weight"], t[p + "norm2.bias"], eps)
    return x


def experts(x: torch.Tensor, t: dict[str, torch.Tensor], p: str, count: int, top_k: int,
            act: Any) -> torch.Tensor:
    """v2-moe's layer, token by token: the top_k experts by router softmax, their outputs
    weighted by those probabilities (not renormalised), plus the experts' shared bias."""
    w1 = t[p + "experts.mlp.w1"].view(count, -1, x.shape[1])
    w2 = t[p + "experts.mlp.w2"].view(count, -1, x.shape[1])
    out = torch.zeros_like(x)
    for row, token in enumerate(x):
        probabilities = (t[p + "router.layer.weight"] @ token).softmax(-1)
        for e in probabilities.argsort(descending=True)[:top_k].tolist():
            out[row] += probabilities[e] * (act(w1[e] @ token) @ w2[e])
    return out + t[p + "experts.bias"]


def reference_hidden(root: Path, arrays) -> torch.Tensor:
    return torch.cat([reference(root, ids, types) for ids, types in sequences(arrays)])


def test_hub_config_matches_transformers_and_the_reference(tmp_path: Path) -> None:
    """nomic-embed-text-v1.5's spelling of the model transformers implements: our engine on
    the Hub-style directory, transformers on its own, and the float64 reference all agree."""
    model = native_model(seed=3, intermediate_size=256)
    native = save_model(model, tmp_path / "native")
    hub = tmp_path / "hub"
    write_checkpoint(hub, nomic_hub_config(), load_file(str(native / "model.safetensors")))
    arrays, _ = pack(hub, TEXTS)
    expected = hf_hidden(model, arrays)
    assert (reference_hidden(hub, arrays).float() - expected).abs().max() <= HIDDEN_TOL
    engine = Engine.load(load_model_info(hub, pooling_override="mean"))
    assert (engine.hidden_states(arrays) - expected).abs().max() <= HIDDEN_TOL


HUB_CASES = [
    ("biases-partial-rotary", {"qkv_proj_bias": True, "mlp_fc1_bias": True,
                               "mlp_fc2_bias": True, "rotary_emb_fraction": 0.5}),
    ("gelu-mlp", {"activation_function": "gelu", "n_inner": 64, "mlp_fc1_bias": True}),
    ("glu", {"activation_function": "glu", "rotary_emb_base": 10_000}),
    ("geglu-no-types-padded-vocab", {"activation_function": "geglu", "type_vocab_size": 0,
                                     "pad_vocab_size_multiple": 64, "layer_norm_epsilon": 1e-5}),
    # Dynamic NTK never engages when no input may exceed max_trained_positions.
    ("scaling-factor-inactive", {"rotary_scaling_factor": 2.0, "max_trained_positions": 128}),
    # nomic-embed-text-v2-moe: experts in layers 1 and 3 (routed on the CPU).
    ("moe", NOMIC_MOE),
    ("moe-top-1-every-3", {**NOMIC_MOE, "n_layer": 5, "moe_every_n_layers": 3, "moe_top_k": 1,
                           "qkv_proj_bias": False}),
    ("moe-every-expert", {**NOMIC_MOE, "moe_top_k": 4}),  # top_k == num_experts
    # nomic-ai's config defaults written out: no expert layers, whatever num_experts says.
    ("no-expert-layers", {"moe_every_n_layers": 0, "num_experts": 1, "moe_top_k": 1}),
]


@pytest.mark.parametrize(("case", "overrides"), HUB_CASES, ids=[c[0] for c in HUB_CASES])
def test_hub_options_match_the_reference(tmp_path: Path, case: str, overrides: dict) -> None:
    config = nomic_hub_config(**overrides)
    root = write_checkpoint(tmp_path / case, config, hub_tensors(config, seed=4))
    engine = Engine.load(load_model_info(root, pooling_override="mean"))
    arrays, _ = pack(root, TEXTS)
    diff = (engine.hidden_states(arrays) - reference_hidden(root, arrays).float()).abs().max()
    print(f"{case}: max abs diff vs float64 reference {diff.item():.2e}")
    assert diff <= HIDDEN_TOL


def test_experts_dense_and_routed_agree(tmp_path: Path) -> None:
    """Every expert on every token weighted 0 where unchosen (small batches, and what CUDA
    graphs capture) gives the routed path's numbers, on each layer's own routing."""
    config = nomic_hub_config(**NOMIC_MOE)
    root = write_checkpoint(tmp_path / "m", config, hub_tensors(config, seed=9))
    engine = Engine.load(load_model_info(root, pooling_override="mean"))
    arrays, _ = pack(root, TEXTS)
    routed = engine.hidden_states(arrays)
    moe = [m for m in engine.model.modules() if isinstance(m, MixtureOfExperts)]
    assert len(moe) == 2
    for module in moe:
        module.dense_tokens = 1 << 20
    assert (engine.hidden_states(arrays) - routed).abs().max() <= 1e-5


def test_graph_capture_runs_the_experts_densely(tmp_path: Path) -> None:
    """Under capture's rules (no host reads); a capture that fails leaves them routed."""
    config = nomic_hub_config(**NOMIC_MOE)
    root = write_checkpoint(tmp_path / "m", config, hub_tensors(config, seed=10))
    engine = Engine.load(load_model_info(root, pooling_override="mean"),
                         attention=PackedVarlen(torch_varlen_kernel(opaque(cpu_varlen))))
    assert engine.capture_graphs(256, strict_capture)
    experts = [m for m in engine.model.modules() if isinstance(m, MixtureOfExperts)]
    assert {m.dense_tokens for m in experts} == {256}

    def fails(run):
        raise RuntimeError("operation not permitted when stream is capturing")

    assert not engine.capture_graphs(256, fails)
    assert {m.dense_tokens for m in experts} == {0}


def test_batch_invariance(tmp_path: Path) -> None:
    config = nomic_hub_config(qkv_proj_bias=True, rotary_emb_fraction=0.5)
    root = write_checkpoint(tmp_path / "m", config, hub_tensors(config, seed=5))
    engine = Engine.load(load_model_info(root, pooling_override="mean"))
    assert_batch_invariant(engine, root, TEXTS)


def test_pooled_matches_sentence_transformers(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    root = add_sentence_transformers(save_model(native_model(seed=6), tmp_path / "st"), "mean")
    texts = [t for t in TEXTS if isinstance(t, str)]
    engine = Engine.load(load_model_info(root))
    ours = engine.embed(pack(root, texts)[0])
    st = SentenceTransformer(str(root), device="cpu")
    theirs = SentenceTransformer(modules=list(st)[:-1], device="cpu").encode(texts)
    cosine = cosine_rows(ours, theirs)
    assert cosine.min() >= 0.9999
    assert np.abs(ours - theirs).max() <= 1e-5


@pytest.mark.parametrize("prefix", ["nomic_bert.", "bert."])
def test_classifier_logits_match_transformers(tmp_path: Path, prefix: str) -> None:
    """transformers' NomicBertForSequenceClassification, and the same weights under nomic-ai's
    "bert." prefix: BERT's head on CLS (pooler + tanh + classifier)."""
    labels = {0: "no", 1: "yes", 2: "maybe"}
    model = native_model("NomicBertForSequenceClassification", seed=7, id2label=labels,
                         label2id={v: k for k, v in labels.items()})
    root = save_model(model, tmp_path / "classifier")
    if prefix == "bert.":
        reprefix(root, "bert.")
    info = load_model_info(root)
    engine = Engine.load(info)
    head = build_head(info, engine.device)
    assert isinstance(head, ClassifierHead)
    arrays, _ = pack(root, TEXTS)
    rows, dim, logits = run_head(engine, head)(arrays)
    assert (rows, dim) == (len(TEXTS), 3)
    with torch.no_grad():
        expected = model(**padded_inputs(arrays)).logits.numpy()
    assert np.abs(logits - expected).max() <= 1e-4


REFUSED = [
    (nomic_hub_config(prenorm=True), "prenorm=True"),
    (nomic_hub_config(rotary_emb_interleaved=True), "rotary_emb_interleaved"),
    (nomic_hub_config(rotary_scaling_factor=2.0, n_positions=8192), "rotary_scaling_factor=2.0"),
    (nomic_hub_config(rotary_scaling_factor=None, n_positions=8192, rotary_emb_scale_base=512),
     "xPos"),
    (nomic_hub_config(**{**NOMIC_MOE, "moe_normalize_expert_weights": 1}),
     "moe_normalize_expert_weights=1"),
    (nomic_hub_config(**{**NOMIC_MOE, "activation_function": "swiglu"}), "gated experts"),
    (nomic_hub_config(**{**NOMIC_MOE, "moe_top_k": 5}), "moe_top_k=5 must be between"),
    (nomic_hub_config(**{k: v for k, v in NOMIC_MOE.items() if k != "moe_top_k"}),
     "lacks 'moe_top_k'"),
    (nomic_hub_config(**{**NOMIC_MOE, "num_experts": None}), "must be integers"),
    (nomic_hub_config(activation_function="gelu_new"), "activation_function 'gelu_new'"),
    (nomic_hub_config(rotary_emb_fraction=0.0), "rotary_emb_fraction=0.0"),
    (nomic_hub_config(causal=True), "causal=True"),
    ({"model_type": "nomic_bert", **TINY, "intermediate_size": 64, "vocab_size": VOCAB,
      "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000.0}},
     "rope_type 'dynamic'"),
    # transformers reads a legacy rope_scaling in place of rope_parameters.
    ({"model_type": "nomic_bert", **TINY, "intermediate_size": 64, "vocab_size": VOCAB,
      "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type 'linear'"),
    ({"model_type": "nomic_bert", "vocab_size": VOCAB}, "lacks 'num_attention_heads'"),
]


@pytest.mark.parametrize(("config", "message"), REFUSED, ids=[r[1] for r in REFUSED])
def test_unsupported_configs_are_refused(config: dict, message: str) -> None:
    with torch.device("meta"), pytest.raises(ConfigError, match=message):
        model_class(config).from_config(config, select_attention("cpu"))


def test_a_missing_tensor_is_named(tmp_path: Path) -> None:
    config = nomic_hub_config(qkv_proj_bias=True)
    tensors = hub_tensors(config, seed=8)
    del tensors["encoder.layers.1.attn.out_proj.bias"]
    root = write_checkpoint(tmp_path / "m", config, tensors)
    with pytest.raises(ConfigError, match=r"missing \(.*encoder\.layers\.1\.attn\.out_proj\.bias"):
        Engine.load(load_model_info(root, pooling_override="mean"))
