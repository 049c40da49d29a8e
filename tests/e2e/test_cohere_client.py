"""Cohere's own Python SDK, unchanged, against /v1/rerank (cohere.Client) and /v2/rerank
(cohere.ClientV2, which langchain-cohere's CohereRerank wraps): the requests it sends are
accepted, the replies parse into its models, and errors come back as its typed errors."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import cohere
import pytest
from cohere.core.api_error import ApiError
from cohere.errors import BadRequestError, UnauthorizedError, UnprocessableEntityError

from tests.e2e.server import Server, serving
from tests.fixtures.heads import LABELS, make_tiny_classifier

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUERY = "what is the capital of france?"
DOCS = ["Paris is the capital and largest city of France.", "hi", "the cat sat on the dog",
        "France's capital city is Paris, on the Seine."]
LONG = "the capital of france is paris " * 12


@pytest.fixture(scope="module")
def reranker(tmp_path_factory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("cohere")
    model = make_tiny_classifier(root / "model", ["score"], seed=1)
    with serving("--model-id", str(model), "--max-batch-tokens", "512", "--api-key", KEY,
                 log_path=root / "log") as srv:
        yield srv


def v1(srv: Server, key: str = KEY) -> cohere.Client:
    # The SDK sends its api key as `Authorization: Bearer`, the header --api-key checks.
    return cohere.Client(api_key=key, base_url=srv.url)


def v2(srv: Server, key: str = KEY) -> cohere.ClientV2:
    return cohere.ClientV2(api_key=key, base_url=srv.url)


def ranked(srv: Server, texts: list[str]) -> list[tuple[int, float]]:
    """TEI's /rerank: (index, score) best first, the oracle the Cohere routes must repeat."""
    response = srv.client.post("/rerank", json={"query": QUERY, "texts": texts}, headers=AUTH)
    assert response.status_code == 200, response.text
    return [(r["index"], r["score"]) for r in response.json()]


def pairs(response) -> list[tuple[int, float]]:
    return [(r.index, r.relevance_score) for r in response.results]


def check_reply(response, srv: Server, version: str) -> None:
    # Cohere's id (the request's x-request-id) and meta, and the Jina-shaped extras the SDK keeps.
    assert isinstance(response.id, str) and len(response.id) == 32
    assert response.model == srv.client.get("/info", headers=AUTH).json()["model_id"]
    assert response.usage["total_tokens"] > 0
    assert response.meta.api_version.version == version
    assert response.meta.billed_units.input_tokens == response.usage["total_tokens"]


def test_v1_rerank(reranker) -> None:
    expected = ranked(reranker, DOCS)
    client = v1(reranker)
    response = client.rerank(query=QUERY, documents=DOCS)
    assert isinstance(response, cohere.RerankResponse)
    assert pairs(response) == expected  # the same float32 numbers, the same order
    assert all(r.document is None for r in response.results)
    check_reply(response, reranker, "1")

    top = client.rerank(query=QUERY, documents=[{"text": d} for d in DOCS], top_n=2,
                        return_documents=True, model="rerank-english-v3.0")
    assert pairs(top) == expected[:2]
    assert [r.document.text for r in top.results] == [DOCS[i] for i, _ in expected[:2]]
    # rank_fields naming `text` only is what is done anyway; max_chunks_per_doc 1 is the
    # default (a document that fits is one piece anyway).
    same = client.rerank(query=QUERY, documents=[{"text": d, "title": "t"} for d in DOCS],
                         rank_fields=["text"], max_chunks_per_doc=1)
    assert pairs(same) == expected
    # The SDK sends an option passed as None as a null, which Cohere's API reads as its default.
    nulled = client.rerank(query=QUERY, documents=DOCS, return_documents=None)
    assert pairs(nulled) == expected and all(r.document is None for r in nulled.results)


def test_objects_come_back_whole_and_need_a_text(reranker) -> None:
    # Cohere v1: "the text field is required and all other fields will be preserved".
    documents = [{"text": d, "title": f"doc {i}", "meta": {"n": i}} for i, d in enumerate(DOCS)]
    reply = reranker.client.post("/v1/rerank", headers=AUTH, json={
        "query": QUERY, "documents": documents, "return_documents": True})
    assert reply.status_code == 200, reply.text
    for result in reply.json()["results"]:
        assert result["document"] == documents[result["index"]]
    for bad in ({"title": "no text"}, {"text": 3}):
        refused = reranker.client.post("/v1/rerank", headers=AUTH, json={
            "query": QUERY, "documents": [DOCS[0], bad]})
        assert refused.status_code == 422
        assert "`documents[1]`" in refused.json()["error"]


