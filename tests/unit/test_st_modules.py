"""sentence-transformers' module files read directly (shared/st_modules.py): a Pooling config's
mode, and a Dense config's defaults as Dense.load fills them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.errors import ConfigError
from shared.st_modules import (
    check_transformer_kwargs,
    parse_dense,
    parse_pooling_config,
    transformer_settings,
)


def test_a_pooling_mode_list_of_none_is_refused(tmp_path: Path) -> None:
    # sentence-transformers 6 writes `pooling_mode` as a name or a list; an empty list names
    # no mode (not the classic format's default mean).
    with pytest.raises(ConfigError, match="exactly one pooling mode is supported, found none"):
        parse_pooling_config({"pooling_mode": []}, tmp_path)
    assert parse_pooling_config({"pooling_mode": ["LastToken"]}, tmp_path) == "last-token"


def test_a_dense_without_a_bias_key_has_a_bias(tmp_path: Path) -> None:
    # Dense's constructor default is bias=True, and its activation Tanh.
    (tmp_path / "config.json").write_text(json.dumps({"in_features": 4, "out_features": 2}))
    spec = parse_dense(tmp_path)
    assert (spec.in_features, spec.out_features, spec.bias, spec.activation) == (
        4, 2, True, "tanh")


def test_a_dense_adding_its_input_back_says_so(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(
        {"in_features": 4, "out_features": 4, "use_residual": True}))
    assert parse_dense(tmp_path).residual
    (tmp_path / "config.json").write_text(json.dumps({"in_features": 4, "out_features": 4}))
    assert not parse_dense(tmp_path).residual


def test_an_empty_settings_file_gives_way_to_the_next_name(tmp_path: Path) -> None:
    # sentence-transformers reads the first of its names that holds any setting: an empty
    # sentence_bert_config.json beside an older save's sentence_roberta_config.json.
    (tmp_path / "sentence_bert_config.json").write_text("{}")
    (tmp_path / "sentence_roberta_config.json").write_text(json.dumps({"max_seq_length": 7}))
    assert transformer_settings(tmp_path) == {"max_seq_length": 7}


def test_a_tokenizer_setting_that_changes_tokens_is_refused(tmp_path: Path) -> None:
    for key in ("processor_kwargs", "tokenizer_args"):
        with pytest.raises(ConfigError, match=f"{key} 'do_lower_case' is not supported"):
            check_transformer_kwargs({key: {"do_lower_case": True}}, tmp_path)
        check_transformer_kwargs({key: {"model_max_length": 8, "padding_side": "left"}},
                                 tmp_path)
