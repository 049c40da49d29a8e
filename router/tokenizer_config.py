"""tokenizer.json as transformers 5 (so sentence-transformers) actually runs it.

transformers' AutoTokenizer does not take tokenizer.json as it is: for most tokenizer classes
it keeps only the vocabulary (and merges) and rebuilds the normalizer and pre-tokenizer from
the class's own template, filled in from tokenizer_config.json (its `do_lower_case`,
`add_prefix_space`, ...). Where the two files disagree, ids from tokenizer.json alone (what TEI
uses) differ from sentence-transformers'. This module applies the rebuilds that change ids for
the families we serve; the other parts of those templates equal what real tokenizer.json files
hold. (transformers 5.25: models/*/tokenization_*.py; the class choice: shared/tokenizer_class.py)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from shared.errors import ConfigError
from shared.st_modules import read_json
from shared.tokenizer_class import CLASS_DEFAULTS, tokenizer_class

log = logging.getLogger(__name__)


def _steps(component: Any) -> list[Any]:
    """The steps of a normalizer or pre-tokenizer: a Sequence's members, else itself."""
    if component is None:
        return []
    if isinstance(component, (normalizers.Sequence, pre_tokenizers.Sequence)):
        return list(cast(Iterable, component))  # (the stubs do not declare Sequence iterable)
    return [component]


def _token(tokenizer_config: dict[str, Any], key: str, default: str) -> str:
    value = tokenizer_config.get(key) or default
    return str(value["content"]) if isinstance(value, dict) else str(value)  # an AddedToken


def _charsmap(tokenizer: Tokenizer) -> list[Any]:
    """The sentencepiece character map of the file's normalizer, as a list of 0 or 1 step: the
    one part of it the sentencepiece classes keep."""
    return [s for s in _steps(tokenizer.normalizer) if isinstance(s, normalizers.Precompiled)][:1]


