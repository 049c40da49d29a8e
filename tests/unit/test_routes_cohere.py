"""Cohere's embed routes (/v1/embed, /v2/embed) in-process, over tests/unit/test_routes.py's
stand-in service: the answer's shapes, the /embed request each becomes, each refusal, and
`max_tokens`' cuts."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.test_routes import ok, serve


def test_cohere_v1_answers_floats_with_its_texts_and_billed_tokens() -> None:
    client, service = serve()
    answer = client.post("/v1/embed", json={"texts": ["a", "b"], "input_type": "search_query",
                                             "truncate": "START"}, headers={"x-request-id": "r1"})
    assert ok(answer) == {"response_type": "embeddings_floats", "id": "r1",
                          "embeddings": [[3.0, 4.0], [1.0, 0.0]], "texts": ["a", "b"],
                          "meta": {"api_version": {"version": "1"},
                                   "billed_units": {"input_tokens": 7}}}
    [asked] = service.asked
    assert (asked.inputs, asked.normalize, asked.prompt_name, asked.truncate,
            asked.truncation_direction) == (["a", "b"], True, "query", True, "left")


def test_cohere_v2_answers_by_type_with_output_dimension() -> None:
    client, service = serve()
    body = {"inputs": [{"content": [{"type": "text", "text": "a"}]}], "output_dimension": 2,
            "embedding_types": ["base64", "float"]}
    answer = ok(client.post("/v2/embed", json=body, headers={"x-request-id": "r2"}))
    assert answer == {"response_type": "embeddings_by_type", "id": "r2",
                      "embeddings": {"float": [[3.0, 4.0]], "base64": ["AABAQAAAgEA="]},
                      "texts": ["a"], "meta": {"api_version": {"version": "2"},
                                               "billed_units": {"input_tokens": 7}}}
    assert service.asked[0].dimensions == 2
    # Without `embedding_types`, floats alone, by type.
    assert ok(client.post("/v2/embed", json={"texts": ["a"]}))["embeddings"] == {
        "float": [[3.0, 4.0]]}


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    ("/v1/embed", {"texts": ["a"], "output_dimension": 2}, 422,
     "`output_dimension` is a field of Cohere's v2 embed API: send it to /v2/embed"),
    ("/v2/embed", {"texts": ["a"], "images": ["data:"]}, 422,
     "`images` are not supported: this is a text model"),
    ("/v2/embed", {"inputs": []}, 400, "`inputs` cannot be empty"),
    ("/v1/embed", {"texts": []}, 400, "`texts` cannot be empty"),
    ("/v2/embed", {"texts": ["a", ""]}, 400, "`texts[1]` cannot be empty"),
    ("/v2/embed", {"inputs": [{"content": [{"type": "text", "text": "a"}]},
                              {"content": [{"type": "text", "text": ""}]}]}, 400,
     "`inputs[1].content[0].text` cannot be empty"),
    ("/v2/embed", {"texts": ["a"], "embedding_types": []}, 422,
     "`embedding_types` cannot be empty: name one or more of float, base64, binary, ubinary, "
     "or leave it out"),
    ("/v2/embed", {"texts": ["a"], "max_tokens": 0}, 422, "`max_tokens` must be positive"),
    ("/v2/embed", {"texts": ["a"], "priority": 1}, 422,
     "`priority` is not supported: requests are served in arrival order"),
])
def test_cohere_refusals(path: str, body: dict, status: int, message: str) -> None:
    client, service = serve()
    answer = client.post(path, json=body)
    assert (answer.status_code, answer.json()["error"]) == (status, message)
    assert service.asked == []


@pytest.mark.parametrize(("truncate", "cut"), [(None, ["ab", "de"]), ("START", ["ef", "de"])])
def test_cohere_max_tokens_embeds_the_cut_texts(monkeypatch: pytest.MonkeyPatch,
                                                truncate: str | None, cut: list[str]) -> None:
    from router.routes import cohere_embed

    asked: list[tuple] = []

    async def kept_tokens(service: Any, texts: list[str], count: int,
                          direction: str) -> list[str]:
        asked.append((texts, count, direction))
        return [text[-count:] if direction == "left" else text[:count] for text in texts]

    monkeypatch.setattr(cohere_embed, "kept_tokens", kept_tokens)
    client, service = serve()
    body = {"texts": ["abcdef", "de"], "max_tokens": 2, "truncate": truncate}
    assert ok(client.post("/v2/embed", json=body))["texts"] == ["abcdef", "de"]
    assert service.asked[0].inputs == cut
    assert asked == [(["abcdef", "de"], 2, "right" if truncate is None else "left")]
    none = client.post("/v2/embed", json={**body, "truncate": "NONE"})
    assert none.json()["error"] == (
        "`texts[0]` has more than `max_tokens` (2) tokens, and `truncate` is NONE")
    short = client.post("/v2/embed", json={"texts": ["de"], "max_tokens": 2, "truncate": "NONE"})
    assert short.status_code == 200
    # At the model's limit `max_tokens` cuts nothing: the limit cuts first.
    service.rules.max_input_length = 2
    assert ok(client.post("/v2/embed", json=body))["texts"] == ["abcdef", "de"]
    assert service.asked[-1].inputs == ["abcdef", "de"] and len(asked) == 3
    # More texts than a client may send at once are refused before they are tokenized.
    service.rules.max_input_length = 512
    many = client.post("/v2/embed", json={"texts": ["a"] * 5, "max_tokens": 2})
    assert (many.status_code, len(asked)) == (422, 3)


@pytest.mark.parametrize(("truncate", "bounded"), [("END", "a" * 250), ("START", "b" * 250)])
def test_cohere_max_tokens_tokenizes_only_the_side_it_keeps(
        monkeypatch: pytest.MonkeyPatch, truncate: str, bounded: str) -> None:
    # TEI's bound of 250 characters a token: at most `max_tokens` * 250 characters of each
    # text, on the side `truncate` keeps, reach the tokenizer.
    from router.routes import cohere_embed

    asked: list[list[str]] = []

    async def kept_tokens(service: Any, texts: list[str], count: int,
                          direction: str) -> list[str]:
        asked.append(texts)
        return ["c"]

    monkeypatch.setattr(cohere_embed, "kept_tokens", kept_tokens)
    client, service = serve()
    body = {"texts": ["a" * 300 + "b" * 300], "max_tokens": 1, "truncate": truncate}
    ok(client.post("/v2/embed", json=body))
    assert (asked, service.asked[0].inputs) == ([[bounded]], ["c"])
