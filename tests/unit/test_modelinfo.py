"""`load_model_info` on hand-written model directories, classic and sentence-transformers 6."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared.errors import ConfigError
from shared.modelinfo import load_model_info

BERT_CONFIG = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 32,
               "vocab_size": 100, "max_position_embeddings": 128}

CLASSIC = "sentence_transformers.models."
ST6_TYPES = {
    "Transformer": "sentence_transformers.base.modules.transformer.Transformer",
    "Pooling": "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
    "Dense": "sentence_transformers.base.modules.dense.Dense",
    "Normalize": "sentence_transformers.base.modules.normalize.Normalize",
}


def write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def model_dir(
    root: Path,
    *,
    config: dict[str, Any] | None = None,
    modules: list[tuple[str, str]] | None = None,
    style: str = "classic",
    files: dict[str, Any] | None = None,
) -> Path:
    """config.json + tokenizer.json, and modules.json from (kind, path) pairs, then `files`.

    A kind is a short name (Pooling, Dense...) spelled in `style`, or a full dotted type path.
    """
    write(root / "config.json", config if config is not None else BERT_CONFIG)
    (root / "tokenizer.json").write_text("{}")
    if modules is not None:
        write(root / "modules.json", [
            {"idx": i, "name": str(i), "path": path,
             "type": kind if "." in kind
             else CLASSIC + kind if style == "classic" else ST6_TYPES[kind]}
            for i, (kind, path) in enumerate(modules)
        ])
    for name, data in (files or {}).items():
        write(root / name, data)
    return root


def classic_pooling(mode: str, **extra: Any) -> dict[str, Any]:
    flags = ["cls_token", "mean_tokens", "max_tokens", "lasttoken", "mean_sqrt_len_tokens",
             "weightedmean_tokens"]
    cfg: dict[str, Any] = {"word_embedding_dimension": 32}
    cfg |= {f"pooling_mode_{flag}": flag == mode for flag in flags}
    return cfg | extra


def st6_pooling(mode: Any, **extra: Any) -> dict[str, Any]:
    return {"embedding_dimension": 32, "pooling_mode": mode, "include_prompt": True} | extra


def dense(in_features: int, out_features: int, activation: str | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {"in_features": in_features, "out_features": out_features,
                           "bias": True}
    if activation is not None:
        cfg["activation_function"] = activation
    return cfg


STACK = [("Transformer", ""), ("Pooling", "1_Pooling"), ("Normalize", "2_Normalize")]


# -- the two file formats ---------------------------------------------------------------------


def test_classic_format(tmp_path: Path) -> None:
    root = model_dir(tmp_path, modules=[
        ("Transformer", ""), ("Pooling", "1_Pooling"), ("Dense", "2_Dense"),
        ("Normalize", "3_Normalize"),
    ], files={
        "1_Pooling/config.json": classic_pooling("mean_tokens"),
        "2_Dense/config.json": dense(32, 16, "torch.nn.modules.activation.Tanh"),
        "sentence_bert_config.json": {"max_seq_length": 64, "do_lower_case": False},
        "config_sentence_transformers.json": {
            "prompts": {"query": "query: ", "passage": "passage: "},
            "default_prompt_name": "query"},
    })
    info = load_model_info(root)
    assert info.model_type == "bert"
    assert info.architectures == ["BertModel"]
    assert info.hidden_size == 32
    assert info.vocab_size == 100
    assert info.pooling == "mean"
    assert info.max_input_length == 64
    assert info.position_offset == 0
    assert info.has_normalize
    assert [(d.in_features, d.out_features, d.activation, d.bias) for d in info.dense] == [
        (32, 16, "tanh", True)]
    assert info.dense[0].path == str(root / "2_Dense")
    assert info.embedding_dim == 16
    assert info.prompts == {"query": "query: ", "passage": "passage: "}
    assert info.default_prompt_name == "query"
    assert info.tokenizer_path == root / "tokenizer.json"


def test_st6_format(tmp_path: Path) -> None:
    root = model_dir(tmp_path, style="st6", modules=[
        ("Transformer", ""), ("Pooling", "1_Pooling"), ("Dense", "2_Dense"),
        ("Normalize", "3_Normalize"),
    ], files={
        "1_Pooling/config.json": st6_pooling("mean"),
        "2_Dense/config.json": dense(32, 8, "torch.nn.modules.activation.Tanh") | {
            "module_input_name": "sentence_embedding",
            "module_output_name": "sentence_embedding"},
        "sentence_bert_config.json": {"transformer_task": "feature-extraction",
                                      "module_output_name": "token_embeddings"},
        "tokenizer_config.json": {"model_max_length": 100},
        "config_sentence_transformers.json": {
            "prompts": {"document": "", "query": "q: "}, "default_prompt_name": "query",
            "model_type": "SentenceTransformer", "similarity_fn_name": "cosine"},
    })
    info = load_model_info(root)
    assert info.pooling == "mean"
    assert info.max_input_length == 100
    assert info.has_normalize
    assert info.embedding_dim == 8
    assert info.dense[0].activation == "tanh"
    assert info.prompts == {"document": "", "query": "q: "}
    assert info.default_prompt_name == "query"


def test_st6_no_limit_sentinel_falls_back_to_positions(tmp_path: Path) -> None:
    root = model_dir(tmp_path, style="st6", modules=STACK, files={
        "1_Pooling/config.json": st6_pooling("cls"),
        "sentence_bert_config.json": {},
        "tokenizer_config.json": {"model_max_length": 1000000000000000019884624838656},
    })
    assert load_model_info(root).max_input_length == 128


def test_without_sentence_transformers_files_the_no_limit_sentinel_means_positions(
        tmp_path: Path) -> None:
    root = model_dir(tmp_path, files={
        "tokenizer_config.json": {"model_max_length": 1000000000000000019884624838656}})
    assert load_model_info(root).max_input_length == 128


def test_without_modules_json_sentence_bert_config_is_not_read(tmp_path: Path) -> None:
    # sentence-transformers builds its Transformer without reading this file then (as for its
    # do_lower_case): the tokenizer's model_max_length is the limit.
    root = model_dir(tmp_path, files={
        "sentence_bert_config.json": {"max_seq_length": 20, "do_lower_case": False},
        "tokenizer_config.json": {"model_max_length": 16}})
    assert load_model_info(root).max_input_length == 16


def test_without_any_sentence_transformers_files(tmp_path: Path) -> None:
    root = model_dir(tmp_path, files={"tokenizer_config.json": {"model_max_length": 16}})
    info = load_model_info(root)
    # sentence-transformers builds its Transformer around the tokenizer, whose
    # model_max_length (capped at the position table) is the limit, as with modules.json.
    assert info.max_input_length == 16
    assert info.dense == []
    assert not info.has_normalize
    assert info.prompts == {}
    assert info.default_prompt_name is None
    assert info.embedding_dim == 32


# -- pooling ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "expected"),
    [("cls_token", "cls"), ("mean_tokens", "mean"), ("max_tokens", "max"),
     ("lasttoken", "last-token")],
)
def test_classic_pooling_names(tmp_path: Path, flag: str, expected: str) -> None:
    root = model_dir(tmp_path, modules=STACK,
                     files={"1_Pooling/config.json": classic_pooling(flag)})
    assert load_model_info(root).pooling == expected


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("cls", "cls"), ("mean", "mean"), ("max", "max"), ("lasttoken", "last-token"),
     ("last_token", "last-token"), (["mean"], "mean"), ("MEAN", "mean")],
)
def test_st6_pooling_names(tmp_path: Path, mode: Any, expected: str) -> None:
    root = model_dir(tmp_path, style="st6", modules=STACK,
                     files={"1_Pooling/config.json": st6_pooling(mode)})
    assert load_model_info(root).pooling == expected


@pytest.mark.parametrize(
    "cfg",
    [
        classic_pooling("mean_tokens") | {"pooling_mode_cls_token": True},
        st6_pooling(["mean", "max"]),
    ],
    ids=["classic-two", "st6-two"],
)
def test_not_exactly_one_pooling_mode_is_refused(tmp_path: Path, cfg: dict[str, Any]) -> None:
    root = model_dir(tmp_path, modules=STACK, files={"1_Pooling/config.json": cfg})
    with pytest.raises(ConfigError, match="exactly one pooling mode"):
        load_model_info(root)


@pytest.mark.parametrize(
    "cfg",
    [classic_pooling("none"), {"word_embedding_dimension": 32}, {"embedding_dimension": 32}],
    ids=["classic-all-false", "classic-no-flags", "st6-no-mode"],
)
def test_no_pooling_mode_named_is_mean(tmp_path: Path, cfg: dict[str, Any]) -> None:
    # sentence-transformers' Pooling: no mode set (every legacy flag false, or none written)
    # is its default, mean.
    from sentence_transformers.sentence_transformer.modules import Pooling

    root = model_dir(tmp_path, modules=STACK, files={"1_Pooling/config.json": cfg})
    assert Pooling.load(str(root / "1_Pooling")).pooling_mode == "mean"
    assert load_model_info(root).pooling == "mean"


@pytest.mark.parametrize(
    ("cfg", "ours"),
    [(classic_pooling("weightedmean_tokens"), "weightedmean"),
     (st6_pooling("weightedmean"), "weightedmean"),
     (classic_pooling("mean_sqrt_len_tokens"), "mean_sqrt_len_tokens"),
     (st6_pooling("mean_sqrt_len_tokens"), "mean_sqrt_len_tokens")],
    ids=["weightedmean-classic", "weightedmean-v6", "mean_sqrt_len-classic", "mean_sqrt_len-v6"],
)
def test_weighted_and_sqrt_len_poolings_are_read(
    tmp_path: Path, cfg: dict[str, Any], ours: str
) -> None:
    root = model_dir(tmp_path, modules=STACK, files={"1_Pooling/config.json": cfg})
    assert load_model_info(root).pooling == ours


def test_unknown_pooling_mode_is_refused(tmp_path: Path) -> None:
    root = model_dir(tmp_path, modules=STACK,
                     files={"1_Pooling/config.json": st6_pooling("median")})
    with pytest.raises(ConfigError, match="--pooling"):
        load_model_info(root)


def test_pooling_override_rescues_an_unsupported_mode(tmp_path: Path) -> None:
    root = model_dir(tmp_path, modules=STACK,
                     files={"1_Pooling/config.json": st6_pooling("median")})
    assert load_model_info(root, pooling_override="mean").pooling == "mean"


@pytest.mark.parametrize(
    "cfg",
    [st6_pooling("lasttoken", include_prompt=False),
     classic_pooling("mean_tokens", include_prompt=False)],
    ids=["st6", "classic"],
)
def test_include_prompt_false_is_read(tmp_path: Path, cfg: dict[str, Any]) -> None:
    root = model_dir(tmp_path, modules=STACK, files={"1_Pooling/config.json": cfg})
    assert load_model_info(root).include_prompt is False
    # (kept under a --pooling override, which replaces only the mode)
    assert load_model_info(root, pooling_override="cls").include_prompt is False


def test_include_prompt_is_true_by_default(tmp_path: Path) -> None:
    root = model_dir(tmp_path, modules=STACK,
                     files={"1_Pooling/config.json": classic_pooling("mean_tokens")})
    assert load_model_info(root).include_prompt is True


def test_a_decision_model_is_refused_by_name(tmp_path: Path) -> None:
    # TEI 1.9's /v1/decide models are ModernBERT encoders plus a head: not an embedding model.
    root = model_dir(tmp_path, modules=STACK,
                     files={"1_Pooling/config.json": classic_pooling("mean_tokens"),
                            "rl_agent_config.json": {}})
    with pytest.raises(ConfigError, match="decision model"):
        load_model_info(root)
    # Laya's own layout: the encoder's config.json in encoder/, none at the top.
    (root / "config.json").unlink()
    with pytest.raises(ConfigError, match="decision model"):
        load_model_info(root)


def test_a_peft_adapter_is_refused_not_left_out(tmp_path: Path) -> None:
    # sentence-transformers (transformers with peft) applies it to its base model: the
    # base model's weights beside it, served alone, would give other vectors without a word.
    root = model_dir(tmp_path, modules=STACK,
                     files={"1_Pooling/config.json": classic_pooling("mean_tokens"),
                            "adapter_config.json": {"peft_type": "LORA",
                                                    "base_model_name_or_path": "org/base"}})
    with pytest.raises(ConfigError, match=r"PEFT adapter \(adapter_config.json\)"):
        load_model_info(root)


def test_pooling_override(tmp_path: Path) -> None:
    root = model_dir(tmp_path, modules=STACK,
                     files={"1_Pooling/config.json": classic_pooling("mean_tokens")})
    assert load_model_info(root, pooling_override="cls").pooling == "cls"
    assert load_model_info(root, pooling_override="splade").pooling == "splade"
    with pytest.raises(ConfigError, match="--pooling"):
        load_model_info(root, pooling_override="average")


@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta", "distilbert"])
def test_bert_variant_without_pooling_falls_back_to_cls(tmp_path: Path, model_type: str) -> None:
    root = model_dir(tmp_path, config=BERT_CONFIG | {"model_type": model_type})
    assert load_model_info(root).pooling == "cls"


def test_classifier_without_pooling_pools_cls(tmp_path: Path) -> None:
    """Any family's *ForSequenceClassification (e.g. GTE's NewForSequenceClassification)."""
    config = BERT_CONFIG | {"model_type": "new", "architectures": ["NewForSequenceClassification"]}
    info = load_model_info(model_dir(tmp_path, config=config))
    assert (info.kind, info.pooling) == ("classifier", "cls")


def test_non_bert_without_pooling_has_none(tmp_path: Path) -> None:
    root = model_dir(tmp_path, config=BERT_CONFIG | {"model_type": "qwen3"})
    assert load_model_info(root).pooling is None
    assert load_model_info(root, pooling_override="last-token").pooling == "last-token"


# -- lengths and positions --------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta", "camembert"])
def test_roberta_family_position_offset(tmp_path: Path, model_type: str) -> None:
    config = BERT_CONFIG | {"model_type": model_type, "pad_token_id": 1,
                            "max_position_embeddings": 514}
    info = load_model_info(model_dir(tmp_path, config=config))
    assert info.position_offset == 2
    assert info.max_input_length == 512


def test_position_offset_follows_pad_token_id(tmp_path: Path) -> None:
    config = BERT_CONFIG | {"model_type": "roberta", "pad_token_id": 0,
                            "max_position_embeddings": 514}
    info = load_model_info(model_dir(tmp_path, config=config))
    assert info.position_offset == 1
    assert info.max_input_length == 513


def test_bert_has_no_position_offset(tmp_path: Path) -> None:
    config = BERT_CONFIG | {"pad_token_id": 0, "max_position_embeddings": 512}
    info = load_model_info(model_dir(tmp_path, config=config))
    assert info.position_offset == 0
    assert info.max_input_length == 512


def test_max_seq_length_is_capped_by_positions(tmp_path: Path) -> None:
    config = BERT_CONFIG | {"model_type": "roberta", "pad_token_id": 1,
                            "max_position_embeddings": 514}
    root = model_dir(tmp_path, config=config, modules=STACK, files={
        "1_Pooling/config.json": classic_pooling("mean_tokens"),
        "sentence_bert_config.json": {"max_seq_length": 1024},
    })
    assert load_model_info(root).max_input_length == 512


def test_st6_model_max_length_is_capped_by_positions(tmp_path: Path) -> None:
    root = model_dir(tmp_path, style="st6", modules=STACK, files={
        "1_Pooling/config.json": st6_pooling("mean"),
        "sentence_bert_config.json": {},
        "tokenizer_config.json": {"model_max_length": 4096},
    })
    assert load_model_info(root).max_input_length == 128


def test_sentence_bert_max_seq_length_beats_tokenizer_config(tmp_path: Path) -> None:
    root = model_dir(tmp_path, modules=STACK, files={
        "1_Pooling/config.json": classic_pooling("mean_tokens"),
        "sentence_bert_config.json": {"max_seq_length": 50},
        "tokenizer_config.json": {"model_max_length": 100},
    })
    assert load_model_info(root).max_input_length == 50


# -- prompts ----------------------------------------------------------------------------------


def test_default_prompt_name_must_be_a_prompt(tmp_path: Path) -> None:
    root = model_dir(tmp_path, files={"config_sentence_transformers.json": {
        "prompts": {"query": "q: "}, "default_prompt_name": "passage"}})
    with pytest.raises(ConfigError, match="passage"):
        load_model_info(root)


def test_null_prompts_are_empty(tmp_path: Path) -> None:
    root = model_dir(tmp_path, files={"config_sentence_transformers.json": {
        "prompts": None, "default_prompt_name": None}})
    info = load_model_info(root)
    assert info.prompts == {}
    assert info.default_prompt_name is None


def test_a_null_prompt_is_the_empty_prompt(tmp_path: Path) -> None:
    """sentence-transformers reads a prompt saved as null as "" (its _validate_prompts): an
    inference-free SPLADE model's "query" prompt so saved is no prompt, not the text "None"."""
    root = model_dir(tmp_path, files={"config_sentence_transformers.json": {
        "prompts": {"query": None, "passage": "p: "}, "default_prompt_name": "query"}})
    info = load_model_info(root)
    assert info.prompts == {"query": "", "passage": "p: "}
    assert info.default_prompt_name == "query"


