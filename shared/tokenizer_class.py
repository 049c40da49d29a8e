"""Which tokenizer class transformers 5 builds for a model directory (its class choice in
models/auto/tokenization_auto.py): the router rebuilds tokenizer.json as that class does
(router/tokenizer_config.py) and BGE-M3's lexical weights take that class's default special
tokens (shared/lexical.py)."""

from __future__ import annotations

from typing import Any

# The tokenizer class transformers registers for a model type: the one it builds when neither
# tokenizer_config.json nor config.json names one (none for llama: the file is used as it is).
_DEFAULT_CLASS = {
    "bert": "BertTokenizer", "distilbert": "BertTokenizer", "nomic_bert": "BertTokenizer",
    "mpnet": "MPNetTokenizer", "roberta": "RobertaTokenizer", "camembert": "CamembertTokenizer",
    "xlm-roberta": "XLMRobertaTokenizer", "gte": "XLMRobertaTokenizer",
    "qwen2": "Qwen2Tokenizer", "qwen3": "Qwen2Tokenizer", "deberta-v2": "DebertaV2Tokenizer",
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
