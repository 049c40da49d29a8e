"""The routes beyond /embed, over real HTTP on the real MiniLM, and the real openai client."""

from __future__ import annotations

import numpy as np
import pytest

from tests.e2e.test_embed_parity import SENTENCES, cosines, embed


def ok(response):
    assert response.status_code == 200, response.text
    return response.json()


def test_similarity_equals_sentence_transformers(server, st_minilm):
    body = {"inputs": {"source_sentence": SENTENCES[1], "sentences": SENTENCES}}
    response = server.client.post("/similarity", json=body)
    ours = np.asarray(ok(response))
    vectors = st_minilm.encode([SENTENCES[1], *SENTENCES])
    theirs = vectors[1:] @ vectors[0]
    assert np.abs(ours - theirs).max() < 1e-4
    assert response.headers["x-compute-tokens"]
    with_params = {**body, "parameters": {"prompt_name": "query", "truncate": True}}
    assert not np.allclose(ok(server.client.post("/similarity", json=with_params)), ours)
    # TEI reads a null `parameters` as the defaults.
    null_params = ok(server.client.post("/similarity", json={**body, "parameters": None}))
    np.testing.assert_array_equal(null_params, ours)


def test_similarity_errors(server):
    empty = server.client.post("/similarity", json={"inputs": {"source_sentence": "a",
                                                               "sentences": []}})
    assert empty.status_code == 400 and empty.json()["error_type"] == "Empty"
    missing = server.client.post("/similarity", json={"inputs": {"sentences": ["a"]}})
    assert missing.status_code == 422 and "source_sentence" in missing.json()["error"]


