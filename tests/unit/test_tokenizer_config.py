"""tokenizer_config.json's say over tokenizer.json, as transformers 5 (so sentence-transformers)
applies it: tiny tokenizers whose two files disagree, tokenized by the router and by
AutoTokenizer."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from router import tokenization

TEXTS = ["Hello World", "Héllo Café 中文", "  two  words \n", "hello"]
WORDS = ["hello", "world", "Hello", "World", "two", "words", "café", "cafe", "Café", "héllo",
         "Héllo", "中", "文", "中文"]
FAIRSEQ = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def _wordpiece(lowercase: bool) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def _wordpiece_edited(post_processor: bool, pre_tokenizer: bool) -> Tokenizer:
    """A cased WordPiece file whose own post-processor adds [SEP] only, or that has no
    pre-tokenizer: BertTokenizer sets its own over both."""
    tok = _wordpiece(False)
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="$A [SEP]", pair="$A [SEP] $B:1 [SEP]:1", special_tokens=[("[SEP]", 3)])
    if pre_tokenizer:
        tok.pre_tokenizer = None  # type: ignore[assignment]
    return tok


def _byte_level(prefix: bool) -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate([*FAIRSEQ, *sorted(alphabet), "Ġh", "He"])}
    tok = Tokenizer(models.BPE(vocab, [("Ġ", "h"), ("H", "e")], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return tok


def _metaspace(sentencepiece: bool) -> Tokenizer:
    pieces = ["▁", "▁Hello", "▁World", "▁two", "▁words", "▁hello", *"HeloWrdtwsCaféhl中文"]
    if sentencepiece:  # XLM-R: Unigram, Precompiled-like normalizer, Metaspace pre-tokenizer
        tok = Tokenizer(models.Unigram([(t, 0.0) for t in FAIRSEQ] + [(p, -1.0) for p in pieces],
                                       unk_id=3))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(),
                                               normalizers.Replace(" ", " ")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", 0), ("</s>", 2)])
    else:  # Llama 2: BPE, Prepend + Replace normalizer
        # (a real file holds all 256 <0x..> bytes: none is ever unknown)
        vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<0x0A>", *pieces])}
        tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", fuse_unk=True, byte_fallback=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


def _qwen(prefix: bool) -> Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(["<|endoftext|>", *alphabet])}, []))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", "merged_with_next"),
        pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=False)])
    return tok


BERT = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]"}
FS = dict(zip(["bos_token", "pad_token", "eos_token", "unk_token", "mask_token"], FAIRSEQ,
              strict=True)) | {"sep_token": "</s>", "cls_token": "<s>"}
# name: (model_type, tokenizer.json, tokenizer_config.json, whether the router's ids change)
CASES: dict[str, tuple[str, Tokenizer, dict[str, Any], bool]] = {
    # do_lower_case defaults to True: a cased tokenizer.json is lower-cased
    "bert-no-do-lower-case": ("bert", _wordpiece(False), {"tokenizer_class": "BertTokenizer"}
                              | BERT, True),
    "bert-do-lower-case-false": ("bert", _wordpiece(True), {"do_lower_case": False} | BERT, True),
    "bert-agree": ("bert", _wordpiece(False), {"do_lower_case": False} | BERT, False),
    "bert-chinese-chars": ("bert", _wordpiece(True), {"tokenize_chinese_chars": False} | BERT,
                           True),
    # a null class is the model type's (transformers saves null for some models)
    "bert-class-null": ("bert", _wordpiece(False), {"tokenizer_class": None} | BERT, True),
    # lower-cased, accents kept
    "bert-strip-accents-false": ("bert", _wordpiece(True), {"strip_accents": False} | BERT, True),
    "distilbert": ("distilbert", _wordpiece(False), {"tokenizer_class": "DistilBertTokenizerFast"}
                   | BERT, True),
    # BertTokenizer's [CLS] / [SEP] template and BertPreTokenizer over the file's
    "bert-file-post-processor": ("bert", _wordpiece_edited(True, False),
                                 {"do_lower_case": False} | BERT, True),
    "electra-file-post-processor": ("electra", _wordpiece_edited(True, False),
                                    {"do_lower_case": False, "tokenizer_class": "ElectraTokenizer"}
                                    | BERT, True),
    "distilbert-no-pre-tokenizer": ("distilbert", _wordpiece_edited(False, True),
                                    {"do_lower_case": False} | BERT, True),
    "nomic-bert": ("nomic_bert", _wordpiece(False), {"tokenizer_class": "BertTokenizer"} | BERT,
                   True),
    "generic-backend": ("bert", _wordpiece(False), {"tokenizer_class": "PreTrainedTokenizerFast"}
                        | BERT, False),
    "roberta-add-prefix-space": ("roberta", _byte_level(False), {"add_prefix_space": True} | FS,
                                 True),
    "roberta-trim-offsets": ("roberta", _byte_level(False), {"trim_offsets": False} | FS, False),
    # special tokens as AddedToken objects, as transformers saves them
    "roberta-added-token-dicts": ("roberta", _byte_level(False), {"trim_offsets": False} | {
        key: {"__type": "AddedToken", "content": value, "lstrip": False, "normalized": True,
              "rstrip": False, "single_word": False, "special": True}
        for key, value in FS.items()}, False),
    # a trailing whitespace gives no "▁" token of its own
    "xlm-roberta": ("xlm-roberta", _metaspace(True), {"tokenizer_class": "XLMRobertaTokenizer"}
                    | FS, True),
    # no extra "▁" before a text that starts with a space
    "llama": ("llama", _metaspace(False), {"tokenizer_class": "LlamaTokenizer", "legacy": False,
                                           "bos_token": "<s>", "eos_token": "</s>"}, True),
    # transformers registers no class for llama: without one named, the file as it is
    "llama-no-class": ("llama", _metaspace(False), {"legacy": False, "bos_token": "<s>",
                                                    "eos_token": "</s>"}, False),
    "mistral-as-is": ("mistral", _metaspace(False), {"tokenizer_class": "LlamaTokenizer",
                                                     "bos_token": "<s>"}, False),
    "qwen3-add-prefix-space": ("qwen3", _qwen(False), {
        "tokenizer_class": "Qwen2Tokenizer", "add_prefix_space": True,
        "eos_token": "<|endoftext|>", "bos_token": None}, True),
    # qwen2's named class is overridden by the registered one
    "qwen2-named-class-ignored": ("qwen2", _qwen(False), {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_prefix_space": True,
        "eos_token": "<|endoftext|>", "bos_token": None}, True),
    # transformers' own gte type registers XLM-R's class
    "gte-no-class": ("gte", _metaspace(True), FS, True),
    # config.json's tokenizer_class when tokenizer_config.json names none
    "llama-class-in-config": ("llama", _metaspace(False), {"legacy": False, "bos_token": "<s>",
                                                           "eos_token": "</s>"}, True),
    "bert-generic-class-in-config": ("bert", _wordpiece(False), BERT, False),
    "bert-tokenizer-config-class-first": ("bert", _wordpiece(False),
                                          {"tokenizer_class": "BertTokenizer"} | BERT, True),
}
# config.json's tokenizer_class, where a case has one
CONFIG_CLASS = {"llama-class-in-config": "LlamaTokenizer",
                "bert-generic-class-in-config": "PreTrainedTokenizerFast",
                "bert-tokenizer-config-class-first": "PreTrainedTokenizerFast"}


def _write(root: Path, name: str) -> Path:
    model_type, tok, tok_config, _ = CASES[name]
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps(tok_config))
    config = {"model_type": model_type}
    if name in CONFIG_CLASS:
        config["tokenizer_class"] = CONFIG_CLASS[name]
    (root / "config.json").write_text(json.dumps(config))
    return root


def _ours(root: Path, model_type: str, lowercase: bool = False) -> list[tuple[list, list]]:
    before = tokenization._tokenizer
    try:
        tokenization._load(str(root / "tokenizer.json"), lowercase, model_type)
        tok = tokenization._tokenizer
        assert tok is not None
        pairs = [tok.encode(text) for text in TEXTS] + [tok.encode("Hello", "World")]
        return [(e.ids, e.offsets) for e in pairs]
    finally:
        tokenization._tokenizer = before


@pytest.mark.parametrize("name", sorted(CASES))
def test_ids_and_offsets_equal_transformers(tmp_path: Path, name: str) -> None:
    transformers = pytest.importorskip("transformers")
    root = _write(tmp_path, name)
    hf = transformers.AutoTokenizer.from_pretrained(str(root))
    expected = []
    for args in [*([t] for t in TEXTS), ["Hello", "World"]]:
        enc = hf(*args, return_offsets_mapping=True)
        expected.append((enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]))
    assert _ours(root, CASES[name][0]) == expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_only_a_disagreement_changes_ids(tmp_path: Path, name: str) -> None:
    model_type, tok, _, changes = CASES[name]
    tok.no_padding()
    plain = [tok.encode(t).ids for t in TEXTS] + [tok.encode("Hello", "World").ids]
    ids = [ids for ids, _ in _ours(_write(tmp_path, name), model_type)]
    assert (ids != plain) is changes


def test_cased_bert_without_do_lower_case_is_lower_cased(tmp_path: Path) -> None:
    ids = _ours(_write(tmp_path, "bert-no-do-lower-case"), "bert")[0][0]
    assert ids == [2, 5 + WORDS.index("hello"), 5 + WORDS.index("world"), 3]


def test_sentence_bert_lowercase_still_applies(tmp_path: Path) -> None:
    """sentence_bert_config.json's do_lower_case on top of a cased BertNormalizer."""
    root = _write(tmp_path, "bert-agree")
    assert _ours(root, "bert")[0][0] == [2, 5 + WORDS.index("Hello"), 5 + WORDS.index("World"), 3]
    assert _ours(root, "bert", lowercase=True)[0][0] == [
        2, 5 + WORDS.index("hello"), 5 + WORDS.index("world"), 3]