def _split_then_metaspace(scheme: str) -> Any:
    """sentencepiece's split as the classes rebuild it: on every whitespace first (a trailing
    space or newline gives no "▁" of its own), then Metaspace with the class's prepend scheme."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)])


def _cls_sep_template(tokenizer: Tokenizer, cfg: dict[str, Any]) -> None:
    """[CLS] A [SEP] / [CLS] A [SEP] B [SEP] (B's part type 1) of tokenizer_config.json's
    cls_token / sep_token; the file's post-processor where the vocabulary lacks either
    (transformers would add the token as a new one)."""
    cls, sep = _token(cfg, "cls_token", "[CLS]"), _token(cfg, "sep_token", "[SEP]")
    cls_id, sep_id = tokenizer.token_to_id(cls), tokenizer.token_to_id(sep)
    if cls_id is None or sep_id is None:
        return
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, cls_id), (sep, sep_id)])


def _bert(tokenizer: Tokenizer, cfg: dict[str, Any]) -> None:
    # Note do_lower_case's default: True, so a cased tokenizer.json is lower-cased when
    # tokenizer_config.json does not say do_lower_case false.
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=bool(cfg.get("tokenize_chinese_chars", True)),
        strip_accents=cfg.get("strip_accents"), lowercase=bool(cfg.get("do_lower_case", True)))


def _bert_template(tokenizer: Tokenizer, cfg: dict[str, Any]) -> None:
    # BertTokenizer (so DistilBERT's and ELECTRA's) sets its pre-tokenizer, and its template of
    # cls_token / sep_token after the file's post-processor was applied: the class's win.
    _bert(tokenizer, cfg)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    _cls_sep_template(tokenizer, cfg)


def _mpnet(tokenizer: Tokenizer, cfg: dict[str, Any]) -> None:
    # MPNetTokenizer sets <s> A </s> / <s> A </s></s> B </s> of its cls_token / sep_token over
    # the file's post-processor (ids 0 and 2 for a token the vocabulary lacks).
    _bert(tokenizer, cfg)
    cls, sep = _token(cfg, "cls_token", "<s>"), _token(cfg, "sep_token", "</s>")
    cls_id, sep_id = tokenizer.token_to_id(cls), tokenizer.token_to_id(sep)
    tokenizer.post_processor = processors.RobertaProcessing(
        (sep, 2 if sep_id is None else sep_id), (cls, 0 if cls_id is None else cls_id),
        trim_offsets=True, add_prefix_space=False)


def _roberta(tokenizer: Tokenizer, cfg: dict[str, Any]) -> None:
    prefix = bool(cfg.get("add_prefix_space", False))
    sep, cls = _token(cfg, "sep_token", "</s>"), _token(cfg, "cls_token", "<s>")
    sep_id, cls_id = tokenizer.token_to_id(sep), tokenizer.token_to_id(cls)
    tokenizer.normalizer = None  # (the template has none)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
    if sep_id is None or cls_id is None:
        return  # not a RoBERTa vocabulary after all: keep the file's post-processor
    # trim_offsets: whether a token's offsets leave out the space it starts with.
    tokenizer.post_processor = processors.RobertaProcessing(
        (sep, sep_id), (cls, cls_id), trim_offsets=bool(cfg.get("trim_offsets", True)),
        add_prefix_space=prefix)


def _xlm_roberta(tokenizer: Tokenizer, cfg: dict[str, Any]) -> None:
    # The template splits on every whitespace before the Metaspace step: a trailing space or
    # newline gives no "▁" token of its own. Of the normalizer it keeps the sentencepiece
    # character map only (the space-collapsing Replace after it is moot after that split).
    scheme = "always" if cfg.get("add_prefix_space", True) else "never"
    tokenizer.normalizer = next(iter(_charsmap(tokenizer)), None)
    tokenizer.pre_tokenizer = _split_then_metaspace(scheme)


def _t5(tokenizer: Tokenizer, cfg: dict[str, Any]) -> None:
    # XLM-R's pipeline, but the leading "▁" is always added (add_prefix_space is not read); the
    # Unigram model is rebuilt from the file's pieces with the unknown piece at id 2 and no
    # byte fallback, whatever the file says; and the closing "</s>" of the template is
    # tokenizer_config.json's eos_token (its id), whatever the file's post-processor holds.
    tokenizer.normalizer = next(iter(_charsmap(tokenizer)), None)
    tokenizer.pre_tokenizer = _split_then_metaspace("always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    _unigram(tokenizer, lambda pieces: _T5_UNK_ID)
    eos = _token(cfg, "eos_token", "</s>")
    if tokenizer.token_to_id(eos) is None:
        # transformers adds a named token the vocabulary lacks as a new special token (the
        # next id), and closes every text with it.
        tokenizer.add_special_tokens([AddedToken(eos, special=True)])
    eos_id = tokenizer.token_to_id(eos)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A:0 </s>:0", pair="$A:0 </s>:0 $B:0 </s>:0", special_tokens=[("</s>", eos_id)])


# T5Tokenizer's Unigram always takes id 2 as the unknown piece (<pad> </s> <unk> in T5's files).
_T5_UNK_ID = 2


def _albert(tokenizer: Tokenizer, cfg: dict[str, Any]) -> None:
    # The class's normalizer: `` and '' to ", accents stripped (unless keep_accents), lower case
    # (unless do_lower_case false), then the file's sentencepiece character map; Hub files also
    # collapse runs of spaces, moot after the whitespace split. The Unigram model is rebuilt with
    # the unknown piece at id 1 and no byte fallback.
    # NOTE: the file's post-processor is kept when it has one (transformers passes it to the
    # class, whose template of cls_token / sep_token it replaces); the template only for none.
    steps: list[Any] = [normalizers.Replace("``", '"'), normalizers.Replace("''", '"')]
    if not cfg.get("keep_accents", False):
        steps += [normalizers.NFKD(), normalizers.StripAccents()]
    if cfg.get("do_lower_case", True):
        steps.append(normalizers.Lowercase())
    tokenizer.normalizer = normalizers.Sequence([*steps, *_charsmap(tokenizer)])
    scheme = "always" if cfg.get("add_prefix_space", True) else "never"
    tokenizer.pre_tokenizer = _split_then_metaspace(scheme)
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
    _unigram(tokenizer, lambda pieces: _ALBERT_UNK_ID)
    if tokenizer.post_processor is not None:
        return
    cls_id = tokenizer.token_to_id(_token(cfg, "cls_token", "[CLS]"))
    sep_id = tokenizer.token_to_id(_token(cfg, "sep_token", "[SEP]"))
    if cls_id is None or sep_id is None:
        return  # the file's post-processor (transformers would add the token as a new one)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])


_ALBERT_UNK_ID = 1


Pieces = list[tuple[str, float]]


def _unigram(tokenizer: Tokenizer, unk_id_of: Callable[[Pieces], int]) -> None:
    """The Unigram model as the sentencepiece classes build it anew from the file's pieces:
    without byte fallback, and with the unknown id the class chooses (`unk_id_of` the pieces),
    whatever the file's unk_id says."""
    state = json.loads(tokenizer.model.__getstate__())
    if state.get("type") != "Unigram":
        return  # (the class could not load it at all)
    pieces = [(piece, score) for piece, score in state["vocab"]]
    unk_id = unk_id_of(pieces)
    if state.get("unk_id") != unk_id or state.get("byte_fallback"):
        tokenizer.model = models.Unigram(pieces, unk_id=unk_id, byte_fallback=False)


def _llama(tokenizer: Tokenizer, cfg: dict[str, Any]) -> None:
    if any(isinstance(s, pre_tokenizers.ByteLevel) for s in _steps(tokenizer.pre_tokenizer)):
        return  # a Llama 3 style file: transformers loads it as it is
    # sentencepiece style: the leading "▁" is not added to a text that starts with a space
    # (tokenizer.json's Prepend normalizer adds it to every text).
    scheme = "never"
    if cfg.get("add_prefix_space", True) is not False:
        scheme = "always" if cfg.get("legacy", False) else "first"
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme=scheme, split=False)


