"""DeBERTa-v2/v3's tokenizer as transformers 5 (so sentence-transformers) runs it:
DebertaV2Tokenizer keeps tokenizer.json's pieces and rebuilds the rest from tokenizer_config.json.
Tiny Unigram tokenizers written by transformers itself, then given a tokenizer_config.json or a
tokenizer.json pipeline that disagrees with the class (as Hub files do), tokenized by the router
and by AutoTokenizer."""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors

from tests.fixtures.tokenizer_oracle import (
    Encoded,
    assert_tokenizes_as_transformers,
    edit_tokenizer,
    precompiled_charsmap,
    rebuild_changes_ids,
    router_tokens,
    write_case,
)

transformers = pytest.importorskip("transformers")

# DeBERTa-v3's order: [PAD] [CLS] [SEP] [UNK] first (score 0.0, as sentencepiece gives them),
# [MASK] after the pieces.
SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
WORDS = ["hello", "Hello", "world", "World", "the", "a", "words", "café", "cafe", "fine",
         "中文", "query", "document"]
CHARS = string.ascii_letters + string.digits + string.punctuation + "éèïü中文日本語🚀"
PIECES = ([(s, 0.0) for s in SPECIALS] + [("▁", -2.0)] + [("▁" + w, -3.0) for w in WORDS]
          + [(c, -6.0) for c in CHARS] + [("[MASK]", 0.0)])

TEXTS = [
    "Hello world", "hello World!", "  hello", "  leading spaces", "trailing spaces   ",
    "runs   of    spaces", "\ttab\tseparated\t", "new\nlines\n\n", "\r\nwindows\r\n", "x  \t  y",
    "\n", " ", "  ", "", "a", "punctuation: a,b.c!d?(e)[f]{g}", "don't stop-words...",
    "Hello,world", "Café naïve", "cafe\u0301 combining", "中文 日本語", "中文日本語",
    "emoji 🚀🚀 rocket🚀", "UPPER CASE WORDS", "ﬁne \uff28\uff45\uff4c\uff4c\uff4f (full width)",
    "\u00a0no-break\u00a0space", "\u3000ideographic", "hello[MASK]world", "[CLS] inside [SEP] text",
    "The  END. ",
]
PAIRS = [("Hello", "World"), ("  query  ", "  document text. "), ("", "x"), ("a\tb", "c\nd"),
         ("中文", "🚀 emoji"), ("UPPER", "lower[MASK]case"), (" ", "")]


def _saved(root: Path, charsmap: bytes | None = None, **kwargs: Any) -> dict[str, Any]:
    """transformers' own files for PIECES; returns its tokenizer_config.json."""
    extra = {} if charsmap is None else {"_spm_precompiled_charsmap": charsmap}
    transformers.DebertaV2Tokenizer(vocab=PIECES, **extra, **kwargs).save_pretrained(str(root))
    return json.loads((root / "tokenizer_config.json").read_text())


def _converted(tok: Tokenizer, charsmap: bytes | None, lower: bool) -> None:
    """The pipeline transformers 4's DebertaV2Converter wrote (Hub files): both ends stripped
    before the character map, prefix scheme "always", [CLS]/[SEP] by name."""
    steps = [normalizers.Lowercase()] if lower else []
    steps.append(normalizers.Strip())
    if charsmap is not None:
        steps.append(normalizers.Precompiled(charsmap))
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace()])


def _hub(root: Path, lower: bool = False) -> dict[str, Any]:
    charsmap = precompiled_charsmap()
    _saved(root, charsmap)
    edit_tokenizer(root, lambda tok: _converted(tok, charsmap, lower))
    # transformers 4 wrote neither add_prefix_space nor unk_id
    return {"do_lower_case": lower, "split_by_punct": False, "vocab_type": "spm",
            "tokenizer_class": "DebertaV2Tokenizer", "bos_token": "[CLS]", "eos_token": "[SEP]",
            "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
            "cls_token": "[CLS]", "mask_token": "[MASK]"}


def _hand_written(root: Path) -> dict[str, Any]:
    """A file whose every step differs from the class's, and a tokenizer_config.json that names
    no class (the model type's is used)."""
    cfg = _saved(root)

    def change(tok: Tokenizer) -> None:
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(prepend_scheme="never")])
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] [SEP] $B [SEP]",
            special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
        tok.decoder = decoders.WordPiece()

    edit_tokenizer(root, change)
    del cfg["tokenizer_class"]
    return cfg