@pytest.mark.parametrize(("name", "logged"), [("bert-no-do-lower-case", True),
                                              ("bert-agree", False)])
def test_override_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                 name: str, logged: bool) -> None:
    import asyncio

    root = _write(tmp_path, name)
    pool = tokenization.TokenizerPool(str(root / "tokenizer.json"), 1, model_type="bert")
    before = tokenization._tokenizer
    try:
        with caplog.at_level(logging.INFO, logger="router.tokenization"):
            asyncio.run(pool.start())
    finally:
        tokenization._tokenizer = before
        pool._executor.shutdown(cancel_futures=True)
    lines = [r.getMessage() for r in caplog.records if "tokenizer_config.json" in r.getMessage()]
    assert len(lines) == (1 if logged else 0), lines


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff"])
def test_an_unreadable_tokenizer_config_is_a_start_up_error_naming_it(
        tmp_path: Path, content: bytes) -> None:
    from shared.errors import ConfigError

    root = _write(tmp_path, "bert-agree")
    (root / "tokenizer_config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=r"tokenizer_config\.json"):
        _ours(root, "bert")


@pytest.mark.parametrize("legacy", [True, False])
def test_llama_legacy_decides_the_marker_after_a_special_token(tmp_path: Path,
                                                               legacy: bool) -> None:
    """legacy: a "▁" also starts the text after a special token (prepend_scheme "always")."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import AddedToken

    tok = _metaspace(False)
    tok.add_special_tokens([AddedToken("</s>", special=True)])
    tmp_path.mkdir(exist_ok=True)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": legacy, "bos_token": "<s>",
        "eos_token": "</s>"}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    before = tokenization._tokenizer
    try:
        tokenization._load(str(tmp_path / "tokenizer.json"), False, "llama")
        tok = tokenization._tokenizer
        assert tok is not None
        assert tok.encode("Hello</s>World").ids == hf("Hello</s>World")["input_ids"]
    finally:
        tokenization._tokenizer = before


def test_the_class_tables_agree_with_transformers_for_every_model_type_served() -> None:
    """For each model type we serve: tokenizer.json as it is where transformers registers a
    generic class, else the class it registers by default where we rebuild that class (Gemma's
    template equals real files: none is kept), and the named class overridden where it overrides
    it (transformers 5.25's tables; types we do not serve never reach a tokenizer)."""
    pytest.importorskip("transformers")
    from transformers.models.auto import tokenization_auto as auto

    import backend_worker.models  # noqa: F401 (registers the families)
    from backend_worker.models.registry import _BY_MODEL_TYPE
    from router.tokenizer_config import _REBUILDS
    from shared.tokenizer_class import _DEFAULT_CLASS, _FILE_AS_IS, _NAMED_CLASS_IGNORED

    generic = {"TokenizersBackend", "PreTrainedTokenizerFast", "PythonBackend",
               "MistralCommonBackend"}
    for model_type in _BY_MODEL_TYPE:
        registered = auto.TOKENIZER_MAPPING_NAMES.get(model_type)
        assert (model_type in _FILE_AS_IS) == (registered in generic), model_type
        if registered in _REBUILDS:
            assert _DEFAULT_CLASS.get(model_type) == registered, model_type
        if registered not in generic:
            assert (model_type in _NAMED_CLASS_IGNORED) == (
                registered is not None
                and model_type in auto.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), model_type


@pytest.mark.parametrize(("names", "typed"), [
    (None, True), (["input_ids", "token_type_ids", "attention_mask"], True),
    (["input_ids", "attention_mask"], False)])
def test_model_input_names_without_token_types_send_type_0(
        tmp_path: Path, names: list[str] | None, typed: bool) -> None:
    """transformers returns no token_type_ids where model_input_names leaves them out (so the
    model sees type 0, pairs included); a file that lists them, or says nothing, keeps the
    post-processor's types."""
    root = _write(tmp_path, "bert-agree")
    if names is not None:
        config = json.loads((root / "tokenizer_config.json").read_text())
        (root / "tokenizer_config.json").write_text(
            json.dumps(config | {"model_input_names": names}))
    before = tokenization._tokenizer, tokenization._typed
    try:
        tokenization._load(str(root / "tokenizer.json"), False, "bert")
        outcome = tokenization._encode(["Hello", ("Hello", "World two")], None, "right")
    finally:
        tokenization._tokenizer, tokenization._typed = before
    single, pair = outcome.value
    assert single.type_ids.tolist() == [0, 0, 0]
    assert pair.type_ids.tolist() == [0, 0, 0] + ([1, 1, 1] if typed else [0, 0, 0])
    assert pair.type_ids.dtype == np.int32


@pytest.mark.parametrize("side", ["left", "right", None])
def test_a_left_truncation_side_is_warned_of(tmp_path: Path, side: str | None) -> None:
    from sentence_transformers import SentenceTransformer

    from router.cli import left_truncation_note
    from tests.fixtures.tiny import make_tiny_bert

    root = make_tiny_bert(tmp_path / "m", max_seq_length=8)
    path = root / "tokenizer_config.json"
    if side is not None:
        path.write_text(json.dumps(json.loads(path.read_text()) | {"truncation_side": side}))
    # The premise: sentence-transformers follows the file (a left side keeps the text's end).
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    ids = SentenceTransformer(str(root), device="cpu").tokenize([text])["input_ids"][0].tolist()
    whole = Tokenizer.from_file(str(root / "tokenizer.json")).encode(text).ids
    assert ids[1:-1] == (whole[-7:-1] if side == "left" else whole[1:7])
    note = left_truncation_note(root)
    assert (note is not None) == (side == "left")
    if note is not None:
        assert "truncation_side" in note and "truncation_direction" in note


def test_qwen2_class_splits_and_normalizes_as_its_template(tmp_path: Path) -> None:
    """Qwen2Tokenizer takes only the vocabulary and merges from tokenizer.json: its normalizer
    is NFC and its pre-tokenizer Qwen's Split then bytes, whatever the file holds. A file with
    GPT-2's byte-level split (digits grouped, so "12" merges) and no normalizer ("e" + U+0301
    stays two characters) tokenizes otherwise alone."""
    transformers = pytest.importorskip("transformers")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", *alphabet, "12", "Ã©"])}
    tok = Tokenizer(models.BPE(vocab, [("1", "2"), ("Ã", "©")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>", "bos_token": None}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    texts = ["price 12 caf\u00e9", "cafe\u0301 1234"]
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    expected = [hf(text)["input_ids"] for text in texts]
    before = tokenization._tokenizer
    try:
        tokenization._load(str(tmp_path / "tokenizer.json"), False, "qwen3")
        assert tokenization._tokenizer is not None
        ours = [tokenization._tokenizer.encode(text).ids for text in texts]
    finally:
        tokenization._tokenizer = before
    assert ours == expected
    assert [tok.encode(text).ids for text in texts] != expected  # what the rebuild changes