def _qwen2(tokenizer: Tokenizer, cfg: dict[str, Any]) -> None:
    # Qwen2Tokenizer keeps only the file's vocabulary and merges (and its post-processor): its
    # normalizer is NFC and its pre-tokenizer Qwen's Split, then bytes without ByteLevel's own
    # regex, add_prefix_space from tokenizer_config.json, whatever the file holds. Real Qwen
    # files hold the same; one with GPT-2's byte-level split (digits grouped) or without NFC
    # gives other ids alone. (trim_offsets, which a pre-tokenizer does not read, as real files
    # have it: a real file is then left as it is.)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=bool(cfg.get("add_prefix_space") or False),
                                 trim_offsets=False, use_regex=False)])


# transformers 5.25's models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX.
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _deberta_v2(tokenizer: Tokenizer, cfg: dict[str, Any]) -> None:
    # The class keeps the file's vocabulary and, of its normalizer, the sentencepiece character
    # map only. Hub files (transformers 4's converter) strip both ends before that map; the
    # class strips the right end only, after it, so a leading space stays in the first token's
    # offsets. Without a map the template turns each whitespace run, tab and newline into a
    # space.
    lower = [normalizers.Lowercase()] if cfg.get("do_lower_case", False) else []
    charsmap = _charsmap(tokenizer)
    if charsmap:
        rest = [charsmap[0], normalizers.Strip(left=False, right=True),
                normalizers.Replace(Regex(" {2,}"), " ")]
    else:
        rest = [normalizers.Replace(Regex(r"\s{2,}|[\n\r\t]"), " "), normalizers.NFC(),
                normalizers.Strip(left=False, right=True)]
    tokenizer.normalizer = normalizers.Sequence([*lower, *rest])
    # add_prefix_space false still marks the text's start; only text after a special token
    # gets no "▁" ("first", where the converter wrote "never").
    scheme = "always" if cfg.get("add_prefix_space", True) else "first"
    punct = [pre_tokenizers.Punctuation("isolated")] if cfg.get("split_by_punct", False) else []
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [*punct, pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
    # The unknown piece is found by name (score 0.0); failing that, tokenizer_config.json's
    # unk_id (default 1).
    unk = (_token(cfg, "unk_token", "[UNK]"), 0.0)
    _unigram(tokenizer,
             lambda pieces: pieces.index(unk) if unk in pieces else cfg.get("unk_id", 1))
    _cls_sep_template(tokenizer, cfg)


_REBUILDS = {
    "BertTokenizer": _bert_template, "DistilBertTokenizer": _bert_template,
    "MPNetTokenizer": _mpnet,
    # (transformers 5 has no ElectraTokenizer: the name resolves to BertTokenizer.)
    "ElectraTokenizer": _bert_template,
    "RobertaTokenizer": _roberta,
    "XLMRobertaTokenizer": _xlm_roberta, "CamembertTokenizer": _xlm_roberta,
    "LlamaTokenizer": _llama, "Qwen2Tokenizer": _qwen2, "DebertaV2Tokenizer": _deberta_v2,
    "T5Tokenizer": _t5, "AlbertTokenizer": _albert,
}


def _pipeline(tokenizer: Tokenizer) -> list[bytes | None]:
    """The parts a rebuild may change, serialized (to tell whether it changed any)."""
    parts = (tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.post_processor,
             tokenizer.decoder)
    return [None if part is None else part.__getstate__() for part in parts]


def _with_lowercase(tokenizer: Tokenizer) -> None:
    """sentence_bert_config.json's do_lower_case, as sentence-transformers applies it: a
    Lowercase step before the tokenizer's own normalizer (offsets stay the input's)."""
    steps = _steps(tokenizer.normalizer)
    if not any(isinstance(step, normalizers.Lowercase) for step in steps):
        tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), *steps])


