"""SIGTERM to the whole process group (`kill -- -PGID`, `timeout`, systemd's default
KillMode=control-group): the router, its workers and its tokenizer processes get it at once,
and the drain must still be the router's."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

from tests.e2e.server import Server, gone, wait_for
from tests.e2e.test_embed_parity import LONG
from tests.e2e.test_lifecycle import _children, until_computing

BATCH = {"inputs": [f"{i} {LONG}" for i in range(16)]}  # 16 x 256 tokens: one full batch


def test_sigterm_to_the_process_group_drains_every_request(minilm_dir, tmp_path):
    srv = Server("--model-id", str(minilm_dir), "--max-batch-tokens", "4096",
                 "--max-client-batch-size", "128", "--payload-limit", "8000000",
                 "--tokenization-workers", "1",
                 log_path=tmp_path / "server.log", own_group=True)
    try:
        srv.wait_healthy()
        children = [pid for pid, _ in _children(srv.process.pid)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            # Two batches: one computing, one queued behind it.
            embeds = [pool.submit(srv.client.post, "/embed", json=BATCH) for _ in range(2)]
            until_computing(srv)
            # And two requests in the (one) tokenizer process, for seconds: the second one's
            # batch reaches the queue after the first two have been computed.
            long = ["word " * 12_000]  # 60,000 characters: at most 256 tokens
            tokenize = pool.submit(srv.client.post, "/tokenize", json={"inputs": long * 50})
            time.sleep(0.5)  # its body has arrived: it is being tokenized
            late = pool.submit(srv.client.post, "/embed",
                               json={"inputs": long * 16, "truncate": True})
            time.sleep(0.5)
            os.killpg(srv.process.pid, signal.SIGTERM)
            responses = [f.result(timeout=120) for f in [*embeds, tokenize, late]]
        for response in responses:
            assert response.status_code == 200, (response.text, srv.log())
        assert [len(r.json()) for r in responses] == [16, 16, 50, 16]
        assert srv.process.wait(timeout=60) == 0, srv.log()
    finally:
        srv.stop()
    log = srv.log()
    assert "died" not in log and "restarting" not in log and "Traceback" not in log, log

    wait_for(lambda: all(map(gone, children)), timeout=15)  # none left behind