def test_v2_rerank(reranker) -> None:
    expected = ranked(reranker, DOCS)
    client = v2(reranker)
    response = client.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS, top_n=3)
    assert isinstance(response, cohere.V2RerankResponse)
    assert pairs(response) == expected[:3]
    check_reply(response, reranker, "2")
    everything = client.rerank(model="any", query=QUERY, documents=DOCS, top_n=len(DOCS) + 5)
    assert pairs(everything) == expected
    # The call langchain-cohere's CohereRerank makes: unset options sent as nulls.
    nulls = client.rerank(model="any", query=QUERY, documents=DOCS, top_n=None,
                          max_tokens_per_doc=None)
    assert pairs(nulls) == expected


def test_max_tokens_per_doc_scores_each_document_on_its_first_tokens(reranker) -> None:
    client = v2(reranker)
    whole = client.rerank(model="any", query=QUERY, documents=[LONG, DOCS[1]])
    cut = client.rerank(model="any", query=QUERY, documents=[LONG, DOCS[1]],
                        max_tokens_per_doc=5)
    tokens = reranker.client.post("/tokenize", json={"inputs": LONG,
                                                     "add_special_tokens": False},
                                  headers=AUTH).json()[0]
    first = LONG.encode()[:tokens[4]["stop"]].decode()
    assert sorted(pairs(cut)) == sorted(ranked(reranker, [first, DOCS[1]]))
    assert pairs(whole) != pairs(cut)
    assert cut.usage["total_tokens"] < whole.usage["total_tokens"]
    # At or past the model's own limit it changes nothing (Cohere's default is 4096).
    assert pairs(client.rerank(model="any", query=QUERY, documents=[LONG, DOCS[1]],
                               max_tokens_per_doc=4096)) == pairs(whole)


def pieces(srv: Server, query: str, document: str, limit: int) -> list[str]:
    """The oracle's cut of `document` for `max_chunks_per_doc`: consecutive runs of the tokens
    that fit beside the query and a BERT pair's 3 special tokens, each from its first token's
    start (byte offsets: the texts here are ASCII), at most `limit` of them."""
    def tokens(text: str) -> list[dict]:
        return srv.client.post("/tokenize", json={"inputs": text, "add_special_tokens": False},
                               headers=AUTH).json()[0]
    room = srv.client.get("/info", headers=AUTH).json()["max_input_length"] - 3 - len(
        tokens(query))
    starts = [0, *(t["start"] for t in tokens(document)[room::room])]
    ends = [*starts[1:], len(document)]
    return [document[a:b] for a, b in zip(starts, ends, strict=True)][:limit]


def test_max_chunks_per_doc_ranks_a_long_document_on_its_best_piece(reranker) -> None:
    # Cohere v1: a document longer than the window is scored in pieces, on its best one. The
    # answer sits past the first window, where truncation (the default) never sees it.
    document = "a dog ran in the park under the trees " * 12 + "france's capital is paris."
    cut = pieces(reranker, QUERY, document, limit=10)
    assert len(cut) == 3 and "".join(cut) == document
    scores = dict(ranked(reranker, cut))
    assert max(scores, key=scores.__getitem__) == 2  # the seed-1 model agrees: the test's point
    client = v1(reranker)
    chunked = dict(pairs(client.rerank(query=QUERY, documents=[document, DOCS[1]],
                                       max_chunks_per_doc=10)))
    assert chunked[0] == pytest.approx(max(scores.values()), rel=1e-6)
    assert chunked[1] == pytest.approx(dict(ranked(reranker, [document, DOCS[1]]))[1], rel=1e-6)
    # At most that many pieces, in order; 1 (Cohere's default) is the document truncated.
    two = dict(pairs(client.rerank(query=QUERY, documents=[document], max_chunks_per_doc=2)))
    assert two[0] == pytest.approx(max(scores[0], scores[1]), rel=1e-6)
    one = client.rerank(query=QUERY, documents=[document], max_chunks_per_doc=1)
    assert pairs(one) == pairs(client.rerank(query=QUERY, documents=[document]))
    # Every piece is computed, and counted.
    whole = client.rerank(query=QUERY, documents=cut, max_chunks_per_doc=10)
    assert client.rerank(query=QUERY, documents=[document], max_chunks_per_doc=10).usage[
        "total_tokens"] == whole.usage["total_tokens"]


def test_max_chunks_per_doc_refusals_and_a_query_that_fills_the_window(reranker) -> None:
    with pytest.raises(UnprocessableEntityError) as refused:
        v1(reranker).rerank(query=QUERY, documents=DOCS, max_chunks_per_doc=0)
    assert error(refused.value) == "`max_chunks_per_doc` must be positive"
    # A query that fills the window leaves no room for a piece: each document is scored as
    # without pieces (the pair truncated), not refused.
    query = "paris " * 200
    full = v1(reranker).rerank(query=query, documents=DOCS, max_chunks_per_doc=2)
    assert pairs(full) == pairs(v1(reranker).rerank(query=query, documents=DOCS))


