"""/decode's text as transformers 5 writes it (TokenizersBackend._decode): tokenizer.json's
decoder, then, where tokenizer_config.json sets `clean_up_tokenization_spaces` (as Hub files
saved by transformers 4 do: BGE's, E5's), the spaces before punctuation and English
contractions taken out. Not for a BPE model: transformers skips it there (it would corrupt
byte-level text) unless the file insists. TEI returns the decoder's text as it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.st_modules import optional_json

# transformers' clean_up_tokenization, in its order.
_CLEAN_UPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
              (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def cleans_up_spaces(tokenizer: Any, model_dir: Path) -> bool:
    """Whether transformers cleans up `tokenizer`'s decoded text (model_dir's settings)."""
    cfg = optional_json(model_dir / "tokenizer_config.json")
    if not isinstance(cfg, dict) or not cfg.get("clean_up_tokenization_spaces"):
        return False
    return (type(tokenizer.model).__name__ != "BPE" or bool(cfg.get(
        "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))


def clean_up_spaces(text: str) -> str:
    for dirty, clean in _CLEAN_UPS:
        text = text.replace(dirty, clean)
    return text