def _unk_scored(root: Path) -> dict[str, Any]:
    """[UNK] with a score other than 0.0: the class does not find it by name and takes id 1
    ([CLS]) for unknown pieces, whatever the file's unk_id says (3)."""
    cfg = _saved(root)
    raw = json.loads((root / "tokenizer.json").read_text())
    raw["model"]["vocab"][3][1] = -1.0
    (root / "tokenizer.json").write_text(json.dumps(raw))
    del cfg["unk_id"]
    return cfg


def _byte_fallback(root: Path) -> dict[str, Any]:
    """A file whose Unigram falls back to byte pieces: the class builds its model without."""
    bytes_ = [(f"<0x{b:02X}>", -10.0) for b in range(256)]
    transformers.DebertaV2Tokenizer(vocab=PIECES + bytes_).save_pretrained(str(root))
    raw = json.loads((root / "tokenizer.json").read_text())
    raw["model"]["byte_fallback"] = True
    (root / "tokenizer.json").write_text(json.dumps(raw))
    return json.loads((root / "tokenizer_config.json").read_text())


def _named_specials(root: Path) -> dict[str, Any]:
    """tokenizer_config.json names other cls/sep tokens than the file's template."""
    from tokenizers import AddedToken

    cfg = _saved(root)
    edit_tokenizer(root, lambda tok: tok.add_special_tokens([AddedToken("<s>", special=True),
                                                    AddedToken("</s>", special=True)]))
    return cfg | {"cls_token": "<s>", "sep_token": "</s>", "bos_token": "<s>", "eos_token": "</s>"}


# name: (writes the files, returns tokenizer_config.json; whether the router's ids change)
CASES: dict[str, tuple[Callable[[Path], dict[str, Any]], bool]] = {
    "saved-as-is": (_saved, False),
    "do-lower-case": (lambda root: _saved(root) | {"do_lower_case": True}, True),
    "split-by-punct": (lambda root: _saved(root) | {"split_by_punct": True}, True),
    # "first": no "▁" after a special token inside the text
    "no-prefix-space": (lambda root: _saved(root) | {"add_prefix_space": False}, True),
    "all-options": (lambda root: _saved(root) | {"do_lower_case": True, "split_by_punct": True,
                                                 "add_prefix_space": False}, True),
    "saved-precompiled": (lambda root: _saved(root, precompiled_charsmap()), False),
    # a leading space is in the first token's offsets; ids as the converter's
    "hub-precompiled": (_hub, False),
    "hub-precompiled-lower": (lambda root: _hub(root, lower=True), False),
    "hub-precompiled-split-by-punct": (lambda root: _hub(root) | {"split_by_punct": True}, True),
    "hand-written": (_hand_written, True),
    "unk-scored": (_unk_scored, True),
    "byte-fallback": (_byte_fallback, True),
    "named-specials": (_named_specials, True),
}


def _write(root: Path, name: str) -> Path:
    return write_case(root, CASES[name][0], "deberta-v2")


def _ours(root: Path) -> tuple[list[Encoded], list[str]]:
    return router_tokens(root, "deberta-v2", TEXTS, PAIRS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_ids_type_ids_offsets_and_decode_equal_transformers(tmp_path: Path, name: str) -> None:
    root = _write(tmp_path, name)
    assert_tokenizes_as_transformers(root, "deberta-v2", "DebertaV2Tokenizer", TEXTS, PAIRS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_only_a_disagreement_changes_ids(tmp_path: Path, name: str) -> None:
    """The cases above test the rebuild: where marked, tokenizer.json alone gives other ids."""
    root = _write(tmp_path, name)
    assert rebuild_changes_ids(root, "deberta-v2", TEXTS, PAIRS) is CASES[name][1]


def test_hub_files_keep_a_leading_space_in_the_first_offsets(tmp_path: Path) -> None:
    """The converter's Strip dropped it; the class keeps one (same ids)."""
    root = _write(tmp_path, "hub-precompiled")
    plain = Tokenizer.from_file(str(root / "tokenizer.json")).encode("  hello")
    ids, _, offsets = _ours(root)[0][TEXTS.index("  hello")]
    assert (plain.ids, plain.offsets[1]) == (ids, (2, 7))
    assert offsets[1] == (1, 7)


def test_the_model_type_names_the_class() -> None:
    from transformers.models.auto import tokenization_auto as auto

    from router.tokenizer_config import tokenizer_class

    assert auto.TOKENIZER_MAPPING_NAMES["deberta-v2"] == "DebertaV2Tokenizer"
    assert "deberta-v2" not in auto.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS
    assert tokenizer_class({}, "deberta-v2") == "DebertaV2Tokenizer"