def test_max_tokens_per_doc_keeps_the_batch_checks_and_their_count(tmp_path) -> None:
    # Cutting tokenizes the documents before `run`: the request must still meet run's checks
    # first (batch size before --max-concurrent-requests), counted as run counts them.
    model = make_tiny_classifier(tmp_path / "model", ["score"], seed=1)
    with serving("--model-id", str(model), "--max-client-batch-size", "4",
                 "--max-concurrent-requests", "6", log_path=tmp_path / "log") as srv:
        response = srv.client.post("/v2/rerank", json={
            "query": QUERY, "documents": [LONG] * 7, "max_tokens_per_doc": 2})
        assert response.status_code == 422
        assert "batch size 7 > maximum allowed batch size 4" in response.json()["error"]
        values = srv.metrics()
        assert values['te_request_failure{err="batch_size"}'] == 1
        # Pieces count against --max-concurrent-requests, documents against the batch size.
        documents = {"query": QUERY, "documents": [LONG * 4] * 4, "max_chunks_per_doc": 3}
        response = srv.client.post("/v1/rerank", json=documents)
        assert response.status_code == 422
        assert "makes 12 pieces of the 4 documents" in response.json()["error"]
        documents["max_chunks_per_doc"] = 1
        assert srv.client.post("/v1/rerank", json=documents).status_code == 200
        # One document in 5 pieces is one input to --max-client-batch-size 4, counted as one
        # request (a re-rank is a batch in te_request_count, as TEI counts it).
        before = srv.metrics()
        one = {"query": QUERY, "documents": [LONG * 8], "max_chunks_per_doc": 5}
        response = srv.client.post("/v1/rerank", json=one)
        assert response.status_code == 200, response.text
        after = srv.metrics()
        for method, grew in (("batch", 1), ("single", 0)):
            key = f'te_request_success{{method="{method}"}}'
            assert after[key] == before[key] + grew


def test_async_client(reranker) -> None:
    client = cohere.AsyncClientV2(api_key=KEY, base_url=reranker.url)
    response = asyncio.run(client.rerank(model="any", query=QUERY, documents=DOCS))
    assert pairs(response) == ranked(reranker, DOCS)


def error(exc: ApiError) -> str:
    """Our error message as the SDK hands it over: the JSON body as a dict, or (SDKs before
    ~5.15, on 422) parsed into its error model, which keeps unknown fields as attributes."""
    return exc.body["error"] if isinstance(exc.body, dict) else exc.body.error


def test_errors_are_the_sdks_typed_errors(reranker) -> None:
    client = v2(reranker)
    with pytest.raises(BadRequestError) as empty:
        client.rerank(model="any", query=QUERY, documents=[])
    assert empty.value.status_code == 400
    assert error(empty.value) == "`documents` cannot be empty"
    for options, message in [({"top_n": 0}, "`top_n` must be positive"),
                             ({"max_tokens_per_doc": 0}, "`max_tokens_per_doc` must be positive")]:
        with pytest.raises(UnprocessableEntityError) as refused:
            client.rerank(model="any", query=QUERY, documents=DOCS, **options)
        assert error(refused.value) == message
    with pytest.raises(UnprocessableEntityError) as fields:
        v1(reranker).rerank(query=QUERY, documents=[{"text": "a", "title": "b"}],
                            rank_fields=["title", "text"])
    assert "`rank_fields`" in error(fields.value)
    with pytest.raises(UnprocessableEntityError) as no_text:
        v1(reranker).rerank(query=QUERY, documents=[{"title": "b"}])
    assert "`documents[0]` must be a string or an object with a string `text`" in error(
        no_text.value)
    with pytest.raises(UnauthorizedError) as unauthorized:
        v2(reranker, key="wrong").rerank(model="any", query=QUERY, documents=DOCS)
    assert unauthorized.value.status_code == 401


def test_not_a_reranker_is_a_424(tmp_path) -> None:
    model = make_tiny_classifier(tmp_path / "model", LABELS)
    # The SDK has no class of its own for 424: its base ApiError, with our body.
    with (serving("--model-id", str(model), "--max-batch-tokens", "512",
                  log_path=tmp_path / "log") as srv,
          pytest.raises(ApiError) as refused):
        cohere.ClientV2(api_key="unused", base_url=srv.url).rerank(
            model="any", query=QUERY, documents=DOCS)
    assert refused.value.status_code == 424
    assert refused.value.body == {"error": "Backend error: model is not a re-ranker model",
                                  "error_type": "Backend"}
