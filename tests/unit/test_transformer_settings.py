"""The Transformer module's keyword arguments in sentence_bert_config.json that
sentence-transformers applies and we do not: refused at start, naming the file and the key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from shared.errors import ConfigError
from shared.modelinfo import load_model_info
from tests.unit.test_modelinfo import classic_pooling, model_dir

STACK = [("Transformer", ""), ("Pooling", "1_Pooling")]


def with_settings(root: Path, settings: dict[str, Any],
                  name: str = "sentence_bert_config.json") -> Path:
    return model_dir(root, modules=STACK, files={
        "1_Pooling/config.json": classic_pooling("mean_tokens"), name: settings})


@pytest.mark.parametrize(("settings", "named"), [
    # A smaller model than its checkpoint (transformers drops the other layers' weights).
    ({"config_args": {"num_hidden_layers": 1}}, "config_args 'num_hidden_layers'"),
    ({"config_kwargs": {"layer_norm_eps": 0.5}}, "config_kwargs 'layer_norm_eps'"),
    ({"tokenizer_args": {"do_lower_case": True}}, "tokenizer_args 'do_lower_case'"),
    ({"processor_kwargs": {"truncation_side": "left"}}, "processor_kwargs 'truncation_side'"),
    ({"processing_kwargs": {"text": {"add_special_tokens": False}}},
     "processing_kwargs text 'add_special_tokens'"),
    ({"processing_kwargs": {"common": {"truncation": False}}},
     "processing_kwargs common truncation False"),
])
def test_settings_that_change_the_vectors_are_refused(
        tmp_path: Path, settings: dict[str, Any], named: str) -> None:
    root = with_settings(tmp_path, settings)
    with pytest.raises(ConfigError, match=re.escape(f"sentence_bert_config.json: {named}")):
        load_model_info(root)


def test_the_file_refused_is_the_one_read(tmp_path: Path) -> None:
    root = with_settings(tmp_path, {"config_args": {"hidden_act": "relu"}},
                         name="sentence_roberta_config.json")
    with pytest.raises(ConfigError, match=r"sentence_roberta_config\.json: config_args"):
        load_model_info(root)


def test_settings_of_where_files_come_from_and_limits_are_followed(tmp_path: Path) -> None:
    root = with_settings(tmp_path, {
        "max_seq_length": 100, "model_args": {"torch_dtype": "float16"},
        "config_args": {"trust_remote_code": True, "revision": "main", "use_cache": False,
                        "attn_implementation": "sdpa"},
        "tokenizer_args": {"model_max_length": 20, "use_fast": True, "padding_side": "left"},
        "processing_kwargs": {"text": {"padding": True, "truncation": "longest_first",
                                       "padding_side": "left"}}})
    assert load_model_info(root).max_input_length == 20


def test_without_modules_json_the_settings_are_not_read(tmp_path: Path) -> None:
    root = model_dir(tmp_path, files={
        "sentence_bert_config.json": {"config_args": {"num_hidden_layers": 1}}})
    assert load_model_info(root, pooling_override="mean").max_input_length == 128


@pytest.mark.parametrize(("settings", "why"), [
    ({"config_kwargs": {"layer_norm_eps": 0.5}}, "it would change the model; only where its "
                                                 "files come from and how it runs are read"),
    ({"tokenizer_args": {"do_lower_case": True}}, "it would change the tokens; only the "
                                                  "tokenizer's model_max_length is followed"),
])
def test_a_refusal_says_why_for_its_kind_of_settings(
        tmp_path: Path, settings: dict[str, Any], why: str) -> None:
    """A config_kwargs key has no model_max_length to follow instead: the refusal said so for
    every key alike ("only a model_max_length of the tokenizer is followed")."""
    with pytest.raises(ConfigError, match=re.escape(f"is not supported ({why})")):
        load_model_info(with_settings(tmp_path, settings))
