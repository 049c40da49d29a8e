"""T5's tokenizer as transformers 5 (so sentence-transformers) runs it: T5Tokenizer keeps
tokenizer.json's pieces and sentencepiece character map and rebuilds the rest. Tiny Unigram
tokenizers written by transformers itself, then given the pipeline older Hub files hold (no
whitespace split: a run of spaces gives "▁" pieces) or settings the class overrides, tokenized
by the router and by AutoTokenizer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors

from shared.tokenizer_class import special_tokens, tokenizer_class
from tests.fixtures.t5 import write_t5_tokenizer
from tests.fixtures.tokenizer_oracle import (
    assert_tokenizes_as_transformers,
    edit_tokenizer,
    precompiled_charsmap,
    rebuild_changes_ids,
    router_tokens,
    transformers_tokens,
    write_case,
)

transformers = pytest.importorskip("transformers")

TEXTS = [
    "hello world", "  hello", "trailing spaces   ", "runs   of    spaces", "\ttab\tseparated\t",
    "new\nlines\n\n", "x  \t  y", "\n", " ", "", "a", "Cafe\u0301 and café",
    "\uff28\uff45\uff4c\uff4c\uff4f full width", "\u00a0no-break\u00a0space", "</s> inside",
    "<extra_id_0> sentinel", "unknown 中文 🚀", "The  END. ",
]
PAIRS = [("hello", "world"), ("  query  ", "  document text. "), ("", "x"), ("a\tb", "c\nd")]


def _saved(root: Path, **kwargs: Any) -> dict[str, Any]:
    write_t5_tokenizer(root, **kwargs)
    return json.loads((root / "tokenizer_config.json").read_text())


def _hub(root: Path) -> dict[str, Any]:
    """The pipeline of t5-base's and GTR's tokenizer.json (transformers 4's converter): the
    character map then runs of spaces to "▁", and Metaspace without a whitespace split."""
    cfg = _saved(root)

    def change(tok: Tokenizer) -> None:
        tok.normalizer = normalizers.Sequence([
            normalizers.Precompiled(precompiled_charsmap()),
            normalizers.Replace(Regex(" {2,}"), "▁")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")

    edit_tokenizer(root, change)
    return cfg


def _model_settings(root: Path, unk_id: int = 5, byte_fallback: bool = True) -> dict[str, Any]:
    """unk_id 5 and / or byte fallback in the file, and the <0x..> byte pieces a fallback
    needs: the class takes id 2 and no fallback."""
    cfg = _saved(root)
    raw = json.loads((root / "tokenizer.json").read_text())
    raw["model"]["unk_id"], raw["model"]["byte_fallback"] = unk_id, byte_fallback
    raw["model"]["vocab"] += [[f"<0x{byte:02X}>", -20.0] for byte in range(256)]
    (root / "tokenizer.json").write_text(json.dumps(raw))
    return cfg


def _other_template(root: Path) -> dict[str, Any]:
    """A post-processor that closes with <pad> and a decoder that keeps the leading space: the
    class's template closes with eos_token, its decoder drops that space."""
    cfg = _saved(root)

    def change(tok: Tokenizer) -> None:
        tok.post_processor = processors.TemplateProcessing(
            single="$A <pad>", pair="$A <pad> $B:1 <pad>:1", special_tokens=[("<pad>", 0)])
        tok.decoder = decoders.Metaspace(prepend_scheme="never")

    edit_tokenizer(root, change)
    return cfg


# name: (writes the files, returns tokenizer_config.json; whether the router's ids change)
CASES: dict[str, tuple[Callable[[Path], dict[str, Any]], bool]] = {
    "saved-as-is": (_saved, False),
    "saved-precompiled": (lambda root: _saved(
        root, _spm_precompiled_charsmap=precompiled_charsmap()), False),
    "hub-converted": (_hub, True),
    # the class always marks the text's start
    "no-prefix-space-ignored": (lambda root: _saved(root) | {"add_prefix_space": False}, False),
    "model-settings": (_model_settings, True),
    "unk-id-alone": (lambda root: _model_settings(root, byte_fallback=False), True),
    "byte-fallback-alone": (lambda root: _model_settings(root, unk_id=2), True),
    "other-template": (_other_template, True),
    "eos-named-differently": (lambda root: _saved(root) | {"eos_token": "<unk>"}, True),
    # transformers adds it as a new special token, whose id closes every text
    "eos-not-in-vocabulary": (lambda root: _saved(root) | {"eos_token": "<eos>"}, True),
}


def _write(root: Path, name: str, model_type: str = "t5") -> Path:
    return write_case(root, CASES[name][0], model_type)


@pytest.mark.parametrize("name", sorted(CASES))
def test_ids_type_ids_offsets_and_decode_equal_transformers(tmp_path: Path, name: str) -> None:
    root = _write(tmp_path, name)
    assert_tokenizes_as_transformers(root, "t5", "T5Tokenizer", TEXTS, PAIRS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_only_a_disagreement_changes_ids(tmp_path: Path, name: str) -> None:
    """The cases above test the rebuild: where marked, tokenizer.json alone gives other ids."""
    root = _write(tmp_path, name)
    assert rebuild_changes_ids(root, "t5", TEXTS, PAIRS) is CASES[name][1]


@pytest.mark.parametrize("model_type", ["t5", "mt5"])
def test_files_without_a_class_name_are_t5_tokenizers(tmp_path: Path, model_type: str) -> None:
    """T5Tokenizer is registered for t5 and mt5: a tokenizer_config.json naming no class gets
    its rebuild, and its named special tokens."""
    from transformers.models.auto import tokenization_auto as auto

    root = _write(tmp_path, "hub-converted", model_type=model_type)
    cfg = json.loads((root / "tokenizer_config.json").read_text())
    del cfg["tokenizer_class"], cfg["eos_token"], cfg["unk_token"], cfg["pad_token"]
    (root / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert auto.TOKENIZER_MAPPING_NAMES[model_type] == "T5Tokenizer"
    assert tokenizer_class(cfg, model_type) == "T5Tokenizer"
    expected, _ = transformers_tokens(root, "T5Tokenizer", TEXTS, PAIRS)
    assert router_tokens(root, model_type, TEXTS, PAIRS)[0] == expected
    named = special_tokens(root, model_type)
    hf = transformers.AutoTokenizer.from_pretrained(str(root))
    assert {key: named[key] for key in ("eos_token", "unk_token", "pad_token")} == {
        "eos_token": hf.eos_token, "unk_token": hf.unk_token, "pad_token": hf.pad_token}
