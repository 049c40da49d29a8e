"""T5 / mT5 encoder parity: T5's buckets, hidden states of every flavour against transformers'
T5EncoderModel / MT5EncoderModel, pooled vectors (with sentence-t5's Dense) against
sentence-transformers, float16's clamp, and what is refused; tiny random checkpoints (fp32, CPU
unless said)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from backend_worker.engine import Engine
from backend_worker.heads import build_head
from backend_worker.models.t5 import RelativePositionBias, clamp_float16, relative_buckets
from shared.errors import ConfigError
from shared.modelinfo import load_model_info
from tests.fixtures.oracles import hf_hidden
from tests.fixtures.t5 import MAX_TOKENS, make_tiny_t5
from tests.fixtures.tiny import MIXED_TEXTS, pack

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COVERS = frozenset({"t5", "mt5"})

# Lengths from 3 to 117 tokens: past the 8 buckets' exact range and distance 20.
TEXTS = [*MIXED_TEXTS, "the cat sat on the mat, and then it sat on the hat"]
HIDDEN_TOL = 1e-4


def serve(model_dir: Path, pooling: str | None = None, dtype: torch.dtype = torch.float32):
    info = load_model_info(model_dir, pooling_override=pooling)
    return info, Engine.load(info, dtype=dtype)


@pytest.mark.parametrize(("buckets", "max_distance"), [(32, 128), (8, 20), (64, 256), (6, 7)])
def test_buckets_match_transformers(buckets: int, max_distance: int) -> None:
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(-700, 701)[None, :]
    expected = T5Attention._relative_position_bucket(
        relative, bidirectional=True, num_buckets=buckets, max_distance=max_distance)
    assert torch.equal(relative_buckets(relative, buckets, max_distance), expected)
    assert expected.max() == buckets - 1  # the far range is reached


CASES = {
    "t5-relu": ("T5EncoderModel", "t5", {}),
    "t5-gated-gelu": ("T5EncoderModel", "t5", {"feed_forward_proj": "gated-gelu"}),
    "t5-gated-silu": ("T5EncoderModel", "t5", {"feed_forward_proj": "gated-silu"}),
    "t5-gelu": ("T5EncoderModel", "t5", {"feed_forward_proj": "gelu"}),
    "t5-32-buckets": ("T5EncoderModel", "t5", {"relative_attention_num_buckets": 32,
                                               "relative_attention_max_distance": 128}),
    "t5-eps": ("T5EncoderModel", "t5", {"layer_norm_epsilon": 0.5}),
    # config.json's stored dense_act_fn / is_gated_act win over feed_forward_proj in T5Config
    # (exact gelu here, where "gated-gelu" alone means the tanh one; a gated relu).
    "t5-stored-dense-act-fn": ("T5EncoderModel", "t5", {"feed_forward_proj": "gated-gelu",
                                                        "dense_act_fn": "gelu"}),
    "t5-stored-is-gated-act": ("T5EncoderModel", "t5", {"feed_forward_proj": "relu",
                                                        "is_gated_act": True}),
    # Encoder, decoder and LM head in one file (Flan-T5's, t5-base's): the encoder is served.
    "t5-conditional-generation": ("T5ForConditionalGeneration", "t5", {}),
    "t5-model": ("T5Model", "t5", {}),
    # Heads sentence-transformers drops with the decoder, loading the encoder alone.
    "t5-token-classification": ("T5ForTokenClassification", "t5", {"num_labels": 3}),
    "t5-question-answering": ("T5ForQuestionAnswering", "t5", {}),
    "mt5": ("MT5EncoderModel", "mt5", {}),
    "mt5-conditional-generation": ("MT5ForConditionalGeneration", "mt5", {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hidden_states_match_transformers(tmp_path: Path, case: str) -> None:
    import transformers

    architecture, model_type, overrides = CASES[case]
    root = make_tiny_t5(tmp_path / case, architecture, model_type=model_type, seed=len(case),
                        **overrides)
    _, engine = serve(root, "mean")
    arrays, ids = pack(root, TEXTS, MAX_TOKENS)
    assert len(set(map(len, ids))) == len(ids), "inputs must differ in length"
    encoder = getattr(transformers, "MT5EncoderModel" if model_type == "mt5"
                      else "T5EncoderModel")
    ref = hf_hidden(encoder.from_pretrained(str(root)).eval(), arrays, token_types=False)
    diff = (engine.hidden_states(arrays) - ref).abs().max().item()
    print(f"{case}: max abs diff of last hidden state {diff:.2e}")
    assert diff <= HIDDEN_TOL


def test_config_defaults_are_the_types(tmp_path: Path) -> None:
    """A config.json without feed_forward_proj, buckets, distance or eps reads T5Config's
    defaults (relu, 32, 128, 1e-6); mT5's feed-forward default is gated-gelu."""
    from transformers import MT5EncoderModel, T5EncoderModel

    for model_type, encoder in (("t5", T5EncoderModel), ("mt5", MT5EncoderModel)):
        root = make_tiny_t5(tmp_path / model_type, model_type=model_type, seed=7,
                            relative_attention_num_buckets=32,
                            relative_attention_max_distance=128)
        config = json.loads((root / "config.json").read_text())
        for key in ("feed_forward_proj", "relative_attention_num_buckets",
                    "relative_attention_max_distance", "layer_norm_epsilon", "dense_act_fn",
                    "is_gated_act"):
            config.pop(key, None)
        (root / "config.json").write_text(json.dumps(config))
        _, engine = serve(root, "mean")
        arrays, _ = pack(root, TEXTS, MAX_TOKENS)
        ref = hf_hidden(encoder.from_pretrained(str(root)).eval(), arrays, token_types=False)
        assert (engine.hidden_states(arrays) - ref).abs().max().item() <= HIDDEN_TOL


