"""Whether a CrossEncoder's inputs reach its model as chat conversations, and how.

sentence-transformers (>= 5.4) gives a CrossEncoder whose Transformer module takes the "message"
modality each (query, document) pair as one conversation, a `query` and a `document` message,
rendered with the model's chat template (router/chat_template.py). The Transformer module
declares that in sentence_bert_config.json's `modality_config`; this module reads it, with the
template and the render's settings.

Pure data, read from the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import msgspec

from shared.errors import ConfigError
from shared.st_modules import optional_json
from shared.tokenizer_class import special_tokens

# apply_chat_template's size and output arguments: tokenization, not rendering.
_SIZE_KWARGS = frozenset({"padding", "truncation", "max_length", "return_tensors",
                          "pad_to_multiple_of", "return_dict", "tokenize"})
# Rendering arguments sentence-transformers would pass on that change what is scored in ways
# not reproduced here, or that apply_chat_template (or the render) takes as its own and fails
# on as given there (sanitize_control_tokens, tokenizer_kwargs, conversation, messages).
_REFUSED_KWARGS = frozenset({"continue_final_message", "tools", "documents",
                             "return_assistant_tokens_mask", "chat_template",
                             "sanitize_control_tokens", "tokenizer_kwargs", "conversation",
                             "messages"})
# What in a template's source tells sentence-transformers it reads content as a list of parts.
_STRUCTURED_PATTERNS = ("content[0]", ".type", "'type'", '"type"', "item.type",
                        "message.content[")
# The named special tokens transformers gives every template (its special_tokens_map).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")


class Conversations(msgspec.Struct, frozen=True):
    """How inputs are written as conversations: the template and what it renders with."""

    chat_template: str
    message_format: Literal["flat", "structured"] = "flat"
    # Extra variables of the render (sentence_bert_config.json's chat_template kwargs).
    template_kwargs: dict[str, Any] = {}
    # The named special tokens, by name, as the template sees them.
    special_tokens: dict[str, str] = {}
    # A truncated conversation gets the template's tail back over its last tokens.
    restore_suffix: bool = True


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # an AddedToken as transformers saves it
        value = value.get("content")
    return None if value is None else str(value)


def _model_specific_tokens(root: Path, tokenizer_config: dict[str, Any]) -> dict[str, str]:
    """The named tokens besides the standard seven that transformers 5 also puts in a
    tokenizer's special_tokens_map, so in every template's variables (its
    PreTrainedTokenizerBase._from_pretrained and __init__): tokenizer_config.json's other
    `*_token` keys holding a text, and its `extra_special_tokens` when a dict of named tokens
    (`additional_special_tokens` as its old name); over special_tokens_map.json's `*_token`
    keys, where that file is read (no `added_tokens_decoder`), whose dict (`extra_special_tokens`)
    wins over them all."""
    def named(mapping: dict[str, Any], kinds: tuple[type, ...]) -> dict[str, str]:
        return {key: text for key, value in mapping.items()
                if key.endswith("_token") and key not in SPECIAL_TOKEN_NAMES
                and isinstance(value, kinds) and (text := _token_text(value)) is not None}

    def extra(mapping: dict[str, Any]) -> dict[str, str]:
        value = mapping.get("extra_special_tokens") or mapping.get("additional_special_tokens")
        if not isinstance(value, dict):
            return {}
        return {str(k): text for k, v in value.items() if (text := _token_text(v)) is not None}

    legacy: dict[str, Any] = {}
    if "added_tokens_decoder" not in tokenizer_config:
        legacy = optional_json(root / "special_tokens_map.json") or {}
    # (tokenizer_config.json's AddedToken dicts are not tokens there: only texts count)
    found = named(legacy, (str, dict))
    found.update(named(tokenizer_config, (str,)))
    found.update(extra(tokenizer_config))
    found.update(extra({"extra_special_tokens": legacy.get("extra_special_tokens")}))
    return found


def _template(root: Path, tokenizer_config: dict[str, Any]) -> tuple[str | None, bool]:
    """The template transformers 5 gives the tokenizer, and whether it holds several.

    As its loader: chat_template.jinja (named "default") and additional_chat_templates/*.jinja
    (each by its name; these files replace tokenizer_config.json's template), else
    tokenizer_config.json's (a string, or a list of named ones); of several, apply_chat_template
    renders the one named "default"."""
    files = {}
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        files["default"] = jinja.read_text(encoding="utf-8")
    folder = root / "additional_chat_templates"
    if folder.is_dir():
        for path in sorted(folder.glob("*.jinja")):
            files[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    named: dict[str, Any]
    if files:
        if set(files) == {"default"}:
            return files["default"], False
        named, where = files, f"{root}/additional_chat_templates"
    else:
        template = tokenizer_config.get("chat_template")
        if not isinstance(template, list):
            return (None if template is None else str(template)), False
        named = {str(t.get("name")): t.get("template") for t in template if isinstance(t, dict)}
        where = f"{root}/tokenizer_config.json"
    if "default" not in named:
        raise ConfigError(f"{where}: several chat templates ({sorted(named)}) and none named "
                          "'default'")
    return str(named["default"]), True


def _render_kwargs(root: Path, st_config: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """sentence_bert_config.json's processing_kwargs: the render's variables and whether the
    suffix is restored; any setting that would change tokenization is refused by name."""
    processing = dict(st_config.get("processing_kwargs") or {})
    chat = dict(processing.pop("chat_template", None) or {})
    others = {k: v for k, v in processing.items() if v}
    if others:
        raise ConfigError(f"{root}/sentence_bert_config.json: processing_kwargs "
                          f"{sorted(others)} are not supported for chat conversations")
    restore = bool(chat.pop("restore_suffix", True))
    bad = sorted((_SIZE_KWARGS | _REFUSED_KWARGS) & chat.keys())
    if bad:
        raise ConfigError(f"{root}/sentence_bert_config.json: chat_template settings {bad} are "
                          "not supported")
    return chat, restore


def read_conversations(root: Path, st_config: dict[str, Any], model_type: str = "",
                       config_class: str | None = None) -> Conversations | None:
    """The model's conversations when its Transformer module takes messages, as
    sentence_bert_config.json's modality_config declares; None: plain inputs. (Without a
    modality_config sentence-transformers loads a saved Transformer as text only, chat template
    or not; it guesses messages only for a bare transformers directory, which TEI and
    transformers read plainly, and so do we.) `st_config`: sentence_bert_config.json."""
    message = (st_config.get("modality_config") or {}).get("message")
    if message is None:
        return None
    tokenizer_config = optional_json(root / "tokenizer_config.json") or {}
    template, several = _template(root, tokenizer_config)
    if template is None:
        raise ConfigError(f"{root}: the Transformer module takes messages, but the model has no "
                          "chat template (chat_template.jinja or tokenizer_config.json's)")
    message_format = message.get("format", "auto")
    if message_format == "auto":  # sentence-transformers' guess, from the template's source
        # (several templates are not a string to it: structured)
        message_format = ("structured" if several or any(p in template for p in
                                                          _STRUCTURED_PATTERNS) else "flat")
    if message_format not in ("flat", "structured"):
        raise ConfigError(f"{root}/sentence_bert_config.json: message format "
                          f"{message_format!r} is not supported")
    kwargs, restore = _render_kwargs(root, st_config)
    # As transformers names them to the template: its tokenizer's (the class's defaults, the
    # files'), `config_class` being config.json's tokenizer_class.
    named = special_tokens(root, model_type, config_class)
    specials = {name: text for name in SPECIAL_TOKEN_NAMES
                if (text := _token_text(named.get(name))) is not None}
    specials.update(_model_specific_tokens(root, tokenizer_config))
    return Conversations(template, message_format, kwargs, specials, restore)
