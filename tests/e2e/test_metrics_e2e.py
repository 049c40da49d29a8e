"""/metrics of the real `embedserve` with two CPU workers: every family from start-up, counts
that match the traffic sent, batches and tokens that add up across workers, and the same
registry on --prometheus-port."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess

import httpx
import pytest

from tests.e2e.server import EMBEDSERVE, free_port, serving
from tests.fixtures.prometheus import samples, total
from tests.fixtures.tiny import make_tiny_bert

CLIENTS = 16
SINGLES_PER_CLIENT = 3
BATCHES_PER_CLIENT = 2
BATCH = 4


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "model", max_seq_length=64)


@pytest.fixture(scope="module")
def metered(tiny_model, tmp_path_factory):
    """A tiny model on two CPU workers with a Prometheus port; its /metrics before any
    inference request."""
    model = tiny_model
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "metrics.log"
    with serving("--model-id", str(model), "--device", "cpu", "--workers-per-device", "2",
                 "--prometheus-port", str(port), log_path=log) as srv:
        yield srv, port, srv.client.get("/metrics")


def test_every_family_is_served_before_the_first_request(metered) -> None:
    _, _, first = metered
    assert first.status_code == 200
    assert first.headers["content-type"].startswith("text/plain; version=0.0.4")
    values = samples(first.text)
    for family in ("te_request_count", "te_request_success", "te_request_failure",
                   "te_request_duration_count", "te_embed_count", "te_predict_count",
                   "te_request_input_length_count", "te_queue_size", "te_batch_next_size_count",
                   "te_batch_next_tokens_count", "te_batch_inference_duration_count"):
        assert total(values, family) == 0, family
    assert values['te_request_count{method="single"}'] == 0
    assert values['te_request_failure{err="overloaded"}'] == 0
    for worker in ("0", "1"):
        assert values[f'te_worker_up{{worker="{worker}"}}'] == 1
        assert values[f'te_worker_batches{{worker="{worker}"}}'] == 0
        assert values[f'te_worker_restarts{{worker="{worker}"}}'] == 0


def test_counts_match_the_traffic_across_two_workers(metered) -> None:
    srv, _, _ = metered

    def client_traffic(index: int) -> list[int]:
        tokens = []
        for i in range(SINGLES_PER_CLIENT):
            answer = srv.client.post("/embed", json={"inputs": f"client {index} says {i}"})
            assert answer.status_code == 200, answer.text
            tokens.append(int(answer.headers["x-compute-tokens"]))
        for i in range(BATCHES_PER_CLIENT):
            inputs = [f"text {index} {i} {j} " * (j + 1) for j in range(BATCH)]
            answer = srv.client.post("/embed", json={"inputs": inputs})
            assert answer.status_code == 200, answer.text
            tokens.append(int(answer.headers["x-compute-tokens"]))
        return tokens

    # Concurrent clients: while one batch computes on a worker, the next goes to the other.
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        tokens = sum(sum(t) for t in pool.map(client_traffic, range(CLIENTS)))
    too_many = srv.client.post("/embed", json={"inputs": ["x"] * 33})  # > --max-client-batch
    assert too_many.status_code == 422
    wrong_route = srv.client.post("/predict", json={"inputs": "x"})
    assert wrong_route.status_code == 424
    # Refused before any input is admitted: counted all the same (not in te_request_count).
    for refused, status in [({"inputs": "x", "dimensions": 0}, 422), ({"inputs": []}, 400)]:
        assert srv.client.post("/embed", json=refused).status_code == status

    values = srv.metrics()
    singles, batches = CLIENTS * SINGLES_PER_CLIENT, CLIENTS * BATCHES_PER_CLIENT
    inputs = singles + batches * BATCH
    assert values['te_request_count{method="single"}'] == singles
    assert values['te_request_count{method="batch"}'] == batches + 1
    assert values['te_request_success{method="single"}'] == singles
    assert values['te_request_success{method="batch"}'] == batches
    # The oversized batch under TEI's own label, apart from the other validation errors.
    assert values['te_request_failure{err="validation"}'] == 2
    assert values['te_request_failure{err="batch_size"}'] == 1
    assert values['te_request_failure{err="model_type"}'] == 1
    assert values['te_request_failure{err="inference"}'] == 0
    assert values["te_request_duration_count"] == singles + batches
    assert values["te_embed_count"] == values["te_embed_success"] == inputs
    assert values["te_embed_duration_count"] == inputs
    assert values["te_predict_count"] == 0
    assert values["te_request_input_length_count"] == inputs
    assert values["te_request_input_length_sum"] == tokens
    assert values["te_queue_size"] == 0
    # Every input went into exactly one batch, and every batch into exactly one worker.
    formed = values["te_batch_next_size_count"]
    assert values["te_batch_next_size_sum"] == inputs
    assert values["te_batch_next_tokens_sum"] == tokens
    assert values["te_batch_inference_duration_count"] == formed
    assert total(values, "te_worker_batches") == formed
    assert total(values, "te_worker_tokens") == tokens
    for worker in ("0", "1"):
        assert values[f'te_worker_batches{{worker="{worker}"}}'] > 0, values
        assert values[f'te_worker_state{{state="ready",worker="{worker}"}}'] == 1
        assert values[f'te_worker_in_flight{{worker="{worker}"}}'] == 0


def test_the_prometheus_port_serves_the_same_registry_and_nothing_else(metered) -> None:
    srv, port, _ = metered
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as side:
        second = side.get("/metrics")
        main = srv.client.get("/metrics")
        assert second.status_code == 200
        assert second.headers["content-type"] == main.headers["content-type"]
        # No traffic in between: every count is the same (durations are histograms of the
        # same observations, so they agree too).
        assert samples(second.text) == samples(main.text)
        for refused, status in ((side.post("/embed", json={"inputs": "x"}), 404),
                                (side.get("/health"), 404), (side.post("/metrics"), 405)):
            assert refused.status_code == status
            assert refused.json()["error_type"] in ("NotFound", "MethodNotAllowed")


def test_a_taken_prometheus_port_stops_start_up_with_a_clear_error(tiny_model) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [EMBEDSERVE, "--model-id", str(tiny_model), "--hostname", "127.0.0.1",
             "--port", str(free_port()), "--prometheus-port", str(port)],
            capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    assert f"--prometheus-port 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_tokenizer_routes_count_their_refusals_as_tei(metered) -> None:
    """/tokenize and /decode are no inference requests (te_request_count stays), but their
    refusals count in te_request_failure, as TEI's handlers and Infer::tokenize/decode do."""
    srv, _, _ = metered
    before = srv.metrics()
    refusals = [("/tokenize", {"inputs": []}), ("/tokenize", {"inputs": ["x"] * 33}),
                ("/tokenize", {"inputs": "x", "prompt_name": "nope"}),
                ("/decode", {"ids": []}), ("/decode", {"ids": [[1]] * 33})]
    for path, body in refusals:
        answer = srv.client.post(path, json=body)
        assert 400 <= answer.status_code < 500, (path, body, answer.text)
    assert srv.client.post("/tokenize", json={"inputs": "x"}).status_code == 200
    assert srv.client.post("/decode", json={"ids": [1, 2]}).status_code == 200
    after = srv.metrics()
    assert total(after, "te_request_failure") - total(before, "te_request_failure") == 5
    assert after['te_request_failure{err="validation"}'] == \
        before['te_request_failure{err="validation"}'] + 2
    # The unknown prompt, as TEI's Infer::tokenize counts what its tokenization refuses.
    assert after['te_request_failure{err="tokenization"}'] == \
        before['te_request_failure{err="tokenization"}'] + 1
    assert after['te_request_failure{err="batch_size"}'] == \
        before['te_request_failure{err="batch_size"}'] + 2
    assert total(after, "te_request_count") == total(before, "te_request_count")


def test_the_method_label_is_the_requests_shape_as_teis(metered) -> None:
    """TEI counts a list of inputs as a batch, of one too, and a text as single."""
    srv, _, _ = metered
    before = srv.metrics()
    for body, route in [({"inputs": ["one text in a list"]}, "/embed"),
                        ({"inputs": ["one text in a list"]}, "/embed_all"),
                        ({"inputs": "a text"}, "/embed"),
                        ({"input": ["one text in a list"]}, "/v1/embeddings")]:
        assert srv.client.post(route, json=body).status_code == 200
    after = srv.metrics()

    def grew(key: str) -> float:
        return after[key] - before[key]

    assert grew('te_request_count{method="batch"}') == 3
    assert grew('te_request_count{method="single"}') == 1
    assert grew('te_request_success{method="batch"}') == 3
