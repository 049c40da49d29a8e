"""Errors that name a request field: TEI's name by default, another API's when its route
renders them (shared/errors.py, router/routes.fields_named)."""

from __future__ import annotations

import pytest

from router.inputs import InputRules, resolve_prompt
from router.routes import fields_named
from shared.errors import EmbedServeError, ErrorType, Field, about, tei_names


def openai(field: Field) -> str:
    return "`input`" if field.index is None else f"`input[{field.index}]`"


def test_the_message_is_teis_until_a_route_names_the_field_its_way() -> None:
    error = about(Field("inputs", 2), ErrorType.EMPTY, "Input validation error: {field} cannot "
                  "be empty")
    assert error.message == "Input validation error: `inputs` cannot be empty"
    named = error.named(openai)
    assert named.message == "Input validation error: `input[2]` cannot be empty"
    assert named.error_type is ErrorType.EMPTY and named.field == Field("inputs", 2)
    assert error.at(0).named(openai).message == "Input validation error: `input[0]` cannot be " \
        "empty"
    assert error.named(tei_names).message == error.message


def test_a_client_text_in_the_message_is_not_a_template() -> None:
    rules = InputRules(max_input_length=8, max_client_batch_size=4, vocab_size=10,
                       prompts={"query": "q: "}, default_prompt=None)
    with pytest.raises(EmbedServeError) as refused:
        resolve_prompt("{field} {0}", rules)
    assert refused.value.message.startswith(
        "Input validation error: `prompt_name` is set to `{field} {0}` but it was not found")
    assert refused.value.named(lambda field: "`task`").message.startswith(
        "Input validation error: `task` is set to `{field} {0}` but")


def test_fields_named_renders_only_errors_about_a_field() -> None:
    with pytest.raises(EmbedServeError) as refused, fields_named(openai):
        raise about(Field("inputs"), ErrorType.VALIDATION, "{field} is wrong")
    assert refused.value.message == "`input` is wrong"
    plain = EmbedServeError(ErrorType.VALIDATION, "batch size 9 > maximum allowed batch size 8")
    with pytest.raises(EmbedServeError) as kept, fields_named(openai):
        raise plain
    assert kept.value is plain


@pytest.mark.parametrize(("sent", "name"), [
    ("a", "`input`"), ([1, 2, 3], "`input`"), (["a", "b"], "`input[1]`"),
    ([[1, 2], "b"], "`input[1]`")])
def test_openai_names_an_input_by_index_only_in_a_list_of_inputs(sent, name: str) -> None:
    from router.routes.openai import openai_names
    from router.schemas import OpenAIEmbedRequest

    names = openai_names(OpenAIEmbedRequest(input=sent))
    # (a single text or token-id list is input 0 to the service: the client sent no list)
    assert names(Field("inputs", 0 if name == "`input`" else 1)) == name
    assert names(Field("dimensions")) == "`dimensions`"
    assert names(Field("prompt_name")) == "`task`"


def test_cohere_rerank_names_the_query_and_the_document() -> None:
    from router.routes.heads import cohere_rerank_names

    assert cohere_rerank_names(Field("texts")) == "`documents`"
    assert cohere_rerank_names(Field("inputs", 3)) == "`query` and `documents[3]`"
    # (the inputs as a whole: the documents, as `texts` are)
    assert cohere_rerank_names(Field("inputs")) == "`documents`"
    assert cohere_rerank_names(Field("prompt_name")) == "`prompt_name`"