@pytest.mark.parametrize("dense", [True, False])
def test_pooled_matches_sentence_transformers(tmp_path: Path, dense: bool) -> None:
    """sentence-t5 / GTR's layout: mean pooling, a bias-free Dense, Normalize."""
    from sentence_transformers import SentenceTransformer

    root = make_tiny_t5(tmp_path / "m", pooling="mean", dense=dense, seed=3)
    texts = [t for t in TEXTS if isinstance(t, str)]
    info, engine = serve(root)
    assert info.max_input_length == MAX_TOKENS
    arrays, _ = pack(root, texts, info.max_input_length)
    ours = engine.embed(arrays)
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    ref = SentenceTransformer(str(root), device="cpu").encode(texts, convert_to_numpy=True)
    assert np.abs(ours - ref).max() <= 1e-5


def test_n_positions_does_not_cap_the_limit(tmp_path: Path) -> None:
    """T5 has no position table and T5Config no max_position_embeddings: sentence-transformers
    truncates at max_seq_length even where config.json's n_positions is shorter, and so do
    we (the worker takes any length)."""
    from sentence_transformers import SentenceTransformer

    root = make_tiny_t5(tmp_path / "m", pooling="mean", dense=False, seed=4, n_positions=16)
    st_config = root / "sentence_bert_config.json"
    st_config.write_text(json.dumps(json.loads(st_config.read_text()) | {"max_seq_length": 600}))
    texts = [" ".join(["the cat sat on the mat"] * 120), "the cat"]
    info, engine = serve(root)
    model = SentenceTransformer(str(root), device="cpu")
    assert info.max_input_length == model.max_seq_length == 600
    assert engine.max_positions >= 600  # (else the router refuses to start)
    arrays, ids = pack(root, texts, info.max_input_length)
    assert len(ids[0]) == 600
    ours = engine.embed(arrays)
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    ref = model.encode(texts, convert_to_numpy=True)
    assert np.abs(ours - ref).max() <= 1e-5


def test_float16_clamps_as_transformers() -> None:
    def theirs(x: torch.Tensor) -> torch.Tensor:  # T5Block's expression
        limit = torch.where(torch.isinf(x).any(), torch.finfo(x.dtype).max - 1000,
                            torch.finfo(x.dtype).max)
        return torch.clamp(x, min=-limit, max=limit)

    big = torch.finfo(torch.float16).max
    finite = torch.tensor([big, -big, 65000.0, 1.0], dtype=torch.float16)
    assert torch.equal(clamp_float16(finite), finite)
    overflowed = torch.tensor([float("inf"), -float("inf"), 65000.0, 1.0], dtype=torch.float16)
    clamped = clamp_float16(overflowed)
    assert torch.equal(clamped, theirs(overflowed))
    assert clamped.tolist() == [64512.0, -64512.0, 64512.0, 1.0]  # (big - 1000, rounded)
    wide = torch.tensor([float("inf"), 3e38], dtype=torch.bfloat16)
    assert clamp_float16(wide) is wide