# -- Dense ------------------------------------------------------------------------------------


def test_dense_chain(tmp_path: Path) -> None:
    identity = "torch.nn.modules.linear.Identity"
    root = model_dir(tmp_path, modules=[*STACK[:2], ("Dense", "2_Dense"), ("Dense", "3_Dense")],
                     files={"1_Pooling/config.json": classic_pooling("mean_tokens"),
                            "2_Dense/config.json": dense(32, 64),
                            "3_Dense/config.json": dense(64, 24, identity)})
    info = load_model_info(root)
    assert [(d.in_features, d.out_features) for d in info.dense] == [(32, 64), (64, 24)]
    # No activation_function saved: sentence-transformers' Dense default, Tanh.
    assert [d.activation for d in info.dense] == ["tanh", "identity"]
    assert info.embedding_dim == 24
    assert not info.has_normalize


def test_dense_activations_as_sentence_transformers_loads_them(tmp_path: Path) -> None:
    # Dense.load: no activation_function is its default (Tanh); a path outside torch is not
    # imported without trust_remote_code (Tanh again, with a warning), with it it is the
    # repository's code: either way not the class its last name suggests, so it is refused.
    from sentence_transformers.sentence_transformer.modules import Dense

    stack = [*STACK[:2], ("Dense", "2_Dense")]
    files = {"1_Pooling/config.json": classic_pooling("mean_tokens")}
    root = model_dir(tmp_path / "default", modules=stack,
                     files=files | {"2_Dense/config.json": dense(32, 8)})
    Dense(32, 8).save_torch_weights(str(root / "2_Dense"))
    assert type(Dense.load(str(root / "2_Dense")).activation_function).__name__ == "Tanh"
    assert load_model_info(root).dense[0].activation == "tanh"
    root = model_dir(tmp_path / "foreign", modules=stack, files=files | {
        "2_Dense/config.json": dense(32, 8, "my_package.activations.Identity")})
    with pytest.raises(ConfigError, match=r"my_package\.activations\.Identity"):
        load_model_info(root)


