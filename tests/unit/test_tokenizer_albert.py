"""ALBERT's tokenizer as transformers 5 (so sentence-transformers) runs it: AlbertTokenizer keeps
tokenizer.json's pieces and sentencepiece character map and rebuilds the rest from
tokenizer_config.json (do_lower_case, keep_accents, add_prefix_space; cls/sep only where the file
has no post-processor: the file's is kept). Tiny Unigram tokenizers written by transformers
itself, then given the pipeline Hub files hold or settings the class reads, tokenized by the
router and by AutoTokenizer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors

from shared.tokenizer_class import special_tokens
from tests.fixtures.albert import write_albert_tokenizer
from tests.fixtures.tokenizer_oracle import (
    assert_tokenizes_as_transformers,
    edit_tokenizer,
    precompiled_charsmap,
    rebuild_changes_ids,
    write_case,
)

transformers = pytest.importorskip("transformers")

TEXTS = [
    "hello world", "Hello World", "  hello", "trailing spaces   ", "runs   of    spaces",
    "\ttab\tseparated\t", "new\nlines\n\n", " ", "", "a", "Café naïve façade",
    "``quoted'' text", "\uff28\uff45\uff4c\uff4c\uff4f full width", "[CLS] inside [SEP]",
    "unknown 中文 🚀", "The  END. ", "zero\u200bwidth\x7fcontrol",
    # Full-width quotes become `` and '' only in the character map, after the class's Replace.
    "\uff40\uff40wide quotes\uff07\uff07",
    # A text's own "▁": without a prefix space, only the class's decoder keeps its space.
    "\u2581already marked",
]
PAIRS = [("hello", "world"), ("  Query  ", "  document text. "), ("", "x"), ("a\tb", "c\nd")]


def _saved(root: Path, **kwargs: Any) -> dict[str, Any]:
    write_albert_tokenizer(root, **kwargs)
    return json.loads((root / "tokenizer_config.json").read_text())


def _hub(root: Path) -> dict[str, Any]:
    """albert-base-v2's tokenizer.json pipeline (transformers 4's converter): the same steps,
    then runs of spaces collapsed, and Metaspace without a whitespace split; its
    tokenizer_config.json names the settings."""
    _saved(root, _spm_precompiled_charsmap=precompiled_charsmap())

    def change(tok: Tokenizer) -> None:
        steps = list(tok.normalizer)  # type: ignore[call-overload]
        tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(Regex(" {2,}"), " ")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")

    edit_tokenizer(root, change)
    return {"do_lower_case": True, "keep_accents": False, "remove_space": True,
            "tokenizer_class": "AlbertTokenizer", "unk_token": "<unk>", "pad_token": "<pad>",
            "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]",
            "bos_token": "[CLS]", "eos_token": "[SEP]"}


def _model_settings(root: Path, byte_fallback: bool = True) -> dict[str, Any]:
    """unk_id 4 (and byte fallback) in the file: the class takes id 1 and no fallback."""
    cfg = _saved(root)
    raw = json.loads((root / "tokenizer.json").read_text())
    raw["model"]["unk_id"], raw["model"]["byte_fallback"] = 4, byte_fallback
    (root / "tokenizer.json").write_text(json.dumps(raw))
    return cfg


def _file_post_processor(root: Path) -> dict[str, Any]:
    """The file's own post-processor ([SEP] only) beside a cls_token of another name: the class
    keeps the file's (transformers passes it over the class's template)."""
    cfg = _saved(root)

    def change(tok: Tokenizer) -> None:
        tok.post_processor = processors.TemplateProcessing(
            single="$A:0 [SEP]:0", pair="$A:0 [SEP]:0 $B:1 [SEP]:1", special_tokens=[("[SEP]", 3)])

    edit_tokenizer(root, change)
    return cfg | {"cls_token": "[MASK]"}


def _no_post_processor(root: Path) -> dict[str, Any]:
    """None in the file: the class's template, of tokenizer_config.json's cls_token."""
    cfg = _saved(root)
    raw = json.loads((root / "tokenizer.json").read_text())
    raw["post_processor"] = None
    (root / "tokenizer.json").write_text(json.dumps(raw))
    return cfg | {"cls_token": "[MASK]"}


# name: (writes the files, returns tokenizer_config.json; whether the router's ids change)
CASES: dict[str, tuple[Callable[[Path], dict[str, Any]], bool]] = {
    "saved-as-is": (_saved, False),
    "saved-precompiled": (lambda root: _saved(
        root, _spm_precompiled_charsmap=precompiled_charsmap()), False),
    "hub-converted": (_hub, True),
    "cased": (lambda root: _saved(root) | {"do_lower_case": False}, True),
    # do_lower_case absent: the class lower-cases
    "lower-by-default": (lambda root: {k: v for k, v in _saved(root).items()
                                       if k != "do_lower_case"}, False),
    "keep-accents": (lambda root: _saved(root) | {"keep_accents": True}, True),
    "no-prefix-space": (lambda root: _saved(root) | {"add_prefix_space": False}, True),
    "model-settings": (_model_settings, True),
    "unk-id-alone": (lambda root: _model_settings(root, byte_fallback=False), True),
    # keep_accents absent: the class strips accents
    "strip-accents-by-default": (lambda root: {k: v for k, v in _saved(root).items()
                                               if k != "keep_accents"}, False),
    "file-post-processor": (_file_post_processor, False),
    "no-post-processor": (_no_post_processor, True),
}


def _write(root: Path, name: str) -> Path:
    return write_case(root, CASES[name][0], "albert")


@pytest.mark.parametrize("name", sorted(CASES))
def test_ids_type_ids_offsets_and_decode_equal_transformers(tmp_path: Path, name: str) -> None:
    root = _write(tmp_path, name)
    assert_tokenizes_as_transformers(root, "albert", "AlbertTokenizer", TEXTS, PAIRS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_only_a_disagreement_changes_ids(tmp_path: Path, name: str) -> None:
    """The cases above test the rebuild: where marked, tokenizer.json alone gives other ids."""
    root = _write(tmp_path, name)
    assert rebuild_changes_ids(root, "albert", TEXTS, PAIRS) is CASES[name][1]


def test_named_special_tokens_are_the_classs(tmp_path: Path) -> None:
    """A tokenizer_config.json that names none: AlbertTokenizer's defaults."""
    root = _write(tmp_path, "saved-as-is")
    cfg = json.loads((root / "tokenizer_config.json").read_text())
    names = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
             "mask_token")
    for key in names:
        cfg.pop(key, None)
    (root / "tokenizer_config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoTokenizer.from_pretrained(str(root))
    named = special_tokens(root, "albert")
    assert {key: named[key] for key in names} == {key: getattr(hf, key) for key in names}
