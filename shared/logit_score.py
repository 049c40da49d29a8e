"""A causal language model served as a re-ranker: sentence-transformers' LogitScore.

A CrossEncoder made of a text-generation Transformer and a LogitScore module (Qwen3-Reranker,
zerank and the like, as sentence-transformers >= 5.4 saves them) scores a (query, document) pair
by the next-token logits at its last token: logit[true] - logit[false] (or logit[true] alone),
then its activation (sigmoid by default). How the pair reaches the model (as a chat
conversation, shared/conversations.py, or as the tokenizer's pair) is the Transformer module's.

Pure data, read from the files: the worker builds the score head from the LM head's two rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from shared.errors import ConfigError
from shared.st_modules import read_json


class LogitScore(msgspec.Struct, frozen=True):
    """The vocabulary rows a causal LM scores a pair with."""

    true_token_id: int
    false_token_id: int | None


def parse_logit_score(root: Path, module_dir: Path, config: dict[str, Any],
                      st_config: dict[str, Any]) -> LogitScore:
    """The LogitScore module at `module_dir` of the model at `root` (`st_config`: its
    sentence_bert_config.json); refuses what would be scored otherwise."""
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
    task = st_config.get("transformer_task", "text-generation")
    if task != "text-generation":
        raise ConfigError(f"{root}/sentence_bert_config.json: LogitScore after a "
                          f"{task!r} Transformer is not supported (only text-generation)")
    return LogitScore(true_id, false_id)