def _read_config(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or a start-up error naming it (transformers refuses such a file
    too; a bare JSONDecodeError from the tokenizer pool would name neither file nor model)."""
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: a JSON object was expected, not {type(cfg).__name__}")
    return cfg


_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")
# The named special tokens transformers makes sure of (SPECIAL_TOKENS_ATTRIBUTES).
_NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
          "mask_token")


def _added_token(value: Any, special: bool | None = None) -> AddedToken | None:
    """An AddedToken of a file's value (a token's text or its AddedToken dict); None for none."""
    if isinstance(value, dict):
        if "content" not in value:
            return None
        flags = {flag: bool(value[flag]) for flag in _ADDED_TOKEN_FLAGS if flag in value}
        if special is not None:
            flags["special"] = special
        return AddedToken(str(value["content"]), **flags)
    if isinstance(value, str) and value:
        return AddedToken(value, special=bool(special))
    return None


def _config_added_tokens(tokenizer: Tokenizer, cfg: dict[str, Any],
                         named: dict[str, Any], rows: int | None = None) -> None:
    """Tokens transformers adds after building the class: tokenizer_config.json's
    `added_tokens_decoder` entries that tokenizer.json's added tokens lack (compared as
    transformers compares them: content and flags), in id order, then each named special token
    (`named`: the class's defaults under the files') and extra special token that is not an
    added token yet, as a special one; each at its vocabulary id or the next free one. A token
    whose new id would be past the model's embedding `rows` (config.json's vocab_size) is left
    out: transformers' model would fail on it (an index error), where its pieces still serve."""
    present = tokenizer.get_added_tokens_decoder().values()
    have = {repr(token) for token in present}
    entries = cfg.get("added_tokens_decoder") or {}
    tokens = [_added_token(entry) for _, entry in sorted(entries.items(),
                                                         key=lambda item: int(item[0]))]
    new = [token for token in tokens if token is not None and repr(token) not in have]
    contents = {token.content for token in present}
    contents |= {token.content for token in new}
    extra = named.get("extra_special_tokens") or named.get("additional_special_tokens") or []
    for value in [*(named.get(key) for key in _NAMED),
                  *(extra.values() if isinstance(extra, dict) else extra)]:
        token = _added_token(value, special=True)
        if token is not None and token.content not in contents:
            new.append(token)
            contents.add(token.content)
    next_id, kept = tokenizer.get_vocab_size(with_added_tokens=True), []
    for token in new:
        if tokenizer.token_to_id(token.content) is None:  # it takes a new id
            if rows is not None and next_id >= rows:
                log.warning("tokenizer_config.json's %r would take id %d, past the model's %d "
                            "embeddings: not added (a text holding it is tokenized in pieces)",
                            token.content, next_id, rows)
                continue
            next_id += 1
        kept.append(token)
    if kept:
        tokenizer.add_tokens(kept)


def configure(tokenizer: Tokenizer, model_dir: Path, model_type: str, lowercase: bool) -> str:
    """Make `tokenizer` (model_dir's tokenizer.json) tokenize as sentence-transformers does.
    Returns what tokenizer_config.json changed ("" for nothing), for the log."""
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = _read_config(cfg_path) if cfg_path.is_file() else {}
    map_path = model_dir / "special_tokens_map.json"
    if "added_tokens_decoder" not in cfg and map_path.is_file():
        # transformers 4's files: special_tokens_map.json's named tokens win over
        # tokenizer_config.json's, as transformers reads them (shared.tokenizer_class)
        cfg |= _read_config(map_path)
    model_cfg_path = model_dir / "config.json"
    model_cfg = _read_config(model_cfg_path) if model_cfg_path.is_file() else {}
    name = tokenizer_class(cfg, model_type, model_cfg.get("tokenizer_class"))
    rebuild = _REBUILDS.get(name)
    changed = ""
    if rebuild is not None:
        before = _pipeline(tokenizer)
        rebuild(tokenizer, cfg)
        if _pipeline(tokenizer) != before:
            changed = f"{name} rebuilds tokenizer.json's normalizer/pre-tokenizer from {cfg_path}"
    rows = model_cfg.get("vocab_size")
    _config_added_tokens(tokenizer, cfg, CLASS_DEFAULTS.get(name, {}) | cfg,
                         rows if isinstance(rows, int) else None)
    # split_special_tokens: a special token written in a text is tokenized as text (transformers
    # sets it on the backend for every call, the template's own tokens still added).
    tokenizer.encode_special_tokens = bool(cfg.get("split_special_tokens", False))
    if lowercase:
        _with_lowercase(tokenizer)
    return changed


def sends_token_types(model_dir: Path) -> bool:
    """Whether the model is given the encoding's token types: false where tokenizer_config.json
    lists `model_input_names` without "token_type_ids", as transformers then returns none (so
    SentenceTransformer and CrossEncoder send none) and the model sees type 0 everywhere.
    NOTE: a file without the key keeps the post-processor's types (TEI's), deliberately:
    transformers 5 would take its class's default list instead (AlbertTokenizer's and the
    generic class's lack token types, BertTokenizer's has them), which we do not replicate."""
    path = model_dir / "tokenizer_config.json"
    names = _read_config(path).get("model_input_names") if path.is_file() else None
    return not isinstance(names, list) or "token_type_ids" in names