def test_tokenize_gives_ids_specials_and_byte_offsets(server, st_minilm):
    text = "Café au lait, s'il vous plaît"
    [tokens] = ok(server.client.post("/tokenize", json={"inputs": text}))
    assert [t["id"] for t in tokens] == st_minilm.tokenizer(text)["input_ids"]
    assert tokens[0] == {"id": 101, "text": "[CLS]", "special": True, "start": None,
                         "stop": None}
    assert tokens[-1]["special"] and tokens[-1]["text"] == "[SEP]"
    raw = text.encode()
    for token in tokens[1:-1]:
        assert not token["special"]
        assert raw[token["start"]:token["stop"]].decode() == token["text"]
    plain = ok(server.client.post("/tokenize", json={"inputs": [text, "b"],
                                                     "add_special_tokens": False}))
    assert len(plain) == 2 and not any(t["special"] for t in plain[0])
    prompted = ok(server.client.post("/tokenize", json={"inputs": "b", "prompt_name": "query"}))
    assert [t["text"] for t in prompted[0][1:-1]] == ["query", ":", "b"]
    # TEI's bound on characters per allowed token (250) holds here too: no tokenizer is kept
    # busy on one text for seconds.
    limit = server.client.get("/info").json()["max_input_length"] * 250
    assert len(ok(server.client.post("/tokenize", json={"inputs": "a " * (limit // 2)}))[0]) \
        == limit // 2 + 2
    huge = server.client.post("/tokenize", json={"inputs": ["b", "a" * (limit + 1)]})
    assert huge.status_code == 422
    assert huge.json()["error"] == (f"Input validation error: `inputs` must have less than "
                                    f"{limit} characters. Given: {limit + 1}")


def test_decode(server, st_minilm):
    ids = st_minilm.tokenizer("hello world")["input_ids"]
    assert ok(server.client.post("/decode", json={"ids": ids})) == ["hello world"]
    both = ok(server.client.post("/decode", json={"ids": [ids, ids[:2]],
                                                  "skip_special_tokens": False}))
    assert both == ["[CLS] hello world [SEP]", "[CLS] hello"]
    bad = server.client.post("/decode", json={"ids": [1, 10**6]})
    assert bad.status_code == 422 and bad.json()["error_type"] == "Validation"
    for nothing in ([], [[]]):
        refused = server.client.post("/decode", json={"ids": nothing})
        assert refused.status_code == 400
        assert refused.json()["error"] == "Input validation error: `input_ids` cannot be empty"


def test_any_origin_is_allowed_without_cors_allow_origin(server):
    # TEI's default: a browser page from anywhere may call the API (without credentials).
    headers = {"origin": "https://app.example"}
    answer = server.client.post("/embed", json={"inputs": "x"}, headers=headers)
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == "*"
    preflight = server.client.options("/embed", headers={
        **headers, "access-control-request-method": "POST",
        "access-control-request-headers": "content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"


def test_vertex_and_root_routes_embed(server):
    reference = embed(server, inputs=SENTENCES[:2])
    vertex = ok(server.client.post("/vertex", json={"instances": [
        {"inputs": SENTENCES[:2]}, {"inputs": SENTENCES[0], "normalize": False}]}))
    assert np.allclose(vertex["predictions"][0], reference, atol=1e-6)
    assert len(vertex["predictions"][1]) == 1
    for path in ("/", "/invocations"):
        routed = ok(server.client.post(path, json={"inputs": SENTENCES[:2]}))
        assert np.allclose(routed, reference, atol=1e-6)
    for path in ("/", "/ping", "/health"):
        assert server.client.get(path).status_code == 200


@pytest.fixture(scope="module")
def openai_client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_openai_client_default_base64_and_float(openai_client, server, st_minilm):
    theirs = st_minilm.encode(SENTENCES[:3])
    served = server.client.get("/info").json()["served_model_name"]
    for fmt in ("base64", "float"):
        kwargs = {} if fmt == "base64" else {"encoding_format": "float"}
        response = openai_client.embeddings.create(model="minilm", input=SENTENCES[:3], **kwargs)
        ours = np.asarray([d.embedding for d in response.data])
        assert [d.index for d in response.data] == [0, 1, 2]
        assert cosines(ours, theirs).min() >= 0.99999
        assert response.usage.prompt_tokens == response.usage.total_tokens > 0
        assert response.model == served  # what answered, not what was asked for


def test_openai_dimensions_and_token_ids(openai_client, st_minilm):
    response = openai_client.embeddings.create(model="m", input=SENTENCES[0], dimensions=32)
    assert len(response.data[0].embedding) == 32
    assert np.linalg.norm(response.data[0].embedding) == pytest.approx(1.0, abs=1e-5)
    ids = st_minilm.tokenizer(SENTENCES[0])["input_ids"]
    from_ids = openai_client.embeddings.create(model="m", input=[ids, ids])
    from_text = openai_client.embeddings.create(model="m", input=SENTENCES[0])
    assert len(from_ids.data) == 2
    assert cosines(np.asarray(from_ids.data[0].embedding),
                   np.asarray(from_text.data[0].embedding)) >= 0.99999


def test_openai_errors_have_openai_shape(server, openai_client):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.embeddings.create(model="m", input="")
    assert caught.value.status_code == 400
    response = server.client.post("/v1/embeddings", json={"input": ["a"] * 100})
    body = response.json()
    assert response.status_code == 422
    assert set(body["error"]) == {"message", "type", "code"}
    assert body["error"]["code"] == 422 and body["error"]["type"] == "Validation"


def test_openai_models(openai_client, server):
    import openai
    from openai import OpenAI

    [model] = openai_client.models.list().data
    assert model.id == server.client.get("/info").json()["served_model_name"]
    # A base_url without /v1 (as /embeddings allows) lists the same model.
    bare = OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    assert bare.models.list().data == [model]
    # One model by its id (which may hold a "/"), as models.retrieve asks for it.
    assert openai_client.models.retrieve(model.id) == model
    assert bare.models.retrieve(model.id) == model
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client.models.retrieve("some-org/other-model")
    assert caught.value.status_code == 404
    assert set(caught.value.body) == {"message", "type", "code"}  # (the client unwraps "error")


def test_jina_fields_name_the_format_or_are_refused(server):
    # Jina's clients name the format `encoding_type` / `embedding_type` (its bit-packed formats:
    # tests/e2e/test_cohere_embed.py); one it does not offer must not come back as floats.
    floats = ok(server.client.post("/v1/embeddings", json={"input": ["a b"]}))
    encoded = ok(server.client.post("/v1/embeddings", json={"input": ["a b"],
                                                             "encoding_format": "base64"}))
    for name in ("encoding_type", "embedding_type"):
        same = ok(server.client.post("/v1/embeddings", json={"input": ["a b"], name: "float"}))
        assert same["data"] == floats["data"]
        as_base64 = ok(server.client.post("/v1/embeddings", json={"input": ["a b"],
                                                                   name: "base64"}))
        assert as_base64["data"] == encoded["data"]
        refused = server.client.post("/v1/embeddings", json={"input": ["a b"], name: "int8"})
        assert refused.status_code == 422
        assert refused.json()["error"]["message"].startswith(f"`{name}` 'int8' is not supported")
    mixed = server.client.post("/v1/embeddings", json={
        "input": ["a b"], "encoding_type": "float", "embedding_type": "binary"})
    assert mixed.status_code == 422
    assert "disagree" in mixed.json()["error"]["message"]
    # An explicit null format is the default (float), as it is in OpenAI's API.
    nulled = ok(server.client.post("/v1/embeddings", json={"input": ["a b"],
                                                            "encoding_format": None}))
    assert nulled["data"] == floats["data"]


def test_embed_all_gives_every_tokens_hidden_state(server, st_minilm):
    import torch

    texts = ["hello world", "a longer sentence for the hidden states"]
    response = server.client.post("/embed_all", json={"inputs": texts})
    ours = ok(response)
    features = st_minilm.tokenize(texts)
    with torch.no_grad():
        hidden = st_minilm[0](features)["token_embeddings"]
    for index, per_token in enumerate(ours):
        length = int(features["attention_mask"][index].sum())
        assert np.asarray(per_token).shape == (length, 384)
        assert np.abs(np.asarray(per_token) - hidden[index, :length].numpy()).max() < 1e-4
    assert int(response.headers["x-compute-tokens"]) == sum(len(t) for t in ours)


# TEI's words: its TextEmbeddingsError::Backend's "Backend error: " first.
@pytest.mark.parametrize(("path", "body", "message"), [
    ("/predict", {"inputs": "x"}, "Backend error: Model is not a classifier model"),
    ("/rerank", {"query": "q", "texts": ["a"]}, "Backend error: model is not a re-ranker model"),
    ("/v1/rerank", {"query": "q", "documents": ["a"]},
     "Backend error: model is not a re-ranker model"),
    ("/embed_sparse", {"inputs": "x"},
     "Backend error: Model is not an embedding model with SPLADE pooling"),
])
def test_routes_of_other_model_kinds_answer_424(server, path, body, message):
    response = server.client.post(path, json=body)
    assert response.status_code == 424, response.text
    assert response.json() == {"error": message, "error_type": "Backend"}


def test_empty_texts_are_refused_before_the_model_kind_as_in_tei(server):
    response = server.client.post("/rerank", json={"query": "q", "texts": []})
    assert response.status_code == 400, response.text
    assert response.json() == {"error": "`texts` cannot be empty", "error_type": "Empty"}


@pytest.mark.parametrize(("path", "body"), [
    ("/predict", {"inputs": [["x"]] * 65}),
    ("/embed_sparse", {"inputs": ["x"] * 65}),
    ("/embed_sparse", {"inputs": []}),
])
def test_batch_shape_is_refused_before_the_model_kind_as_in_tei(server, path, body):
    # TEI checks an empty list and --max-client-batch-size (64 here) in the route, before
    # the model kind: 400 / 413 (422 here), not 424.
    response = server.client.post(path, json=body)
    expected = (400, "Empty") if body["inputs"] == [] else (422, "Validation")
    assert (response.status_code, response.json()["error_type"]) == expected, response.text


def test_a_trailing_slash_is_a_json_404_not_a_redirect(server):
    response = server.client.post("/embed/", json={"inputs": "x"})
    assert response.status_code == 404
    assert response.json()["error_type"] == "NotFound"


def test_vertex_with_more_instances_than_permits_is_a_422(server):
    # 513 single-input instances could never all hold a permit at once (512 by default).
    response = server.client.post("/vertex", json={"instances": [{"inputs": "x"}] * 513})
    assert response.status_code == 422, response.text
    assert "--max-concurrent-requests" in response.json()["error"]


def test_a_client_gone_mid_upload_is_not_an_error(server):
    import socket
    import time

    before = len(server.log())
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n{\"inputs\":")
        time.sleep(0.3)
    time.sleep(0.3)
    assert server.client.post("/embed", json={"inputs": "still here"}).status_code == 200
    logged = server.log()[before:]
    assert "Traceback" not in logged and "unhandled error" not in logged, logged
