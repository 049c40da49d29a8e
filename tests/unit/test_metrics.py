"""The Prometheus families: TEI's names and labels present from the start, values after known
events, per-worker families from the pool's records, and a text format Prometheus parses."""

from __future__ import annotations

import itertools
import re
from typing import Any, cast

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.metrics import (
    BATCH_SIZE_BUCKETS,
    BATCH_TOKENS_BUCKETS,
    DURATION_BUCKETS,
    FAILURE_LABELS,
    Metrics,
    input_length_buckets,
    render,
)
from router.queue import Entry
from router.workers import InFlight, WorkerHandle, WorkerState
from shared.errors import ErrorType
from shared.protocol import OutputKind, WorkerConfig
from tests.fixtures.prometheus import samples

TEI_FAMILIES = {
    "te_request_count": "counter", "te_request_success": "counter",
    "te_request_failure": "counter", "te_request_duration": "histogram",
    "te_request_tokenization_duration": "histogram", "te_request_queue_duration": "histogram",
    "te_request_inference_duration": "histogram", "te_embed_count": "counter",
    "te_embed_success": "counter", "te_embed_duration": "histogram",
    "te_embed_tokenization_duration": "histogram", "te_embed_queue_duration": "histogram",
    "te_embed_inference_duration": "histogram", "te_predict_count": "counter",
    "te_predict_success": "counter", "te_predict_duration": "histogram",
    "te_predict_tokenization_duration": "histogram", "te_predict_queue_duration": "histogram",
    "te_predict_inference_duration": "histogram", "te_request_input_length": "histogram",
    "te_queue_size": "gauge", "te_batch_next_size": "histogram",
    "te_batch_next_tokens": "histogram", "te_batch_inference_duration": "histogram",
}
WORKER_FAMILIES = {
    "te_worker_up": "gauge", "te_worker_state": "gauge", "te_worker_in_flight": "gauge",
    "te_worker_batches": "counter", "te_worker_tokens": "counter",
    "te_worker_restarts": "counter",
}


def types(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))


def entry(length: int, enqueued: float, dispatched: float) -> Entry:
    ids = np.zeros(length, dtype=np.int32)
    made = Entry("", ids, ids, 0, OutputKind.POOLED, cast(Any, None))
    made.enqueued_at, made.dispatched_at = enqueued, dispatched
    return made


def handle(worker_id: str, state: WorkerState) -> WorkerHandle:
    config = WorkerConfig(worker_id, "ipc:///nowhere", "/nowhere", None, None, "cpu", None,
                          512, 1, False)
    return WorkerHandle(worker_id, config, state=state)


def test_every_family_is_there_from_the_start_with_zero_values() -> None:
    text = Metrics(max_input_length=512).render().decode()
    assert types(text) == TEI_FAMILIES
    values = samples(text)
    for method in ("single", "batch"):
        assert values[f'te_request_count{{method="{method}"}}'] == 0
        assert values[f'te_request_success{{method="{method}"}}'] == 0
    for err in {*FAILURE_LABELS.values(), "model_type", "dropped", "batch_size"}:
        assert values[f'te_request_failure{{err="{err}"}}'] == 0
    assert values["te_embed_count"] == values["te_predict_count"] == 0
    assert values['te_request_duration_bucket{le="+Inf"}'] == 0
    assert values["te_queue_size"] == 0


def test_counters_keep_tei_spelling_no_total_and_no_created_series() -> None:
    metrics = Metrics(max_input_length=512)
    metrics.request_count.labels("single").inc()
    text = metrics.render().decode()
    assert 'te_request_count{method="single"} 1.0' in text.splitlines()
    assert "_total" not in text and "_created" not in text


def test_the_exposition_parses_as_prometheus_text() -> None:
    metrics = Metrics(max_input_length=512)
    metrics.watch_workers([handle("0", WorkerState.READY)])
    parsed = {f.name: f.type for f in text_string_to_metric_families(metrics.render().decode())}
    assert parsed == {**TEI_FAMILIES, **WORKER_FAMILIES}


