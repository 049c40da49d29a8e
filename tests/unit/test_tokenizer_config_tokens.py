"""tokenizer_config.json's say over tokenizer.json's added tokens, as transformers 5 (so
sentence-transformers) applies it: ids, type ids, offsets and /decode against AutoTokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors

from tests.fixtures.tokenizer_oracle import assert_tokenizes_as_transformers, write_case

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["x", "y", "[", "]", "<", ">", "new", "extra", "mask"]
BERT = {"tokenizer_class": "BertTokenizer", "unk_token": "[UNK]", "sep_token": "[SEP]",
        "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
TEXTS = ["x [NEW] y", "x<extra>y", "<extra>", "[NEW]", "x [MASK] y", "x y"]
PAIRS = [("x [NEW]", "<extra> y"), ("[MASK]", "y")]


def _added(index: int, content: str, special: bool) -> dict[str, Any]:
    return {str(index): {"content": content, "lstrip": False, "normalized": not special,
                         "rstrip": False, "single_word": False, "special": special}}


def _wordpiece(root: Path, added: list[str] = SPECIALS) -> Tokenizer:
    vocab = {t: i for i, t in enumerate([*SPECIALS, *WORDS])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    tok.save(str(root / "tokenizer.json"))
    return tok


@pytest.mark.parametrize("class_name", ["BertTokenizer", "PreTrainedTokenizerFast"])
def test_added_tokens_decoder_tokens_missing_from_tokenizer_json(tmp_path: Path,
                                                                 class_name: str) -> None:
    """Tokens that tokenizer_config.json's added_tokens_decoder holds and tokenizer.json does
    not are added, as transformers adds them (a special one and a normal one, at ids past the
    vocabulary), whatever the class."""
    pytest.importorskip("transformers")
    size = len(SPECIALS) + len(WORDS)

    def write(root: Path) -> dict[str, Any]:
        _wordpiece(root)
        decoder = {k: v for i, t in enumerate(SPECIALS) for k, v in _added(i, t, True).items()}
        decoder |= _added(size, "[NEW]", True) | _added(size + 1, "<extra>", False)
        return BERT | {"do_lower_case": True, "added_tokens_decoder": decoder,
                       "tokenizer_class": class_name}

    root = write_case(tmp_path / "m", write, "bert")
    expected = "TokenizersBackend" if class_name == "PreTrainedTokenizerFast" else class_name
    assert_tokenizes_as_transformers(root, "bert", expected, TEXTS, PAIRS)


@pytest.mark.parametrize("class_name", ["BertTokenizer", "PreTrainedTokenizerFast"])
def test_split_special_tokens_tokenizes_them_as_text(tmp_path: Path, class_name: str) -> None:
    """tokenizer_config.json's split_special_tokens: "[MASK]" in a text is "[", "mask", "]" for
    transformers, not the mask token; [CLS] and [SEP] are still added."""
    pytest.importorskip("transformers")

    def write(root: Path) -> dict[str, Any]:
        _wordpiece(root)
        return BERT | {"do_lower_case": True, "split_special_tokens": True,
                       "tokenizer_class": class_name}

    root = write_case(tmp_path / "m", write, "bert")
    expected = "TokenizersBackend" if class_name == "PreTrainedTokenizerFast" else class_name
    assert_tokenizes_as_transformers(root, "bert", expected, TEXTS, PAIRS)


def test_special_tokens_map_names_the_template_tokens(tmp_path: Path) -> None:
    """A tokenizer_config.json without added_tokens_decoder (transformers 4's files): the
    cls_token / sep_token of special_tokens_map.json, not tokenizer_config.json's, close the
    texts, as transformers reads them."""
    pytest.importorskip("transformers")

    def write(root: Path) -> dict[str, Any]:
        _wordpiece(root)
        (root / "special_tokens_map.json").write_text(json.dumps(
            {"cls_token": "[PAD]", "sep_token": {"content": "[MASK]", "lstrip": False,
                                                  "normalized": False, "rstrip": False,
                                                  "single_word": False}}))
        return BERT | {"do_lower_case": True}

    root = write_case(tmp_path / "m", write, "bert")
    assert_tokenizes_as_transformers(root, "bert", "BertTokenizer", ["x y", "y"], [("x", "y")])


def test_named_special_tokens_missing_from_tokenizer_json_are_added(tmp_path: Path) -> None:
    """A named special token (the class's default "[MASK]", tokenizer_config.json's mask_token,
    an additional special token) that tokenizer.json's added tokens lack is matched whole,
    as transformers adds it, "[NEW]" at the next free id."""
    pytest.importorskip("transformers")

    def write(root: Path) -> dict[str, Any]:
        _wordpiece(root, added=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
        return {"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                "pad_token": "[PAD]", "additional_special_tokens": ["<extra>", "[NEW]"]}

    root = write_case(tmp_path / "m", write, "bert")
    assert_tokenizes_as_transformers(root, "bert", "BertTokenizer", TEXTS, PAIRS)


@pytest.mark.parametrize("named", [{}, {"cls_token": "[CLS]", "sep_token": "[SEP]"}])
def test_mpnet_closes_texts_with_its_named_tokens(tmp_path: Path, named: dict[str, str]) -> None:
    """MPNetTokenizer's template is <s> A </s> / <s> A </s></s> B </s> of its cls_token and
    sep_token (the class's <s> and </s> when none is named), whatever the file's post-processor
    holds."""
    pytest.importorskip("transformers")

    def write(root: Path) -> dict[str, Any]:
        _wordpiece(root, added=[*SPECIALS, "<s>", "</s>"])
        return {"tokenizer_class": "MPNetTokenizer", "unk_token": "[UNK]", **named}

    root = write_case(tmp_path / "m", write, "mpnet")
    assert_tokenizes_as_transformers(root, "mpnet", "MPNetTokenizer", TEXTS, PAIRS)


def test_a_token_past_the_models_embeddings_is_not_added(tmp_path: Path) -> None:
    """A token that would take an id the model has no embedding row for stays unmatched (its
    pieces are what the model can read), where the rows hold it, it is added."""
    from router import tokenization

    size = len(SPECIALS) + len(WORDS)

    def write(root: Path) -> dict[str, Any]:
        _wordpiece(root)
        return BERT | {"do_lower_case": True, "additional_special_tokens": ["[NEW]"]}

    for rows, whole in ((size, False), (size + 8, True)):
        root = write_case(tmp_path / str(rows), write, "bert")
        (root / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": rows}))
        before = tokenization._tokenizer
        try:
            tokenization._load(str(root / "tokenizer.json"))
            [encoded] = tokenization._encode(["x [NEW] y"], None, "right").value
        finally:
            tokenization._tokenizer = before
        assert max(encoded.ids) < rows
        assert (size in encoded.ids.tolist()) == whole
