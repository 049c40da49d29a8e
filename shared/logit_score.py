"""A causal language model served as a re-ranker: sentence-transformers' LogitScore.

A CrossEncoder made of a text-generation Transformer and a LogitScore module (Qwen3-Reranker,
zerank and the like, as sentence-transformers >= 5.4 saves them) scores a (query, document) pair
by the next-token logits at its last token: logit[true] - logit[false] (or logit[true] alone),
then its activation (sigmoid by default). The pair reaches the model through the repository's
chat template, as one conversation of a `query` and a `document` message, when the Transformer
module takes messages; else as the tokenizer's own pair encoding.

Pure data, read from the files: the worker builds the score head from the LM head's two rows,
the router renders the conversations (router/chat_template.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import msgspec

from shared.errors import ConfigError
from shared.st_modules import optional_json, read_json

# apply_chat_template's size and output arguments: tokenization, not rendering.
_SIZE_KWARGS = frozenset({"padding", "truncation", "max_length", "return_tensors",
                          "pad_to_multiple_of", "return_dict", "tokenize"})
# Rendering arguments sentence-transformers would pass on that change what is scored in ways
# not reproduced here.
_REFUSED_KWARGS = frozenset({"continue_final_message", "tools", "documents",
                             "return_assistant_tokens_mask", "chat_template"})
# What in a template's source tells sentence-transformers it reads content as a list of parts.
_STRUCTURED_PATTERNS = ("content[0]", ".type", "'type'", '"type"', "item.type",
                        "message.content[")
# The named special tokens transformers gives every template (its special_tokens_map).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")


class LogitScore(msgspec.Struct, frozen=True):
    """How a causal LM scores a pair: the two vocabulary rows, and how the pair is written."""

    true_token_id: int
    false_token_id: int | None
    # The chat template source; None: pairs are tokenized as the tokenizer's own pairs.
    chat_template: str | None = None
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


def _template(root: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The template transformers 5 gives the tokenizer: chat_template.jinja, else
    tokenizer_config.json's (a list of named ones: the one named "default")."""
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {str(t.get("name")): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ConfigError(f"{root}/tokenizer_config.json: several chat templates "
                              f"({sorted(named)}) and none named 'default'")
        template = named["default"]
    return None if template is None else str(template)


def _render_kwargs(root: Path, st_config: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """sentence_bert_config.json's processing_kwargs: the render's variables and whether the
    suffix is restored; any setting that would change tokenization is refused by name."""
    processing = dict(st_config.get("processing_kwargs") or {})
    chat = dict(processing.pop("chat_template", None) or {})
    others = {k: v for k, v in processing.items() if v}
    if others:
        raise ConfigError(f"{root}/sentence_bert_config.json: processing_kwargs "
                          f"{sorted(others)} are not supported for a LogitScore re-ranker")
    restore = bool(chat.pop("restore_suffix", True))
    bad = sorted((_SIZE_KWARGS | _REFUSED_KWARGS) & chat.keys())
    if bad:
        raise ConfigError(f"{root}/sentence_bert_config.json: chat_template settings {bad} are "
                          "not supported for a LogitScore re-ranker")
    return chat, restore


def parse_logit_score(root: Path, module_dir: Path, config: dict[str, Any]) -> LogitScore:
    """The LogitScore module at `module_dir` of the model at `root`, with what the Transformer
    module says about how pairs reach it. Refuses what would be scored otherwise."""
    cfg = read_json(module_dir / "config.json")
    if cfg.get("module_input_name", "causal_logits") != "causal_logits":
        raise ConfigError(f"{module_dir}: LogitScore on {cfg['module_input_name']!r} is not "
                          "supported (only on the causal LM's logits)")
    true_id, false_id = cfg.get("true_token_id"), cfg.get("false_token_id")
    vocab = int(config.get("vocab_size", 0))
    for name, value in (("true_token_id", true_id), ("false_token_id", false_id)):
        if value is None and name == "false_token_id":
            continue
        if not isinstance(value, int) or not 0 <= value < vocab:
            raise ConfigError(f"{module_dir}/config.json: {name} {value!r} is not a token of "
                              f"the vocabulary (vocab_size {vocab})")
    architectures = [str(a) for a in config.get("architectures") or []]
    if not architectures or not architectures[0].endswith("ForCausalLM"):
        raise ConfigError(f"{root}: a LogitScore re-ranker needs a *ForCausalLM checkpoint (its "
                          f"LM head scores the pair); config.json has {architectures}")
    st_config = optional_json(root / "sentence_bert_config.json") or {}
    task = st_config.get("transformer_task", "text-generation")
    if task != "text-generation":
        raise ConfigError(f"{root}/sentence_bert_config.json: LogitScore after a "
                          f"{task!r} Transformer is not supported (only text-generation)")
    tokenizer_config = optional_json(root / "tokenizer_config.json") or {}
    template = _template(root, tokenizer_config)
    modalities = st_config.get("modality_config")
    # Without a modality_config, sentence-transformers takes messages when there is a template.
    message = (modalities or {}).get("message") if modalities is not None else (
        {} if template is not None else None)
    if message is None:
        return LogitScore(true_id, false_id)
    if template is None:
        raise ConfigError(f"{root}: the Transformer module takes messages, but the model has no "
                          "chat template (chat_template.jinja or tokenizer_config.json's)")
    message_format = message.get("format", "auto")
    if message_format == "auto":  # sentence-transformers' guess, from the template's source
        message_format = ("structured" if any(p in template for p in _STRUCTURED_PATTERNS)
                          else "flat")
    if message_format not in ("flat", "structured"):
        raise ConfigError(f"{root}/sentence_bert_config.json: message format "
                          f"{message_format!r} is not supported")
    kwargs, restore = _render_kwargs(root, st_config)
    specials = {name: text for name in SPECIAL_TOKEN_NAMES
                if (text := _token_text(tokenizer_config.get(name))) is not None}
    return LogitScore(true_id, false_id, template, message_format, kwargs, specials, restore)