def test_buckets_suit_milliseconds_and_the_model_limit() -> None:
    assert DURATION_BUCKETS[0] == 1.5e-05 and 10 < DURATION_BUCKETS[-1] < 20
    assert all(b > a for a, b in itertools.pairwise(DURATION_BUCKETS))
    assert input_length_buckets(512) == (*(2.0**k for k in range(9)), 512.0)
    assert input_length_buckets(300)[-2:] == (256.0, 300.0)
    assert input_length_buckets(10**6)[-3:] == (262144.0, 524288.0, 1e6)  # 2**19, TEI's last


def test_batch_buckets_are_teis_powers_of_two() -> None:
    # TEI: exponential_buckets(1, 2, 13) for a batch's size, (1, 2, 21) for its tokens.
    assert (len(BATCH_SIZE_BUCKETS), BATCH_SIZE_BUCKETS[0], BATCH_SIZE_BUCKETS[-1]) == (
        13, 1.0, 4096.0)
    assert (len(BATCH_TOKENS_BUCKETS), BATCH_TOKENS_BUCKETS[0], BATCH_TOKENS_BUCKETS[-1]) == (
        21, 1.0, 1048576.0)


def test_an_answered_request_records_per_request_and_per_input_timings() -> None:
    metrics = Metrics(max_input_length=512)
    started, tokenized = 100.0, 100.002
    first, second = entry(5, 100.002, 100.003), entry(7, 100.002, 100.005)
    metrics.admitted("embed", 2)
    metrics.answered("embed", started, tokenized, {first: 100.013, second: 100.015})
    values = samples(metrics.render().decode())
    assert values["te_embed_count"] == values["te_embed_success"] == 2
    assert values["te_predict_count"] == 0
    assert values["te_request_duration_count"] == 1
    assert values["te_request_duration_sum"] == pytest.approx(0.015)
    assert values["te_request_queue_duration_sum"] == pytest.approx((0.001 + 0.003) / 2)
    assert values["te_request_inference_duration_sum"] == pytest.approx(0.010)
    assert values["te_embed_duration_count"] == 2
    assert values["te_embed_duration_sum"] == pytest.approx(0.013 + 0.015)
    assert values["te_embed_tokenization_duration_sum"] == pytest.approx(2 * 0.002)
    assert values["te_embed_queue_duration_sum"] == pytest.approx(0.001 + 0.003)


def test_a_request_answered_in_the_router_has_no_queue_time() -> None:
    """An inference-free SPLADE query (router/query_route.py): its lookup is the inference."""
    metrics = Metrics(max_input_length=512)
    metrics.admitted("embed", 3)
    metrics.answered_here("embed", 100.0, 100.002, 100.003, 3)
    values = samples(metrics.render().decode())
    assert values["te_embed_success"] == 3
    assert values["te_request_duration_count"] == 1
    assert values["te_request_duration_sum"] == pytest.approx(0.003)
    assert values["te_request_queue_duration_sum"] == 0
    assert values["te_request_inference_duration_sum"] == pytest.approx(0.001)
    assert values["te_embed_duration_count"] == 3
    assert values["te_embed_duration_sum"] == pytest.approx(3 * 0.003)
    assert values["te_embed_inference_duration_sum"] == pytest.approx(3 * 0.001)


def test_failures_are_counted_under_tei_labels() -> None:
    metrics = Metrics(max_input_length=512)
    metrics.failed_with(ErrorType.EMPTY)
    metrics.failed_with(ErrorType.VALIDATION)
    metrics.failed_with(ErrorType.OVERLOADED)
    metrics.failed_with(ErrorType.TOKENIZER)
    values = samples(metrics.render().decode())
    assert values['te_request_failure{err="validation"}'] == 2
    assert values['te_request_failure{err="overloaded"}'] == 1
    assert values['te_request_failure{err="tokenization"}'] == 1
    assert values['te_request_failure{err="inference"}'] == 0
    metrics.failed_with(ErrorType.BACKEND)
    metrics.failed_with(ErrorType.UNHEALTHY)
    metrics.failed_with(ErrorType.BAD_REQUEST)  # none of TEI's: named as it is
    values = samples(metrics.render().decode())
    assert values['te_request_failure{err="inference"}'] == 1
    assert values['te_request_failure{err="unhealthy"}'] == 1
    assert values['te_request_failure{err="badrequest"}'] == 1


