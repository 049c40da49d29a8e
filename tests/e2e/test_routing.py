"""Routing under concurrency: every answer carries its own inputs' rows, in its inputs' order.

Many concurrent requests (lists with duplicates, token ids, `dimensions`, the OpenAI API in
float and base64) share small batches on two workers, so one batch holds inputs of
several requests and one request's inputs span batches and workers. Each row must equal its
input's vector computed alone (float32: batching moves a value by ~1e-6). A row handed to
another request, or a request's rows reordered, fails it."""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from tests.e2e.server import Server, serving
from tests.fixtures.tiny import save_bert_weights, write_tokenizer

ATOL = 1e-5
# Distinct texts of many lengths: the tiny tokenizer spells unknown words by character, so the
# longest (~150 tokens) are truncated at its 128.
_RANDOM = random.Random(7)
TEXTS = [f"{i} " + " ".join(_RANDOM.choice(["sunny", "cat", "zebra", "quartz", "dog", "x"])
                            for _ in range(_RANDOM.choice([1, 3, 8, 20, 60])))
         for i in range(40)]
IDS = [[_RANDOM.randrange(5, 150) for _ in range(_RANDOM.randint(1, 40))] for _ in range(6)]
# Small batches on two workers: a request's inputs are spread over several batches.
ARGS = ("--workers-per-device", "2", "--worker-threads", "1", "--max-batch-tokens", "256",
        "--max-batch-requests", "5")


def key(item: str | list[int]) -> str:
    return item if isinstance(item, str) else repr(item)


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Iterator[tuple[Server, dict[str, np.ndarray]]]:
    root = tmp_path_factory.mktemp("routing-dense")
    model = root / "model"  # a bare BertModel, mean-pooled (no sentence-transformers to load)
    model.mkdir()
    write_tokenizer(model, 128)
    save_bert_weights(model, seed=3)
    with serving("--model-id", str(model), "--pooling", "mean", *ARGS,
                 log_path=root / "server.log") as srv:
        alone = {}
        for item in [*TEXTS, *IDS]:  # one input per request, one request at a time
            response = srv.client.post("/embed", json={"inputs": [item], "normalize": False})
            assert response.status_code == 200, response.text
            alone[key(item)] = np.asarray(response.json()[0], dtype=np.float32)
        yield srv, alone


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def dense_request(rng: random.Random) -> tuple[str, dict, list, int | None, bool]:
    """A random request: (path, body, its inputs, dimensions, normalized)."""
    count = rng.choice([1, 1, 2, 3, 5, 8, 13])
    items: list = [rng.choice(IDS) if rng.random() < 0.1 else rng.choice(TEXTS)
                   for _ in range(count)]
    if count > 2:
        items[rng.randrange(1, count)] = items[0]  # a duplicate within the request
    dimensions = rng.choice([None, None, 8, 20])
    if rng.random() < 0.6:
        normalize = rng.random() < 0.5
        body = {"inputs": items, "normalize": normalize}
        if dimensions:
            body["dimensions"] = dimensions
        return "/embed", body, items, dimensions, normalize
    body = {"input": items, "encoding_format": rng.choice(["float", "base64"])}
    if dimensions:
        body["dimensions"] = dimensions
    return "/v1/embeddings", body, items, dimensions, True


def rows_of(path: str, body: dict, answer) -> np.ndarray:
    if path == "/embed":
        return np.asarray(answer, dtype=np.float32)
    data = answer["data"]
    assert [d["index"] for d in data] == list(range(len(data)))
    if body["encoding_format"] == "base64":
        return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in data])
    return np.asarray([d["embedding"] for d in data], dtype=np.float32)


async def fire(url: str, bodies: list, check, in_flight: int = 32) -> list[int]:
    """POST every (path, body, ...) with `in_flight` at once, `check` each 200 answer;
    the statuses, in order."""
    slots = asyncio.Semaphore(in_flight)
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=in_flight)) as client:
        async def one(request) -> int:
            async with slots:
                response = await client.post(request[0], json=request[1])
            if response.status_code == 200:
                check(request, response.json())
            return response.status_code

        return await asyncio.gather(*(one(r) for r in bodies))


def test_concurrent_embeddings_carry_their_own_rows_in_order(dense) -> None:
    srv, alone = dense
    rng = random.Random(11)
    requests = [dense_request(rng) for _ in range(300)]

    def check(request, answer) -> None:
        path, body, items, dimensions, normalize = request
        expected = np.stack([alone[key(item)] for item in items])[:, :dimensions]
        if normalize:
            expected = unit(expected)
        np.testing.assert_allclose(rows_of(path, body, answer), expected, atol=ATOL,
                                   err_msg=f"{path} {body}")

    statuses = asyncio.run(fire(srv.url, requests, check))
    assert statuses == [200] * len(requests)
    batches = [w["batches"] for w in srv.client.get("/info").json()["workers"]]
    assert all(b > 0 for b in batches), batches  # both workers took part
