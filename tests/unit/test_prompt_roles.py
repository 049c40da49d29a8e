"""Which prompt a Cohere `input_type` or a Jina `task` names (router/prompt_roles.py), on prompt
sets the e2e model (query, passage, clustering, code.query) does not have: the document role
takes encode_document's candidates in its order, "document" first even where it is empty."""

from __future__ import annotations

import pytest

from router.prompt_roles import cohere_prompt, jina_prompt


@pytest.mark.parametrize(("prompts", "chosen"), [
    ({"document": "doc: ", "passage": "passage: ", "corpus": "corpus: "}, "document"),
    ({"document": "", "passage": "passage: "}, "document"),  # as encode_document picks it
    ({"corpus": "corpus: ", "passage": "passage: "}, "passage"),
    ({"corpus": "corpus: ", "query": "query: "}, "corpus"),
    ({"query": "query: "}, None),
])
def test_the_document_role_takes_encode_documents_candidates_in_order(
        prompts: dict[str, str], chosen: str | None) -> None:
    assert cohere_prompt("search_document", prompts) == chosen
    assert jina_prompt("retrieval.passage", prompts) == chosen
    assert jina_prompt("code.passage", prompts) == chosen


def test_a_prompt_named_as_the_task_beats_its_role() -> None:
    # jina-embeddings-v3's prompts are named as its tasks.
    prompts = {"query": "q: ", "retrieval.query": "Represent the query: ",
               "search_query": "search_query: "}
    assert jina_prompt("retrieval.query", prompts) == "retrieval.query"
    assert jina_prompt("code.query", prompts) == "query"
    assert cohere_prompt("search_query", prompts) == "search_query"
    assert cohere_prompt("search_query", {"query": "q: "}) == "query"
    assert cohere_prompt(None, prompts) is None and jina_prompt(None, prompts) is None
