"""Start-up, faults and shutdown of the real `embedserve` process tree."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.server import EMBEDSERVE, Server, gone, wait_for
from tests.e2e.test_embed_parity import LONG
from tests.fixtures.prometheus import total

SLOW_BATCH = {"inputs": [f"{i} {LONG}" for i in range(64)]}  # 64 x 256 tokens: seconds on CPU


def metric(srv: Server, name: str) -> float:
    """The sum of a /metrics family's samples (over its labels)."""
    return total(srv.metrics(), name)


def until_computing(srv: Server) -> None:
    """Until a batch is in a worker: a fixed sleep is too short on a loaded machine."""
    wait_for(lambda: metric(srv, "te_worker_in_flight") > 0, timeout=60, interval=0.02)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([EMBEDSERVE, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture
def fresh_server(minilm_dir, tmp_path):
    servers: list[Server] = []

    def start(*args: str, model: Path | None = minilm_dir,
              env: dict[str, str] | None = None) -> Server:
        model_args = ("--model-id", str(model)) if model else ()
        srv = Server(*model_args, "--max-batch-tokens", "4096", "--max-client-batch-size", "64",
                     *args, env=env,
                     log_path=tmp_path / f"server{len(servers)}.log")
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


def test_health_is_503_while_loading_then_200(fresh_server):
    srv = fresh_server()
    first = None
    deadline = time.monotonic() + 60
    while first is None and time.monotonic() < deadline:
        try:
            first = srv.client.get("/health")
        except httpx.TransportError:
            time.sleep(0.05)
    assert first is not None and first.status_code == 503, first
    assert first.json()["error_type"] == "Unhealthy"
    srv.wait_healthy()
    embed = srv.client.post("/embed", json={"inputs": "x"})
    assert embed.status_code == 200


def test_sigkill_of_the_worker_fails_in_flight_fast_and_recovers(fresh_server):
    srv = fresh_server().wait_healthy()
    [worker_pid] = srv.worker_pids()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(srv.client.post, "/embed", json=SLOW_BATCH)
        until_computing(srv)
        killed_at = time.monotonic()
        os.kill(worker_pid, signal.SIGKILL)
        response = pending.result(timeout=30)
    # Seen at once (the worker's pipe closes), not at the heartbeat's limit (--worker-timeout,
    # 30 s): the margin is for a loaded machine.
    assert time.monotonic() - killed_at < 5.0
    assert response.status_code == 424, response.text
    assert response.json()["error_type"] == "Backend"
    assert "died" in response.json()["error"]
    wait_for(lambda: srv.client.get("/health").status_code == 200, timeout=60)
    assert srv.worker_pids() != [worker_pid]
    assert srv.client.post("/embed", json={"inputs": "after the crash"}).status_code == 200
    assert srv.process.poll() is None


def test_sigterm_mid_request_finishes_it_and_exits_zero(fresh_server):
    # (a grace the batch's four pieces fit in on a loaded machine: past the default 30 s the
    # drain answers 503, rightly, and this test would see that instead)
    srv = fresh_server("--shutdown-grace", "120").wait_healthy()
    [worker_pid] = srv.worker_pids()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(srv.client.post, "/embed", json=SLOW_BATCH)
        until_computing(srv)
        srv.process.send_signal(signal.SIGTERM)
        response = pending.result(timeout=150)
    assert response.status_code == 200, response.text
    assert len(response.json()) == 64
    assert srv.process.wait(timeout=30) == 0
    with pytest.raises(ProcessLookupError):  # no orphaned worker
        os.kill(worker_pid, 0)


def test_default_model_without_model_id(fresh_server):
    srv = fresh_server(model=None).wait_healthy()
    info = srv.client.get("/info").json()
    assert info["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert srv.client.post("/embed", json={"inputs": "What is Deep Learning?"}).status_code == 200
    assert srv.stop() == 0
    # A plain start, request and stop say nothing alarming (hypercorn's "ASGI Framework
    # Lifespan error" warning at every start did, when a middleware broke the lifespan).
    alarming = [line for line in srv.log().splitlines()
                if " WARNING " in line or " ERROR " in line or "Traceback" in line]
    assert not alarming, "\n".join(alarming)


def test_api_key(fresh_server):
    srv = fresh_server("--api-key", "s3cret").wait_healthy()
    missing = srv.client.post("/embed", json={"inputs": "x"})
    assert missing.status_code == 401 and missing.json()["error_type"] == "Unauthorized"
    wrong = srv.client.post("/embed", json={"inputs": "x"},
                            headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert srv.client.get("/info").status_code == 401
    ok = srv.client.post("/embed", json={"inputs": "x"},
                         headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert srv.client.get("/health").status_code == 200


def test_vertex_ai_routes_from_its_variables(fresh_server):
    # What Vertex AI sets for a custom container: predictions and health checks go to paths of
    # its own (its health checker sends no API key).
    predict, health = "/v1/endpoints/1/deployedModels/2:predict", "/v1/endpoints/1/health"
    srv = fresh_server("--api-key", "s3cret", env={
        "AIP_PREDICT_ROUTE": predict, "AIP_HEALTH_ROUTE": health}).wait_healthy()
    key = {"authorization": "Bearer s3cret"}
    assert srv.client.get(health).status_code == 200
    body = {"instances": [{"inputs": "a"}, {"inputs": ["b", "c"]}]}
    answer = srv.client.post(predict, json=body, headers=key)
    assert answer.status_code == 200
    assert answer.json() == srv.client.post("/vertex", json=body, headers=key).json()
    assert srv.client.post(predict, json=body).status_code == 401
    assert srv.client.post(health, json=body).status_code == 401  # open to GET only


def test_cors(fresh_server):
    srv = fresh_server("--cors-allow-origin", "https://app.example").wait_healthy()
    preflight = srv.client.options("/embed", headers={
        "origin": "https://app.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type",
    })
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    other = srv.client.options("/embed", headers={
        "origin": "https://evil.example", "access-control-request-method": "POST"})
    assert other.status_code == 400


def test_missing_model_directory_is_a_clear_error():
    result = run_cli("--model-id", "/nonexistent/model")
    assert result.returncode == 1
    assert "/nonexistent/model" in result.stderr
    assert "Traceback" not in result.stderr


def test_max_batch_tokens_below_model_limit_without_auto_truncate(minilm_dir):
    result = run_cli("--model-id", str(minilm_dir), "--max-batch-tokens", "100",
                     "--auto-truncate", "false")
    assert result.returncode == 1
    assert "--max-batch-tokens=100" in result.stderr


def test_unloadable_weights_fail_start_up_naming_the_key(minilm_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    model = tmp_path / "broken"
    model.mkdir()
    for item in minilm_dir.iterdir():
        if item.name != "model.safetensors":
            (model / item.name).symlink_to(item)
    weights = load_file(minilm_dir / "model.safetensors")
    missing = next(k for k in weights if k.endswith("attention.output.dense.weight"))
    del weights[missing]
    save_file(weights, model / "model.safetensors")
    result = run_cli("--model-id", str(model), "--port", "0", "--max-batch-tokens", "512")
    assert result.returncode == 1
    assert missing.removeprefix("bert.") in result.stderr
    # A refusal that names its reason is one line, in the worker's log too: no traceback.
    assert "Traceback" not in result.stderr


def test_help_and_tei_alias():
    alias = Path(sys.executable).with_name("text-embeddings-router")
    result = subprocess.run([str(alias), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for flag in ("--model-id", "--max-batch-tokens", "--auto-truncate", "--payload-limit",
                 "MAX_CLIENT_BATCH_SIZE", "--device"):
        assert flag in result.stdout


def _children(pid: int) -> list[tuple[int, str]]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append((int(entry.name), cmdline))
    return found


def test_a_dead_tokenizer_process_costs_at_most_one_request(fresh_server):
    srv = fresh_server("--tokenization-workers", "1").wait_healthy()
    [tokenizer_pid] = [p for p, cmd in _children(srv.process.pid) if "spawn_main" in cmd]
    os.kill(tokenizer_pid, signal.SIGKILL)
    time.sleep(0.2)
    # Long enough to go to the pool (short requests are tokenized in the router itself).
    statuses = [srv.client.post("/embed", json={"inputs": f"text {i} " + "word " * 200})
                .status_code for i in range(3)]
    assert statuses.count(200) >= 2 and set(statuses) <= {200, 424}, statuses
    assert statuses[-1] == 200
    assert srv.client.get("/health").status_code == 200


def test_a_stopped_tokenizer_pool_is_replaced_after_its_stall_limit(fresh_server):
    # Long enough for the replacement pool's processes to start (spawned on first use) and
    # answer within it.
    limit = 5.0
    srv = fresh_server("--tokenization-workers", "2", "--tokenizer-timeout", str(limit))
    srv.wait_healthy()
    stopped = [p for p, cmd in _children(srv.process.pid) if "spawn_main" in cmd]
    for pid in stopped:  # alive but silent: only the stall limit can tell
        os.kill(pid, signal.SIGSTOP)
    long = {"inputs": "word " * 200}  # long enough to go to the pool
    started = time.monotonic()
    stalled = srv.client.post("/embed", json=long)
    assert stalled.status_code == 424 and "restarted" in stalled.json()["error"]
    assert limit <= time.monotonic() - started < limit + 10
    assert srv.client.post("/embed", json=long).status_code == 200

    wait_for(lambda: all(map(gone, stopped)), timeout=10)  # killed, not left stopped


def test_workers_die_with_the_router(fresh_server):
    srv = fresh_server().wait_healthy()
    children = [pid for pid, _ in _children(srv.process.pid)]
    assert len(children) >= 2  # the worker and the tokenizer processes
    srv.process.kill()
    srv.process.wait()
    wait_for(lambda: all(map(gone, children)), timeout=15)


def test_ready_timeout_is_a_clear_error(minilm_dir):
    result = run_cli("--model-id", str(minilm_dir), "--port", "0",
                     "--worker-ready-timeout", "0.2")
    assert result.returncode == 1
    assert "no worker became ready within" in result.stderr


def test_more_inputs_than_there_are_permits_is_a_422_at_once(fresh_server):
    # TEI answers 429 here, which no retry can ever turn into a 200.
    srv = fresh_server("--max-concurrent-requests", "2").wait_healthy()
    started = time.monotonic()
    response = srv.client.post("/embed", json={"inputs": ["a", "b", "c"]})
    assert time.monotonic() - started < 1.0
    assert response.status_code == 422
    assert response.json() == {"error": "batch size 3 > maximum concurrent inputs 2 "
                                        "(--max-concurrent-requests)",
                               "error_type": "Validation"}
    assert srv.client.post("/embed", json={"inputs": ["a", "b"]}).status_code == 200
    # /tokenize and /decode are bounded too (the tokenizer pool's work), by permits of their own.
    assert srv.client.post("/tokenize", json={"inputs": ["a", "b", "c"]}).status_code == 422
    assert srv.client.post("/decode", json={"ids": [[101], [102], [103]]}).status_code == 422
    assert srv.client.post("/tokenize", json={"inputs": ["a", "b"]}).status_code == 200


def test_tokenize_is_served_while_inference_holds_every_permit(fresh_server):
    # As in TEI (whose /tokenize takes no permit): a client counting tokens beside a busy
    # embedding pipeline is not refused for the pipeline's load.
    srv = fresh_server("--max-concurrent-requests", "64").wait_healthy()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(srv.client.post, "/embed", json=SLOW_BATCH)  # all 64 permits
        until_computing(srv)
        assert srv.client.post("/embed", json={"inputs": "a"}).status_code == 429
        assert srv.client.post("/tokenize", json={"inputs": ["a", "b"]}).status_code == 200
        assert srv.client.post("/decode", json={"ids": [[101, 102]]}).status_code == 200
        assert pending.result(timeout=120).status_code == 200


@pytest.mark.parametrize(("route", "body"), [
    ("/embed", SLOW_BATCH),  # computing
    # In the tokenizer pool for several seconds: 6M characters, each text under TEI's bound of
    # 250 per allowed token (MiniLM's 256 tokens: 64,000).
    ("/tokenize", {"inputs": ["word " * 12_000] * 100}),
], ids=["computing", "tokenizing"])
def test_requests_left_when_the_shutdown_grace_runs_out_get_a_503(fresh_server, route, body):
    srv = fresh_server("--shutdown-grace", "0.2", "--payload-limit", "8000000",
                       "--max-client-batch-size", "128").wait_healthy()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(srv.client.post, route, json=body)
        if route == "/embed":
            until_computing(srv)
        else:
            # Nothing counts /tokenize's work: long enough for the body to arrive (6 MB), far
            # shorter than tokenizing it (about 5 s here).
            time.sleep(1.5)
        srv.process.send_signal(signal.SIGTERM)
        response = pending.result(timeout=60)
    assert response.status_code == 503, response.text
    assert response.json()["error_type"] == "Unhealthy"
    assert "--shutdown-grace" in response.json()["error"]
    assert srv.process.wait(timeout=30) == 0
    assert "Traceback" not in srv.log()


def test_a_client_that_never_reads_its_answer_does_not_hold_the_exit(fresh_server):
    # hypercorn waits for every connection to close; a write to a client that never reads
    # never completes. After the drain the server closes it by force.
    import json
    import socket

    srv = fresh_server("--shutdown-grace", "1").wait_healthy()
    body = json.dumps({"inputs": ["word " * 200] * 32}).encode()  # ~2 MB of hidden states
    with socket.create_connection(("127.0.0.1", srv.port)) as stuck:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(b"POST /embed_all HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                      b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        # Computed (a fixed sleep is too short on a loaded machine); its answer now waits on
        # the client.
        wait_for(lambda: metric(srv, "te_request_success") == 1, timeout=60, interval=0.02)
        started = time.monotonic()
        srv.process.send_signal(signal.SIGTERM)
        assert srv.process.wait(timeout=30) == 0
        assert time.monotonic() - started < 15
    assert "closing them" in srv.log()
    assert "Traceback" not in srv.log()