def test_modules_run_in_the_lists_order_whatever_their_idx(tmp_path: Path) -> None:
    # sentence-transformers builds its pipeline in modules.json's order and never reads idx.
    root = model_dir(tmp_path, files={
        "1_Pooling/config.json": classic_pooling("mean_tokens"),
        "2_Dense/config.json": dense(32, 64),
        "3_Dense/config.json": dense(64, 24),
        "4_Normalize/config.json": {},
    })
    modules = [{"idx": 3, "name": "0", "path": "", "type": CLASSIC + "Transformer"},
               {"idx": 2, "name": "1", "path": "1_Pooling", "type": CLASSIC + "Pooling"},
               {"idx": 0, "name": "2", "path": "2_Dense", "type": CLASSIC + "Dense"},
               {"idx": 1, "name": "3", "path": "3_Dense", "type": CLASSIC + "Dense"}]
    write(root / "modules.json", modules)
    assert [d.out_features for d in load_model_info(root).dense] == [64, 24]
    # Normalize listed before a Dense runs before it there, whatever idx says: refused.
    normalize = {"idx": 9, "name": "4", "path": "4_Normalize", "type": CLASSIC + "Normalize"}
    write(root / "modules.json", [*modules[:3], normalize, modules[3]])
    with pytest.raises(ConfigError, match="Dense after Normalize is not supported"):
        load_model_info(root)


