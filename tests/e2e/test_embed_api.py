"""Every field, header and error of /embed, /health and /info over real HTTP, as TEI 1.9 answers."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.test_embed_parity import LONG


def error(response: httpx.Response, status: int, error_type: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "error_type"}
    assert body["error_type"] == error_type
    return body["error"]


def post(server, body=None, **kwargs) -> httpx.Response:
    return server.client.post("/embed", json=body, **kwargs) if body is not None else \
        server.client.post("/embed", **kwargs)


def test_health_and_info(server):
    assert server.client.get("/health").status_code == 200
    info = server.client.get("/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == 256
    assert info["max_batch_tokens"] == 4096
    assert info["max_client_batch_size"] == 64
    assert info["max_concurrent_requests"] == 512
    assert info["max_batch_requests"] is None
    assert info["auto_truncate"] is True
    assert info["model_dtype"] == "float32"
    assert info["embedding_dimension"] == 384
    assert info["normalize_module"] is True
    assert info["sparse_vectors"] is None  # /embed_sparse is refused
    assert info["prompts"] == {"query": "query: ", "passage": "passage: "}
    assert info["served_model_name"] == info["model_id"]
    assert info["sha"] is None and info["docker_label"] is None  # unknown, not ""
    [worker] = info["workers"]
    assert worker["state"] == "ready" and worker["device"] == "cpu" and worker["pid"] > 0


def test_response_headers(server):
    response = post(server, {"inputs": ["hello world", "two"]},
                    headers={"x-request-id": "abc-123"})
    assert response.status_code == 200
    headers = response.headers
    assert headers["x-request-id"] == "abc-123"
    assert headers["x-compute-type"] == "cpu"
    assert headers["x-compute-characters"] == str(len("hello world") + len("two"))
    assert headers["x-compute-tokens"] == "7"  # [CLS] hello world [SEP] + [CLS] two [SEP]
    for name in ("x-compute-time", "x-total-time", "x-tokenization-time", "x-queue-time",
                 "x-inference-time"):
        assert int(headers[name]) >= 0
    assert "server" not in headers  # as TEI: no software banner
    assert len(post(server, {"inputs": "x"}).headers["x-request-id"]) == 32
    # An id that could forge log lines (control characters) or bloat them is replaced.
    for unsafe in ("a\x1b[2Kforged", "x" * 129, "two words"):
        echoed = post(server, {"inputs": "x"}, headers={"x-request-id": unsafe})
        assert len(echoed.headers["x-request-id"]) == 32, unsafe


def test_error_responses_carry_request_id(server):
    response = post(server, {"inputs": ""}, headers={"x-request-id": "err-1"})
    assert response.status_code == 400 and response.headers["x-request-id"] == "err-1"


@pytest.mark.parametrize("inputs", ["", [""], ["ok", ""], [], [[]]])
def test_empty_inputs(server, inputs):
    message = "Input validation error: `inputs` cannot be empty"  # TEI's words
    assert error(post(server, {"inputs": inputs}), 400, "Empty") == message
    if inputs != [[]]:  # (not a /tokenize input: texts only)
        tokenize = server.client.post("/tokenize", json={"inputs": inputs})
        assert error(tokenize, 400, "Empty") == message


def test_batch_larger_than_max_client_batch_size(server):
    message = error(post(server, {"inputs": ["a"] * 65}), 422, "Validation")
    assert message == "batch size 65 > maximum allowed batch size 64"


def test_too_long_without_truncation(server):
    message = error(post(server, {"inputs": LONG, "truncate": False}), 422, "Validation")
    assert "`inputs` must have less than 256 tokens. Given: " in message
    ids = [101] + [2000] * 300 + [102]
    message = error(post(server, {"inputs": ids, "truncate": False}), 422, "Validation")
    assert message.endswith("Given: 302")
    assert post(server, {"inputs": ids, "truncate": True}).headers["x-compute-tokens"] == "256"


def test_character_limit(server):
    huge = "a" * (256 * 250 + 1)
    message = error(post(server, {"inputs": huge, "truncate": False}), 422, "Validation")
    assert "characters" in message
    assert post(server, {"inputs": huge}).status_code == 200


def test_unknown_prompt_name(server):
    message = error(post(server, {"inputs": "x", "prompt_name": "nope"}), 422, "Validation")
    assert "nope" in message and "query" in message


def test_prompt_with_token_ids_is_refused(server):
    body = {"inputs": [101, 2000, 102], "prompt_name": "query"}
    error(post(server, body), 422, "Validation")


@pytest.mark.parametrize("dims", [0, -1, 385])
def test_bad_dimensions(server, dims):
    assert "dimensions" in error(post(server, {"inputs": "x", "dimensions": dims}), 422,
                                 "Validation")


@pytest.mark.parametrize("ids", [[101, 30522, 102], [101, -1, 102]])
def test_token_ids_outside_the_vocabulary(server, ids):
    assert "out of range" in error(post(server, {"inputs": ids}), 422, "Validation")


def test_mixed_bare_ids_and_texts(server):
    error(post(server, {"inputs": [101, "text"]}), 422, "Validation")


@pytest.mark.parametrize("body,field", [
    ({"input": "x"}, "inputs"),
    ({"inputs": 3}, "inputs"),
    ({"inputs": "x", "normalize": "yes"}, "normalize"),
    ({"inputs": "x", "truncation_direction": "up"}, "truncation_direction"),
    ({"inputs": "x", "dimensions": 1.5}, "dimensions"),
])
def test_schema_errors_name_the_field(server, body, field):
    assert field in error(post(server, body), 422, "Validation")


def test_malformed_json(server):
    json_type = {"content-type": "application/json"}
    response = post(server, content=b'{"inputs": ', headers=json_type)
    assert "truncated" in error(response, 400, "BadRequest")
    lone = post(server, content=b'{"inputs": "\\ud800"}', headers=json_type)
    assert "lone UTF-16 surrogate" in error(lone, 400, "BadRequest")
    pair = post(server, content=b'{"inputs": "\\ud83d\\ude00"}', headers=json_type)
    assert pair.status_code == 200, pair.text  # an escaped surrogate pair is one character
    # 2 KB of brackets: msgspec's decoder recurses per level (a RecursionError, not a 500).
    nested = b'{"inputs": "x", "extra": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert "nested too deeply" in error(post(server, content=nested, headers=json_type), 400,
                                        "BadRequest")


def test_wrong_content_type(server):
    error(post(server, content=b'{"inputs":"x"}', headers={"content-type": "text/plain"}), 415,
          "UnsupportedMediaType")
    error(post(server, content=b'{"inputs":"x"}'), 415, "UnsupportedMediaType")


def test_payload_limit(server):
    body = {"inputs": ["word " * 10_000] * 5}  # about 250 kB > --payload-limit 200000
    error(post(server, body), 413, "PayloadTooLarge")

    def chunks():
        yield b'{"inputs": "'
        for _ in range(30):
            yield b"x" * 10_000
        yield b'"}'

    response = server.client.post("/embed", content=chunks(),
                                  headers={"content-type": "application/json"})
    error(response, 413, "PayloadTooLarge")


def test_not_found_and_method_not_allowed(server):
    error(server.client.get("/nope"), 404, "NotFound")
    error(server.client.get("/embed"), 405, "MethodNotAllowed")
    error(server.client.post("/health"), 405, "MethodNotAllowed")


def test_truncate_null_means_auto_truncate(server):
    response = post(server, {"inputs": LONG, "truncate": None})
    assert response.status_code == 200
