"""A static model in the router: its length limit (the batch budget, cut or refused per
--auto-truncate), its tokenizer (the file as it is, no special tokens, for /tokenize too)."""

from __future__ import annotations

from pathlib import Path

import pytest

from router import tokenization
from router.cli import max_input_length
from shared.config import ServerConfig
from shared.modelinfo import load_model_info
from tests.fixtures.static import make_static


@pytest.mark.parametrize("auto_truncate", [True, False])
def test_the_batch_budget_is_the_limit_without_a_start_up_error(
    tmp_path: Path, auto_truncate: bool
) -> None:
    """sentence-transformers has no limit for StaticEmbedding: --max-batch-tokens is ours,
    whatever --auto-truncate says (it decides only what happens to a longer input)."""
    info = load_model_info(make_static(tmp_path / "m"))
    config = ServerConfig(max_batch_tokens=777, auto_truncate=auto_truncate)
    assert max_input_length(info, config) == 777


def test_a_truncating_tokenizer_file_sets_the_limit(tmp_path: Path) -> None:
    info = load_model_info(make_static(tmp_path / "m", truncate=7))
    assert max_input_length(info, ServerConfig(max_batch_tokens=777)) == 7


def test_the_files_truncation_side_is_read(tmp_path: Path) -> None:
    """Where the file's truncation is the limit, every cut is on its side (router/cli.py)."""
    import json

    model_dir = make_static(tmp_path / "m", truncate=3)
    assert load_model_info(model_dir).truncation_side == "right"
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer["truncation"]["direction"] = "Left"
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert load_model_info(model_dir).truncation_side == "left"
    assert load_model_info(make_static(tmp_path / "n")).truncation_side is None


def test_tokenize_shows_the_ids_the_model_averages(tmp_path: Path) -> None:
    """/tokenize's add_special_tokens cannot add what StaticEmbedding never adds."""
    info = load_model_info(make_static(tmp_path / "m", truncate=3))
    tokenization._load(str(info.tokenizer_path), empty_bag_id=info.empty_bag_id)
    for add_special_tokens in (True, False):
        tokens = tokenization._tokens(["the weather is lovely", "  "], add_special_tokens).value
        assert [t.text for t in tokens[0]] == ["the", "weather", "is"]  # the file's cut
        assert not any(t.special for t in tokens[0])
        assert tokens[1] == []  # no tokens; the model gets the empty bag
    embedded = tokenization._encode(["the weather is lovely", "  "], None, "right").value
    assert list(embedded[0].ids) == [t.id for t in tokens[0]]
    assert list(embedded[1].ids) == [info.empty_bag_id]


def test_a_shorter_cut_than_the_files_is_made_on_the_requests_side(tmp_path: Path) -> None:
    """Below the file's own truncation, the router's limit (the batch budget) cuts, on the
    side the request asks for; the file's longer cut does not win."""
    info = load_model_info(make_static(tmp_path / "m", truncate=5))
    tokenization._load(str(info.tokenizer_path), empty_bag_id=info.empty_bag_id)
    whole = list(tokenization._encode(["the weather is lovely"], None, "right").value[0].ids)
    assert len(whole) == 4
    for direction, kept in (("right", whole[:2]), ("left", whole[2:])):
        cut = tokenization._encode(["the weather is lovely"], 2, direction).value[0].ids
        assert list(cut) == kept


def test_other_models_load_unchanged_after_a_static_one(tmp_path: Path) -> None:
    """The pool process's static state does not leak into the next load."""
    from tests.fixtures.tiny import make_tiny_bert

    info = load_model_info(make_static(tmp_path / "s"))
    tokenization._load(str(info.tokenizer_path), empty_bag_id=info.empty_bag_id)
    bert = load_model_info(make_tiny_bert(tmp_path / "b"))
    tokenization._load(str(bert.tokenizer_path), model_type="bert")
    ids = tokenization._encode(["hello"], None, "right").value[0].ids
    assert len(ids) == 3  # [CLS] hello [SEP]


class _Tokenizer:
    """A stand-in tokenizers.Tokenizer: records its truncation and encode calls."""

    def __init__(self, truncation: dict | None) -> None:
        self.truncation = truncation
        self.calls: list[tuple] = []

    def enable_truncation(self, *args, **kwargs) -> None:
        self.calls.append(("enable_truncation", args, kwargs))

    def no_truncation(self) -> None:
        self.calls.append(("no_truncation",))

    def encode_batch(self, texts, add_special_tokens) -> list:
        self.calls.append(("encode_batch", texts, add_special_tokens))
        return []


FILES = {"max_length": 8, "stride": 0, "strategy": "longest_first", "direction": "left"}


@pytest.mark.parametrize(("truncation", "max_length", "cut"), [
    (FILES, 8, ("enable_truncation", (), FILES)),  # the file's own, on its side
    (FILES, 9, ("enable_truncation", (), FILES)),
    (FILES, None, ("enable_truncation", (), FILES)),
    (FILES, 7, ("enable_truncation", (7,), {"direction": "right"})),
    (None, 7, ("enable_truncation", (7,), {"direction": "right"})),
    (None, None, ("no_truncation",)),
])
def test_each_encoding_is_cut_by_the_shorter_of_the_files_and_the_routers_limits(
        truncation: dict | None, max_length: int | None, cut: tuple) -> None:
    from router.static_tokens import StaticTokens

    tokenizer = _Tokenizer(truncation)
    StaticTokens(tokenizer, 50).encodings(["a", ("b", "c")], max_length, "right")
    assert tokenizer.calls == [cut, ("encode_batch", ["a", ("b", "c")], False)]


def test_an_id_past_the_table_is_refused_and_no_ids_are_the_empty_bag() -> None:
    from types import SimpleNamespace

    from router.static_tokens import StaticTokens

    tokens = StaticTokens(_Tokenizer(None), 50)
    assert tokens.bag_ids(SimpleNamespace(ids=[])).tolist() == [50]
    assert tokens.bag_ids(SimpleNamespace(ids=[3, 49])).tolist() == [3, 49]
    with pytest.raises(ValueError) as refused:
        tokens.bag_ids(SimpleNamespace(ids=[3, 50]))
    assert str(refused.value) == "token id 50 has no row in the model's 50-row embedding table"