@pytest.mark.parametrize("kind", ["custom_st.Transformer", "my_modules.Pooling",
                                  "custom.models.Normalize"])
def test_a_repositorys_own_module_is_refused_whatever_its_name(tmp_path: Path,
                                                               kind: str) -> None:
    # jina-embeddings-v3 ships `custom_st.Transformer`: its code, not the built-in.
    modules = [(kind if "Transformer" in kind else "Transformer", ""),
               (kind if "Pooling" in kind else "Pooling", "1_Pooling"),
               (kind if "Normalize" in kind else "Normalize", "2_Normalize")]
    root = model_dir(tmp_path, modules=modules,
                     files={"1_Pooling/config.json": classic_pooling("mean_tokens")})
    with pytest.raises(ConfigError, match=f"module type '{kind}' is the repository's own code"):
        load_model_info(root)


def test_a_transformer_in_a_folder_of_its_own_is_refused(tmp_path: Path) -> None:
    # Older repositories: config.json and the weights at the root would be other ones.
    root = model_dir(tmp_path, modules=[("Transformer", "0_Transformer"), *STACK[1:]],
                     files={"1_Pooling/config.json": classic_pooling("mean_tokens")})
    with pytest.raises(ConfigError, match="the Transformer module is in '0_Transformer'"):
        load_model_info(root)
    write(root / "modules.json", [{"idx": 0, "name": "0", "path": "./",
                                   "type": CLASSIC + "Transformer"}])
    load_model_info(root)  # the root, spelled otherwise