@pytest.mark.parametrize("feed_forward", ["relu", "gated-gelu"])
def test_float16_hidden_states_match_transformers_in_float16(tmp_path: Path,
                                                              feed_forward: str) -> None:
    """Embeddings near float16's largest value and sublayer outputs scaled up, so that both
    residual sums of a block overflow: transformers' float16 model (converted with .half(), as
    sentence-transformers' users do) clamps each sum, and so do we; a clamp left out, or moved
    inside the residual, gives NaN."""
    from transformers import T5EncoderModel

    root = make_tiny_t5(tmp_path / "m", seed=5, feed_forward_proj=feed_forward)
    path = root / "model.safetensors"
    state = load_file(str(path))
    state["shared.weight"] = state["shared.weight"] * 60000
    for key in state:
        if key.endswith(("SelfAttention.o.weight", "DenseReluDense.wo.weight")):
            state[key] = state[key] * (20000 if feed_forward == "relu" or ".o." in key else 300)
    save_file(state, str(path), metadata={"format": "pt"})
    _, engine = serve(root, "mean", dtype=torch.float16)
    arrays, _ = pack(root, TEXTS, MAX_TOKENS)
    ref = hf_hidden(T5EncoderModel.from_pretrained(str(root)).half().eval(), arrays,
                    token_types=False).float()
    ours = engine.hidden_states(arrays).float()
    assert torch.isfinite(ref).all() and torch.isfinite(ours).all()
    cosine = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
    assert cosine.min().item() >= 0.999


def test_bias_rows_are_the_full_bias_sliced() -> None:
    """The padded path asks for the bias of a block of query rows (long inputs): the same
    values as those rows of the whole [heads, L, L] bias."""
    bias = RelativePositionBias(8, 3, 20)
    torch.nn.init.normal_(bias.table.weight)
    full = bias(50, torch.device("cpu"))
    assert full.shape == (3, 50, 50)
    for first, last in ((0, 7), (7, 30), (45, 50)):
        assert torch.equal(bias(50, torch.device("cpu"), (first, last)), full[:, first:last])


