"""Where pooling starts in each input, for a model whose Pooling leaves its prompt out
(sentence-transformers' `include_prompt: false`, INSTRUCTOR-style models).

sentence-transformers measures the prompt once, by tokenizing it alone: its token count, less
a trailing special token (the [SEP] / EOS the text's own encoding has at its end instead, or a
special token the prompt itself ends with, as a decoder's BOS-only framing leaves it), is
how many leading tokens of every prompted input its Pooling masks. The count is taken as it
is, not matched against the input's tokens, because that is what gives its numbers.
"""

from __future__ import annotations

from typing import Any

# (tokenizer id, prompt, special tokens) -> (the tokenizer, its leading special tokens, the
# prompt's tokens in all). The tokenizer is kept so that its id is never another's: a process
# holds one in production, tests load several.
_measured: dict[tuple[int, str, bool], tuple[Any, int, int]] = {}


def _measure(tokenizer: Any, prompt: str, special_tokens: bool) -> tuple[int, int]:
    key = (id(tokenizer), prompt, special_tokens)
    if key not in _measured:
        tokenizer.no_truncation()
        encoding = tokenizer.encode(prompt, add_special_tokens=special_tokens)
        mask = encoding.special_tokens_mask
        # (the mask marks only the post-processor's tokens; sentence-transformers asks whether
        # the last id is a special token's, wherever it came from)
        special_ids = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        count = len(mask) - (1 if mask and (mask[-1] or encoding.ids[-1] in special_ids) else 0)
        leading = next((i for i, special in enumerate(mask) if not special), len(mask))
        _measured[key] = (tokenizer, min(leading, count), count)
    _, leading, count = _measured[key]
    return leading, count


def prompt_starts(tokenizer: Any, prompt: str, encodings: list[Any], direction: str,
                  special_tokens: bool = True) -> list[int]:
    """For each encoding of a prompted text, the index of the first token pooling counts.

    A cut on the left (`truncate_direction: left`) takes the prompt's tokens first, so fewer
    of them are left to skip; the cut is read from the encoding's overflowing pieces, each of
    which carries the special tokens again. At least the last token is always pooled: a text
    cut down to its prompt (or a prompt with no text after it) still gets a vector, where
    sentence-transformers would pool nothing."""
    leading, count = _measure(tokenizer, prompt, special_tokens)
    added = tokenizer.num_special_tokens_to_add(False) if special_tokens else 0
    starts = []
    for encoding in encodings:
        skip = count
        if direction == "left" and encoding.overflowing:
            cut = sum(len(piece.ids) - added for piece in encoding.overflowing)
            skip = leading + max(0, count - leading - cut)
        starts.append(min(skip, len(encoding.ids) - 1))
    return starts