def test_an_old_folder_with_its_transformer_in_a_folder_of_its_own_is_refused_by_name(
        tmp_path: Path) -> None:
    # As such folders are saved: no config.json, tokenizer or weights at the root at all.
    root = model_dir(tmp_path / "0_Transformer").parent
    write(root / "modules.json", [
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": CLASSIC + "Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": CLASSIC + "Pooling"}])
    write(root / "1_Pooling/config.json", classic_pooling("mean_tokens"))
    with pytest.raises(ConfigError, match="the Transformer module is in '0_Transformer'"):
        load_model_info(root)


def test_a_router_after_other_modules_is_refused_by_name(tmp_path: Path) -> None:
    # sentence-transformers 6 saves such a Router (a Dense per route, say) in 2_Router/.
    root = model_dir(tmp_path, modules=[*STACK[:2], (
        "sentence_transformers.base.modules.router.Router", "2_Router")],
        files={"1_Pooling/config.json": classic_pooling("mean_tokens"),
               "2_Router/router_config.json": {}})
    with pytest.raises(ConfigError, match="a Router must be the only module"):
        load_model_info(root)


def test_without_a_vocabulary_file_the_hint_asks_for_a_full_copy(tmp_path: Path) -> None:
    """A Hub download of a model without tokenizer.json brings tokenizer_config.json and no
    vocabulary: from_pretrained on that directory would fail too."""
    root = model_dir(tmp_path)
    (root / "tokenizer.json").unlink()
    (root / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="DIR a full copy of the repository"):
        load_model_info(root)
    (root / "vocab.txt").write_text("x")
    with pytest.raises(ConfigError) as info:
        load_model_info(root)
    assert "full copy" not in str(info.value)


@pytest.mark.parametrize("slow", ["vocab.txt", "sentencepiece.bpe.model", "spiece.model"])
def test_a_slow_tokenizer_alone_is_named_with_how_to_convert_it(tmp_path: Path,
                                                                 slow: str) -> None:
    """No tokenizer.json, no tokenizer_config.json, only a slow tokenizer's vocabulary (TEI
    refuses it too; sentence-transformers converts it): the error names the file found and
    how to write a tokenizer.json from it."""
    root = model_dir(tmp_path)
    (root / "tokenizer.json").unlink()
    (root / slow).write_text("x")
    with pytest.raises(ConfigError, match=rf"tokenizer.json not found.*slow tokenizer's {slow}: "
                                          r"AutoTokenizer.from_pretrained\(DIR\)"):
        load_model_info(root)


@pytest.mark.parametrize(("modules", "setting", "expected"), [
    (STACK, True, True), (STACK, False, False), (STACK, None, False),
    (None, True, False),  # no modules.json: sentence-transformers never reads the file
])
def test_do_lower_case(tmp_path: Path, modules, setting, expected) -> None:
    files: dict[str, Any] = {"1_Pooling/config.json": classic_pooling("mean_tokens")}
    if setting is not None:
        files["sentence_bert_config.json"] = {"max_seq_length": 64, "do_lower_case": setting}
    root = model_dir(tmp_path, modules=modules, files=files)
    assert load_model_info(root, pooling_override="mean").lowercase is expected


@pytest.mark.parametrize("dims", [[(16, 8)], [(32, 64), (32, 8)]], ids=["first", "second"])
def test_dense_chain_dims_are_checked(tmp_path: Path, dims: list[tuple[int, int]]) -> None:
    names = [f"{i + 2}_Dense" for i in range(len(dims))]
    files: dict[str, Any] = {"1_Pooling/config.json": classic_pooling("mean_tokens")}
    files |= {f"{name}/config.json": dense(i, o) for name, (i, o) in zip(names, dims, strict=True)}
    root = model_dir(tmp_path, modules=[*STACK[:2], *(("Dense", n) for n in names)], files=files)
    with pytest.raises(ConfigError, match=names[-1]):
        load_model_info(root)


def test_unsupported_dense_activation(tmp_path: Path) -> None:
    root = model_dir(tmp_path, modules=[*STACK[:2], ("Dense", "2_Dense")], files={
        "1_Pooling/config.json": classic_pooling("mean_tokens"),
        "2_Dense/config.json": dense(32, 8, "torch.nn.modules.activation.Softplus")})
    with pytest.raises(ConfigError, match="Softplus"):
        load_model_info(root)


@pytest.mark.parametrize("order", [
    [("Transformer", ""), ("Dense", "2_Dense"), ("Pooling", "1_Pooling")],  # on the tokens
    [*STACK, ("Dense", "2_Dense")],  # after Normalize
    [*STACK[:2], ("Pooling", "1_Pooling"), ("Dense", "2_Dense")],  # pooled twice
], ids=["dense-before-pooling", "dense-after-normalize", "two-poolings"])
def test_a_pipeline_out_of_order_is_refused(tmp_path: Path, order: list[tuple[str, str]]) -> None:
    # Served in the worker's fixed order, these would differ from sentence-transformers.
    root = model_dir(tmp_path, modules=order, files={
        "1_Pooling/config.json": classic_pooling("mean_tokens"),
        "2_Dense/config.json": dense(32, 32)})
    with pytest.raises(ConfigError, match=r"modules\.json: .* after .* is not supported"):
        load_model_info(root)


def test_a_normalize_of_the_token_embeddings_is_refused(tmp_path: Path) -> None:
    root = model_dir(tmp_path, modules=STACK, files={
        "1_Pooling/config.json": classic_pooling("mean_tokens"),
        "2_Normalize/config.json": {"module_input_name": "token_embeddings"}})
    with pytest.raises(ConfigError, match="Normalize with module_input_name='token_embeddings'"):
        load_model_info(root)
    write(root / "2_Normalize" / "config.json", {"module_input_name": "sentence_embedding"})
    assert load_model_info(root).has_normalize


def test_a_dense_on_the_token_embeddings_is_refused(tmp_path: Path) -> None:
    root = model_dir(tmp_path, modules=[*STACK[:2], ("Dense", "2_Dense")], files={
        "1_Pooling/config.json": classic_pooling("mean_tokens"),
        "2_Dense/config.json": {**dense(32, 32), "module_input_name": "token_embeddings"}})
    with pytest.raises(ConfigError, match="module_input_name='token_embeddings'"):
        load_model_info(root)


def test_dense_path_replaces_modules_dense(tmp_path: Path) -> None:
    root = model_dir(tmp_path, modules=[*STACK[:2], ("Dense", "2_Dense")], files={
        "1_Pooling/config.json": classic_pooling("mean_tokens"),
        "2_Dense/config.json": dense(32, 1024),
        "2_Dense_256/config.json": dense(32, 256),
    })
    info = load_model_info(root, dense_path="2_Dense_256")
    assert [d.out_features for d in info.dense] == [256]
    assert info.dense[0].path == str(root / "2_Dense_256")
    assert info.embedding_dim == 256


def test_dense_path_missing_is_a_config_error(tmp_path: Path) -> None:
    root = model_dir(tmp_path)
    with pytest.raises(ConfigError, match="nope"):
        load_model_info(root, dense_path="nope")


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [
    "sentence_transformers.models.LayerNorm",
    "sentence_transformers.base.modules.layer_norm.LayerNorm",
    "sentence_transformers.models.CNN",
])
def test_unsupported_module_type_is_named(tmp_path: Path, kind: str) -> None:
    root = model_dir(tmp_path, modules=[*STACK[:2], (kind, "2_Other")],
                     files={"1_Pooling/config.json": classic_pooling("mean_tokens")})
    with pytest.raises(ConfigError, match=kind.replace(".", r"\.")):
        load_model_info(root)


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    root = model_dir(tmp_path)
    (root / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"tokenizer\.json") as refused:
        load_model_info(root)
    assert "save_pretrained" not in str(refused.value)
    # A slow tokenizer's files (vocab.txt and its config): say how to write the fast one.
    write(root / "tokenizer_config.json", {"tokenizer_class": "BertTokenizer"})
    with pytest.raises(ConfigError, match=r"AutoTokenizer\.from_pretrained\(DIR\)"):
        load_model_info(root)


def test_missing_config_json(tmp_path: Path) -> None:
    root = model_dir(tmp_path)
    (root / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json"):
        load_model_info(root)


def test_broken_json_is_a_config_error(tmp_path: Path) -> None:
    root = model_dir(tmp_path, modules=STACK)
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="1_Pooling"):
        load_model_info(root)


def test_no_hidden_size(tmp_path: Path) -> None:
    config = {k: v for k, v in BERT_CONFIG.items() if k != "hidden_size"}
    with pytest.raises(ConfigError, match=r"config\.json: no hidden_size"):
        load_model_info(model_dir(tmp_path, config=config))


def test_hidden_size_aliases(tmp_path: Path) -> None:
    config = {k: v for k, v in BERT_CONFIG.items() if k != "hidden_size"} | {"dim": 48}
    assert load_model_info(model_dir(tmp_path, config=config)).hidden_size == 48


def test_roberta_without_an_integer_pad_token_id_is_refused(tmp_path: Path) -> None:
    root = model_dir(tmp_path, config={"model_type": "roberta", "pad_token_id": None})
    with pytest.raises(ConfigError, match="pad_token_id"):
        load_model_info(root)


def test_truncate_dim(tmp_path: Path) -> None:
    # SentenceTransformer reads config_sentence_transformers.json's truncate_dim: encode's
    # default width (get_embedding_dimension: never wider than the vectors).
    def info(truncate_dim: Any, name: str):
        return load_model_info(model_dir(tmp_path / name, modules=STACK, files={
            "1_Pooling/config.json": classic_pooling("mean_tokens"),
            "config_sentence_transformers.json": {"truncate_dim": truncate_dim}}))

    assert (info(8, "cut").embedding_dim, info(8, "cut").output_dim) == (32, 8)
    assert info(64, "wider").output_dim == 32
    assert info(None, "none").output_dim == 32
    for bad in (0, -1, "8", True):
        with pytest.raises(ConfigError, match=r"truncate_dim \S+ is not a positive integer"):
            info(bad, f"bad{bad}")
    # Without modules.json sentence-transformers reads no config_sentence_transformers.json.
    bare = load_model_info(model_dir(tmp_path / "bare", files={
        "config_sentence_transformers.json": {"truncate_dim": 8}}), pooling_override="mean")
    assert bare.output_dim == 32