def test_queue_size_and_batches_are_reported() -> None:
    metrics = Metrics(max_input_length=512)
    waiting = [1, 2, 3]
    metrics.watch_queue(lambda: len(waiting))
    metrics.batch_formed(size=3, tokens=40)
    metrics.batch_formed(size=1, tokens=8)
    values = samples(metrics.render().decode())
    assert values["te_queue_size"] == 3
    assert values["te_batch_next_size_sum"] == 4 and values["te_batch_next_size_count"] == 2
    assert values["te_batch_next_tokens_sum"] == 48
    assert values['te_batch_next_tokens_bucket{le="8.0"}'] == 1


def test_worker_families_read_the_pool_records() -> None:
    ready, dead = handle("0", WorkerState.READY), handle("1", WorkerState.DEAD)
    ready.batches_done, ready.tokens_done = 4, 123
    ready.in_flight[7] = InFlight([], 10)
    dead.restarts, dead.failures = 2, 5
    metrics = Metrics(max_input_length=512)
    metrics.watch_workers([ready, dead, handle("2", WorkerState.STARTING)])
    values = samples(metrics.render().decode())
    assert values['te_worker_up{worker="2"}'] == 0
    assert values['te_worker_up{worker="0"}'] == 1 and values['te_worker_up{worker="1"}'] == 0
    assert values['te_worker_state{state="ready",worker="0"}'] == 1
    assert values['te_worker_state{state="dead",worker="0"}'] == 0
    assert values['te_worker_state{state="dead",worker="1"}'] == 1
    assert values['te_worker_batches{worker="0"}'] == 4
    assert values['te_worker_tokens{worker="0"}'] == 123
    assert values['te_worker_in_flight{worker="0"}'] == 1
    assert values['te_worker_restarts{worker="1"}'] == 2
    ready.state = WorkerState.DEAD  # read at each scrape, never cached
    assert samples(metrics.render().decode())['te_worker_up{worker="0"}'] == 0


def test_each_server_has_its_own_registry() -> None:
    one, two = Metrics(max_input_length=512), Metrics(max_input_length=512)
    one.request_count.labels("batch").inc(3)
    assert samples(two.render().decode())['te_request_count{method="batch"}'] == 0
    assert samples(render(one.registry).decode())['te_request_count{method="batch"}'] == 3


def test_label_values_are_escaped() -> None:
    metrics = Metrics(max_input_length=512)
    metrics.watch_workers([handle('a"b\\c', WorkerState.READY)])
    assert 'te_worker_up{worker="a\\"b\\\\c"} 1.0' in metrics.render().decode()


def test_help_texts_are_escaped() -> None:
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    Counter("te_odd", "a back\\slash\nand a new line", registry=registry)
    assert "# HELP te_odd a back\\\\slash\\nand a new line" in render(registry).decode()


def test_a_multiprocess_directory_in_the_environment_is_not_used(tmp_path) -> None:
    """PROMETHEUS_MULTIPROC_DIR (set for other Python services in a shared environment) turns
    prometheus-client's values into files in that directory at import: start-up failed where it
    does not exist, and left a file per process where it does. Every value is the router's own
    (module docstring), so the variable is not followed."""
    import os
    import subprocess
    import sys

    script = ("from router.metrics import Metrics\n"
              "m = Metrics(max_input_length=512)\n"
              "m.received('single')\n"
              "print(m.render().decode())\n")
    for directory in (tmp_path / "missing", tmp_path):
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                                text=True, timeout=60, check=False,
                                cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
        assert result.returncode == 0, result.stderr
        assert samples(result.stdout)['te_request_count{method="single"}'] == 1
    assert list(tmp_path.iterdir()) == []
