"""Text pairs cut to what their truncation can keep, before the tokenizer truncates them.

tokenizers' truncation of a pair writes out its overflowing tokens too, and its post-processor
pairs every overflowing piece of the first member with every piece of the second: two long
members cost time and memory quadratic in their lengths (a /rerank of a 15 KB query and a 15
KB text tokenized for 3 s; of 2 x 40 KB, past 20 GB). Truncation (longest first) keeps at most
`max_length` tokens of either member, and reads their lengths only to know which member is the
longer: each member is first cut, at a word's edge (a word cut in two tokenizes again as other
tokens), to a few tokens more than `max_length`, the longer one to more than the shorter
keeps, so the pair truncates to the same tokens with a few overflowing pieces at most.
"""

from __future__ import annotations

from typing import Any, TypeGuard

# Tokens kept past what is needed: where a word is cut inside (a word longer than the cut),
# the piece left may tokenize again into a token or two more or fewer.
MARGIN = 8


def _cut(text: str, encoding: Any, count: int, direction: str) -> tuple[str, int]:
    """`text` down to the words that hold its first `count` tokens ("left": its last), and
    how many tokens it keeps; whole where it has no more. A word running past `2 * count`
    tokens is cut inside itself there, far from the tokens truncation keeps."""
    words, offsets = encoding.word_ids, encoding.offsets
    total = len(words)
    if total <= count:
        return text, total
    if direction == "left":
        first, bound = total - count, max(total - 2 * count, 0)
        while first > bound and words[first] is not None and words[first - 1] == words[first]:
            first -= 1
        return text[offsets[first][0]:], total - first
    last, bound = count - 1, min(2 * count, total) - 1
    while last < bound and words[last] is not None and words[last + 1] == words[last]:
        last += 1
    return text[:offsets[last][1]], last + 1


def _cut_pair(pair: tuple[str, str], encodings: dict[str, Any], max_length: int,
              direction: str) -> tuple[str, str]:
    first, second = pair
    # Truncation takes the shorter member to be the first where both are as long: so it must
    # stay, the longer (the second on a tie) cut to more tokens than the shorter keeps.
    first_shorter = len(encodings[first].ids) <= len(encodings[second].ids)
    short, long = (first, second) if first_shorter else (second, first)
    short, kept = _cut(short, encodings[short], max_length + MARGIN, direction)
    long, _ = _cut(long, encodings[long], max(kept, max_length) + MARGIN, direction)
    return (short, long) if first_shorter else (long, short)


def truncating(tokenizer: Any, texts: list[str | tuple[str, str]], max_length: int | None,
               direction: str) -> list[str | tuple[str, str]]:
    """Set `tokenizer` to truncate to `max_length` on `direction` (None: not at all), and
    return `texts` with their pairs cut where truncating them cannot tell. A pair whose
    members are at most `max_length` characters long has a few tokens per character at most,
    so a few overflowing pieces: it is left as it is, untokenized."""
    tokenizer.no_truncation()
    if max_length is None:
        return texts

    def is_long(item: str | tuple[str, str]) -> TypeGuard[tuple[str, str]]:
        return isinstance(item, tuple) and max(map(len, item)) > max_length

    long = [item for item in texts if is_long(item)]
    if long:
        members = list(dict.fromkeys(member for pair in long for member in pair))
        encodings = dict(zip(members, tokenizer.encode_batch(members, add_special_tokens=False),
                             strict=True))
        texts = [_cut_pair(item, encodings, max_length, direction) if is_long(item) else item
                 for item in texts]
    tokenizer.enable_truncation(max_length, direction=direction)
    return texts