@pytest.mark.parametrize(("edit", "message"), [
    ({"feed_forward_proj": "gated-gelu-new"}, "feed_forward_proj='gated-gelu-new'"),
    ({"feed_forward_proj": "fast-relu"}, "feed_forward_proj='fast-relu'"),
    ({"feed_forward_proj": "gated-swishy"}, "activation 'swishy' is not supported"),
    ({"is_decoder": True}, "is_decoder=True"),
    ({"dense_act_fn": "quick_gelu"}, "dense_act_fn 'quick_gelu' is not supported"),
    ({"d_kv": None}, "t5 config lacks 'd_kv'"),
])
def test_refused_configs(tmp_path: Path, edit: dict, message: str) -> None:
    root = make_tiny_t5(tmp_path / "m")
    config = json.loads((root / "config.json").read_text())
    for derived in ("dense_act_fn", "is_gated_act"):  # (they would decide over the edit)
        config.pop(derived)
    config.update(edit)
    config = {key: value for key, value in config.items() if value is not None}
    (root / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        serve(root, "mean")


@pytest.mark.parametrize(("feed_forward", "message"), [
    ("gated-gelu", r"unexpected keys: encoder\.block\.0\.layer\.1\.DenseReluDense\.wi\.weight"),
    ("relu", r"unexpected keys: encoder\.block\.0\.layer\.1\.DenseReluDense\.wi_0\.weight"),
])
def test_a_checkpoint_of_the_other_feed_forward_is_refused(tmp_path: Path, feed_forward: str,
                                                           message: str) -> None:
    """config.json's feed_forward_proj says one kind, the weights are the other's (and no
    stored is_gated_act says otherwise)."""
    root = make_tiny_t5(tmp_path / "m", feed_forward_proj="gated-gelu"
                        if feed_forward == "relu" else "relu")
    config = json.loads((root / "config.json").read_text())
    del config["is_gated_act"], config["dense_act_fn"]
    (root / "config.json").write_text(json.dumps(config | {"feed_forward_proj": feed_forward}))
    with pytest.raises(ConfigError, match=message):
        serve(root, "mean")


@pytest.mark.parametrize("model_type", ["t5", "mt5"])
def test_a_transformers_4_checkpoint_serves_its_encoder(tmp_path: Path, model_type: str) -> None:
    """Files saved by transformers 4 (and mT5's, whose LM head is untied) hold the embedding
    under `shared` and both stacks' names, and an lm_head: the encoder is served, as
    T5EncoderModel loads it."""
    import transformers

    root = make_tiny_t5(tmp_path / "m", "T5ForConditionalGeneration" if model_type == "t5"
                        else "MT5ForConditionalGeneration", model_type=model_type, seed=6)
    path = root / "model.safetensors"
    state = load_file(str(path))
    assert "lm_head.weight" not in state and "encoder.embed_tokens.weight" not in state
    shared = state["shared.weight"]
    state |= {"encoder.embed_tokens.weight": shared.clone(),
              "decoder.embed_tokens.weight": shared.clone(),
              "lm_head.weight": torch.randn_like(shared)}
    save_file(state, str(path), metadata={"format": "pt"})
    _, engine = serve(root, "mean")
    arrays, _ = pack(root, TEXTS, MAX_TOKENS)
    encoder = getattr(transformers, "MT5EncoderModel" if model_type == "mt5"
                      else "T5EncoderModel")
    ref = hf_hidden(encoder.from_pretrained(str(root)).eval(), arrays, token_types=False)
    assert (engine.hidden_states(arrays) - ref).abs().max().item() <= HIDDEN_TOL


def test_the_encoder_embedding_is_shared_under_either_name(tmp_path: Path) -> None:
    """`encoder.embed_tokens.weight` is `shared` itself (one tensor): a file holding it alone
    serves it, as transformers 5 ties it into `shared`. Both with different values are refused:
    transformers 5 then unties them and embeds with the encoder's own, which dropping that name
    as a duplicate would have replaced by `shared`, silently."""
    root = make_tiny_t5(tmp_path / "m")
    path = root / "model.safetensors"
    state = load_file(str(path))
    arrays, _ = pack(root, TEXTS, MAX_TOKENS)
    expected = serve(root, "mean")[1].hidden_states(arrays)
    shared = state["shared.weight"]
    save_file(state | {"encoder.embed_tokens.weight": shared + 1}, str(path),
              metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"embed\.weight filled twice") as info:
        serve(root, "mean")
    assert "shared.weight" in str(info.value)
    assert "encoder.embed_tokens.weight" in str(info.value)
    state["encoder.embed_tokens.weight"] = state.pop("shared.weight")
    save_file(state, str(path), metadata={"format": "pt"})
    assert torch.equal(serve(root, "mean")[1].hidden_states(arrays), expected)


def test_umt5_is_refused(tmp_path: Path) -> None:
    """UMT5 has a bias table in every layer: its model type is refused by name, and its
    weights under a "t5" config are refused as the later layers' tables."""
    root = make_tiny_t5(tmp_path / "m", "UMT5EncoderModel", model_type="umt5")
    with pytest.raises(ConfigError, match="unsupported model \\(model_type 'umt5'"):
        serve(root, "mean")
    config = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps(config | {"model_type": "t5"}))
    with pytest.raises(ConfigError, match=r"unexpected keys: encoder\.block\.1\.layer\.0\."
                                          r"SelfAttention\.relative_attention_bias\.weight"):
        serve(root, "mean")


def test_a_classifier_is_refused(tmp_path: Path) -> None:
    """T5ForSequenceClassification scores with the decoder, which is not served."""
    root = make_tiny_t5(tmp_path / "m", "T5ForSequenceClassification", num_labels=2)
    info, engine = serve(root)
    assert info.kind == "classifier"
    with pytest.raises(ConfigError, match="model_type 't5' has no classification or MLM heads"):
        build_head(info, engine.device)
