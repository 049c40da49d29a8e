"""shared/model_limits.py's rules, read off config dicts alone: where positions start, the
position table's default, and which limit wins (tests/unit/test_modelinfo.py reads them through
whole model directories)."""

from __future__ import annotations

from pathlib import Path

from shared.model_limits import (
    config_max_positions,
    first_position,
    max_input_length,
    settings_limit,
)


def test_an_offset_family_without_a_pad_token_id_starts_after_transformers_default_pad() -> None:
    # RobertaConfig's pad_token_id defaults to 1: positions start at 2.
    assert first_position({}, "roberta", Path("m")) == 2
    assert first_position({"pad_token_id": 0}, "mpnet", Path("m")) == 1
    assert first_position({"pad_token_id": 5}, "bert", Path("m")) == 0


def test_a_config_without_a_position_table_size_has_512() -> None:
    assert config_max_positions({}) == 512
    assert config_max_positions({"n_positions": 1024}) == 1024


def test_a_relative_position_model_is_not_capped_by_its_config(tmp_path: Path) -> None:
    # T5's n_positions is no limit transformers knows: sentence-transformers' own stands.
    config = {"model_type": "t5", "n_positions": 512}
    assert max_input_length(tmp_path, config, 0, {"max_seq_length": 1024}) == 1024
    bert = {"model_type": "bert", "max_position_embeddings": 512}
    assert max_input_length(tmp_path, bert, 0, {"max_seq_length": 1024}) == 512


def test_a_long_model_max_length_is_a_limit_not_the_no_limit_sentinel(tmp_path: Path) -> None:
    # Only transformers' huge sentinel (int(1e30)) means "no limit"; 32k is a real one.
    (tmp_path / "tokenizer_config.json").write_text('{"model_max_length": 32768}')
    config = {"model_type": "bert", "max_position_embeddings": 40960}
    assert max_input_length(tmp_path, config, 0, {}) == 32768


def test_the_common_processing_kwargs_win_over_the_texts() -> None:
    # sentence-transformers updates the text kwargs with the common ones: common wins.
    both = {"processing_kwargs": {"common": {"max_length": 64}, "text": {"max_length": 32}}}
    assert settings_limit(both) == 64
    assert settings_limit({"processing_kwargs": {"text": {"max_length": 32}},
                           "max_seq_length": 128}) == 32
