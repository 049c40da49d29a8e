"""The OpenAI / Jina and Cohere embed routes' fields as the /embed request they become, read
without a server (tests/e2e/test_cohere_embed.py and test_routes.py serve them)."""

from __future__ import annotations

import pytest

from router.routes.cohere_embed import embed_request
from router.routes.openai import written_as
from router.schemas import CohereEmbedRequest, OpenAIEmbedRequest
from shared.errors import EmbedServeError


@pytest.mark.parametrize(("truncate", "expected"), [
    (None, (True, "right")),  # Cohere's default with max_tokens: END
    ("END", (True, "right")), ("START", (True, "left")), ("NONE", (False, "right")),
])
def test_max_tokens_without_truncate_cuts_the_end(truncate: str | None,
                                                  expected: tuple[bool, str]) -> None:
    # (a server started with --auto-truncate false still cuts: the client asked for cuts)
    body = CohereEmbedRequest(texts=["a"], max_tokens=8, truncate=truncate)  # type: ignore[arg-type]
    asked = embed_request(body, ["a"], {})
    assert (asked.truncate, asked.truncation_direction) == expected


def test_without_max_tokens_or_truncate_the_server_decides() -> None:
    asked = embed_request(CohereEmbedRequest(texts=["a"]), ["a"], {})
    assert asked.truncate is None


def test_jinas_two_spellings_of_the_format_may_both_be_sent_when_they_agree() -> None:
    body = OpenAIEmbedRequest(input="a", encoding_type="binary", embedding_type="binary")
    assert written_as(body) == "binary"
    with pytest.raises(EmbedServeError, match="disagree"):
        written_as(OpenAIEmbedRequest(input="a", encoding_type="ubinary",
                                      embedding_type="binary"))


def test_an_unsupported_format_is_named_as_sent() -> None:
    with pytest.raises(EmbedServeError) as refused:
        written_as(OpenAIEmbedRequest(input="a", encoding_type="int8", embedding_type="int8"))
    assert refused.value.message == ("`embedding_type` 'int8' is not supported: choose among "
                                     "float, base64, binary, ubinary")
    with pytest.raises(EmbedServeError) as refused:
        written_as(OpenAIEmbedRequest(input="a", encoding_type="int8"))
    assert refused.value.message.startswith("`encoding_type` 'int8' is not supported")
