"""Which tokenizer class transformers 5 builds for a model directory (its class choice in
models/auto/tokenization_auto.py), and the named special tokens that tokenizer has: the router
rebuilds tokenizer.json as that class does (router/tokenizer_config.py); chat templates
(shared/conversations.py) and BGE-M3's lexical weights (shared/lexical.py) take its special
tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.errors import ConfigError
from shared.st_modules import optional_json

# What a directory without tokenizer.json may hold instead: a slow tokenizer's files.
_SLOW_TOKENIZER_FILES = ("tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                         "sentencepiece.bpe.model", "spiece.model", "tokenizer.model")
# The tokenizer class transformers registers for a model type: the one it builds when neither
# tokenizer_config.json nor config.json names one (none for llama: the file is used as it is).
_DEFAULT_CLASS = {
    "bert": "BertTokenizer", "distilbert": "BertTokenizer", "electra": "BertTokenizer",
    "nomic_bert": "BertTokenizer",
    "mpnet": "MPNetTokenizer", "roberta": "RobertaTokenizer", "camembert": "CamembertTokenizer",
    "xlm-roberta": "XLMRobertaTokenizer", "gte": "XLMRobertaTokenizer",
    "qwen2": "Qwen2Tokenizer", "qwen3": "Qwen2Tokenizer", "deberta-v2": "DebertaV2Tokenizer",
    "t5": "T5Tokenizer", "mt5": "T5Tokenizer", "albert": "AlbertTokenizer",
}
# Model types transformers loads with its generic backend, i.e. tokenizer.json as it is,
# whatever class the files name.
_FILE_AS_IS = {"mistral", "modernbert"}
# Model types whose named class transformers overrides with the registered one (Hub files of
# such models are known to name a wrong class).
_NAMED_CLASS_IGNORED = {"qwen2"}


def tokenizer_class(tokenizer_config: dict[str, Any], model_type: str,
                    config_class: str | None = None) -> str:
    """The class transformers 5 builds the tokenizer with, without its "Fast" suffix.

    The class named by tokenizer_config.json, else by config.json (`config_class`), else the
    one registered for the model type."""
    if model_type in _FILE_AS_IS or "auto_map" in tokenizer_config:
        return "TokenizersBackend"  # (a remote-code class is not rebuilt here)
    named = tokenizer_config.get("tokenizer_class") or config_class
    if model_type in _NAMED_CLASS_IGNORED:
        named = None
    name = named or _DEFAULT_CLASS.get(model_type, "")
    return str(name).removesuffix("Fast")


# The named special tokens a tokenizer class takes when no file names them (its __init__
# defaults, transformers 5.25's models/*/tokenization_*.py); the generic backend has none.
_ROBERTA = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
            "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>"}
_BERT = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
         "mask_token": "[MASK]"}
CLASS_DEFAULTS: dict[str, dict[str, str]] = {
    "BertTokenizer": _BERT, "DistilBertTokenizer": _BERT, "ElectraTokenizer": _BERT,
    "RobertaTokenizer": _ROBERTA, "CamembertTokenizer": _ROBERTA, "XLMRobertaTokenizer": _ROBERTA,
    "MPNetTokenizer": {**_ROBERTA, "unk_token": "[UNK]"},
    "DebertaV2Tokenizer": {"bos_token": "[CLS]", "eos_token": "[SEP]", **_BERT},
    "Qwen2Tokenizer": {"eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                       "pad_token": "<|endoftext|>"},
    "T5Tokenizer": {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
    "AlbertTokenizer": {"bos_token": "[CLS]", "eos_token": "[SEP]", "unk_token": "<unk>",
                        "sep_token": "[SEP]", "pad_token": "<pad>", "cls_token": "[CLS]",
                        "mask_token": "[MASK]"},
}


def special_tokens(model_dir: Path, model_type: str,
                   config_class: str | None = None) -> dict[str, Any]:
    """The named special tokens as transformers 5 resolves them: the tokenizer class's defaults,
    over them tokenizer_config.json's (a null names none), and over those
    special_tokens_map.json's, which it reads only where tokenizer_config.json has no
    `added_tokens_decoder` (transformers 4 wrote that file and did not have that key). Values
    are a token's text or its AddedToken dict; other keys of the files come along."""
    tokenizer_config = optional_json(model_dir / "tokenizer_config.json") or {}
    named: dict[str, Any] = dict(CLASS_DEFAULTS.get(
        tokenizer_class(tokenizer_config, model_type, config_class), {}))
    named.update(tokenizer_config)
    if "added_tokens_decoder" not in tokenizer_config:
        named.update(optional_json(model_dir / "special_tokens_map.json") or {})
    return named


def require_fast_tokenizer(model_dir: Path) -> None:
    """Refuse a directory without tokenizer.json (as TEI does), naming the slow tokenizer's
    files it holds instead, from which transformers writes one."""
    if (model_dir / "tokenizer.json").is_file():
        return
    slow = [name for name in _SLOW_TOKENIZER_FILES if (model_dir / name).is_file()]
    hint = (f"; transformers writes one from the slow tokenizer's {', '.join(slow)}: "
            "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)" if slow else "")
    if slow == ["tokenizer_config.json"]:  # (a Hub download brings no vocabulary file)
        hint += (", DIR a full copy of the repository (this directory has no vocabulary "
                 "file), then serve that copy")
    raise ConfigError(f"{model_dir}: tokenizer.json not found (a fast tokenizer is "
                      f"required){hint}")
