"""Prometheus metrics: TEI's names, labels and buckets, plus per-worker health and batch counts.

Everything is recorded in the router process, which already sees every event a metric needs:
it times tokenization around its calls to the tokenizer pool, forms every batch, receives every
Result (whose `compute_ms` is the worker's own timing) and supervises every worker. So the
tokenizer and worker processes hold no metric state: nothing is lost when one restarts, and no
multiprocess mode (a directory of mmapped files, gauges that need a merge policy) is needed to
be correct across processes.

Values are kept by prometheus-client in a registry of this app's own (not the global one, so
several apps in one process never share counts). The exposition is ours because TEI's counters
carry no `_total` suffix (`te_request_count`, not `te_request_count_total`), which
prometheus-client's text writer always adds; dashboards and alerts written for TEI query those
exact names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from starlette.requests import Request
from starlette.responses import Response

from shared.errors import BatchSizeError, EmbedServeError, ErrorType

if TYPE_CHECKING:
    from router.queue import Entry
    from router.workers import WorkerHandle

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# prometheus-client keeps every value in a file of PROMETHEUS_MULTIPROC_DIR where that variable
# is set (for another Python service sharing the environment): start-up then failed where the
# directory is missing, and left a file per process where it is not. Every value here is the
# router's own, so they are kept in memory whatever the environment says.
values.ValueClass = values.MutexValue

# TEI's buckets: durations (seconds) grow by 1.5x from 15 us to about 15 s, which resolves
# sub-millisecond queue times as well as multi-second batches.
DURATION_BUCKETS = tuple(float(f"{1e-5 * 1.5**k:.6g}") for k in range(1, 36))
BATCH_SIZE_BUCKETS = tuple(2.0**k for k in range(13))
BATCH_TOKENS_BUCKETS = tuple(2.0**k for k in range(21))

METHODS = ("single", "batch")
# te_request_failure{err}: TEI's label values, one per kind of failure.
FAILURE_LABELS: dict[ErrorType, str] = {
    ErrorType.VALIDATION: "validation",
    ErrorType.EMPTY: "validation",
    ErrorType.TOKENIZER: "tokenization",
    ErrorType.BACKEND: "inference",
    ErrorType.OVERLOADED: "overloaded",
    ErrorType.UNHEALTHY: "unhealthy",
}
MODEL_TYPE = "model_type"  # a route that does not fit the served model
BATCH_SIZE = BatchSizeError.counted_as  # more inputs than --max-client-batch-size
TOKENIZATION = FAILURE_LABELS[ErrorType.TOKENIZER]
DROPPED = "dropped"  # the client went away (or a sibling input failed) before the answer
WORKER_STATES = ("starting", "ready", "dead", "stopping")


def input_length_buckets(max_input_length: int) -> tuple[float, ...]:
    """Powers of two up to the model's limit, and the limit itself (TEI stops at the power)."""
    powers = [2.0**k for k in range(20) if 2**k < max_input_length]
    return (*powers, float(max_input_length))


class _Phase:
    """The duration histograms of one phase family: te_request_*, te_embed_*, te_predict_*."""

    def __init__(self, prefix: str, subject: str, registry: CollectorRegistry,
                 averaged: bool = False) -> None:
        def histogram(suffix: str, text: str) -> Histogram:
            return Histogram(f"{prefix}_{suffix}", text, buckets=DURATION_BUCKETS,
                             registry=registry)

        each = " (the mean of its inputs)" if averaged else ""
        self.total = histogram("duration", f"Seconds from the arrival of {subject} to its "
                               "answer")
        self.tokenization = histogram("tokenization_duration", f"Seconds tokenizing {subject}")
        self.queue = histogram("queue_duration", f"Seconds {subject} waited for a batch slot"
                               f"{each}")
        self.inference = histogram("inference_duration", f"Seconds of inference of {subject}"
                                   f"{each}")

    def observe(self, total: float, tokenization: float, queue: float, inference: float) -> None:
        self.total.observe(total)
        self.tokenization.observe(tokenization)
        self.queue.observe(queue)
        self.inference.observe(inference)


class _Inputs:
    """te_embed_* / te_predict_*: TEI's per-input families of embedding inputs (every output
    but scores) or of scored ones (classifiers and re-rankers)."""

    def __init__(self, kind: str, what: str, registry: CollectorRegistry) -> None:
        self.count = Counter(f"te_{kind}_count", f"Inputs {what} received", registry=registry)
        self.success = Counter(f"te_{kind}_success", f"Inputs {what} answered",
                               registry=registry)
        self.phase = _Phase(f"te_{kind}", f"an input {what}", registry)


class Metrics:
    """The families of one server, registered with zero values at construction."""

    def __init__(self, max_input_length: int) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.request_count = Counter("te_request_count", "Inference requests received",
                                     ["method"], registry=registry)
        self.request_success = Counter("te_request_success", "Inference requests answered",
                                       ["method"], registry=registry)
        self.request_failure = Counter("te_request_failure", "Inference requests failed, by "
                                       "kind of failure", ["err"], registry=registry)
        # Label children resolved once (`labels()` costs a lock and a dict walk per request).
        self._received = {m: self.request_count.labels(m) for m in METHODS}
        self._succeeded = {m: self.request_success.labels(m) for m in METHODS}
        for err in (*dict.fromkeys(FAILURE_LABELS.values()), MODEL_TYPE, BATCH_SIZE, DROPPED):
            self.request_failure.labels(err)
        self.request = _Phase("te_request", "a request", registry, averaged=True)
        self.inputs = {"embed": _Inputs("embed", "to embed", registry),
                       "predict": _Inputs("predict", "to score", registry)}
        self.input_length = Histogram(
            "te_request_input_length", "Tokens of each input, special tokens included",
            buckets=input_length_buckets(max_input_length), registry=registry)
        self.queue_size = Gauge("te_queue_size", "Inputs waiting for a batch",
                                registry=registry)
        self.batch_size = Histogram("te_batch_next_size", "Inputs of each batch formed",
                                    buckets=BATCH_SIZE_BUCKETS, registry=registry)
        self.batch_tokens = Histogram("te_batch_next_tokens", "Tokens of each batch formed",
                                      buckets=BATCH_TOKENS_BUCKETS, registry=registry)
        self.batch_inference = Histogram(
            "te_batch_inference_duration", "Seconds a worker computed one batch (its own "
            "timing, without the trip over the socket)", buckets=DURATION_BUCKETS,
            registry=registry)

    # -- what the service and the worker pool report ------------------------------------------

    def received(self, method: str) -> None:
        self._received[method].inc()

    def succeeded(self, method: str) -> None:
        self._succeeded[method].inc()

    def failed(self, err: str) -> None:
        self.request_failure.labels(err).inc()

    def failed_with(self, error_type: ErrorType) -> None:
        # Only the inference types reach here; any other is named as it is, never hidden.
        self.failed(FAILURE_LABELS.get(error_type, error_type.value.lower()))

    def refused(self, error: EmbedServeError) -> None:
        """A request failed with `error`: counted by its type, unless TEI counts it apart (an
        oversized client batch as `batch_size`; `tokenization_refusals`)."""
        if error.counted_as is not None:
            self.failed(error.counted_as)
        else:
            self.failed_with(error.error_type)

    def admitted(self, kind: str, inputs: int) -> None:
        """A request's `inputs` for `kind` (embed or predict) got their permits."""
        self.inputs[kind].count.inc(inputs)

    def answered(self, kind: str, started: float, tokenized: float,
                 finished: Mapping[Entry, float]) -> None:
        """A request answered: `finished` maps each input's entry to when its batch came back
        (perf_counter seconds, as `started` and `tokenized`)."""
        done = max(finished.values())
        tokenization = tokenized - started
        queues = [e.dispatched_at - e.enqueued_at for e in finished]
        inferences = [at - e.dispatched_at for e, at in finished.items()]
        self.request.observe(done - started, tokenization, sum(queues) / len(queues),
                             sum(inferences) / len(inferences))
        per_input = self.inputs[kind]
        per_input.success.inc(len(finished))
        for at, queue, inference in zip(finished.values(), queues, inferences, strict=True):
            per_input.phase.observe(at - started, tokenization, queue, inference)

    def answered_here(self, kind: str, started: float, tokenized: float, done: float,
                      inputs: int) -> None:
        """A request answered by the router itself (an inference-free SPLADE model's query
        route): no queue, its computation counted as inference."""
        self.request.observe(done - started, tokenized - started, 0.0, done - tokenized)
        per_input = self.inputs[kind]
        per_input.success.inc(inputs)
        for _ in range(inputs):
            per_input.phase.observe(done - started, tokenized - started, 0.0, done - tokenized)

    def watch_queue(self, size: Callable[[], int]) -> None:
        self.queue_size.set_function(size)

    def watch_workers(self, workers: Sequence[WorkerHandle]) -> None:
        self.registry.register(_WorkerCollector(workers))

    def batch_formed(self, size: int, tokens: int) -> None:
        self.batch_size.observe(size)
        self.batch_tokens.observe(tokens)

    # -- exposition ---------------------------------------------------------------------------

    def render(self) -> bytes:
        return render(self.registry)

    async def endpoint(self, request: Request) -> Response:
        return Response(self.render(), media_type=CONTENT_TYPE)


@contextlib.contextmanager
def tokenization_refusals() -> Iterator[None]:
    """Refusals inside make te_request_failure{err="tokenization"}, whatever their type: TEI's
    Infer counts whatever its encode refuses so (a prompt name the model lacks, an input past
    the limit without truncation), not as validation."""
    try:
        yield
    except EmbedServeError as exc:
        exc.counted_as = TOKENIZATION
        raise


class _WorkerCollector(Collector):
    """Per-worker families, read from the worker pool's own records at each scrape (the same
    records /info shows), so the two can never disagree."""

    def __init__(self, workers: Sequence[WorkerHandle]) -> None:
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("te_worker_up", "1 when the worker is ready for batches",
                               labels=["worker"])
        state = GaugeMetricFamily("te_worker_state", "1 for the state the worker is in",
                                  labels=["worker", "state"])
        in_flight = GaugeMetricFamily("te_worker_in_flight", "Batches sent to the worker and "
                                      "not answered yet", labels=["worker"])
        batches = CounterMetricFamily("te_worker_batches", "Batches the worker computed",
                                      labels=["worker"])
        tokens = CounterMetricFamily("te_worker_tokens", "Tokens of the batches the worker "
                                     "computed", labels=["worker"])
        restarts = CounterMetricFamily("te_worker_restarts", "Times the worker was restarted "
                                       "after dying", labels=["worker"])
        for worker in self.workers:
            current = worker.state.value
            up.add_metric([worker.id], float(current == "ready"))
            for name in WORKER_STATES:
                state.add_metric([worker.id, name], float(current == name))
            in_flight.add_metric([worker.id], len(worker.in_flight))
            batches.add_metric([worker.id], worker.batches_done)
            tokens.add_metric([worker.id], worker.tokens_done)
            restarts.add_metric([worker.id], worker.restarts)
        yield from (up, state, in_flight, batches, tokens, restarts)

    def describe(self) -> list[Metric]:
        return []  # families are made per scrape; nothing to check names against up front


_TYPES = {"counter": "counter", "gauge": "gauge", "histogram": "histogram"}


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def render(registry: CollectorRegistry) -> bytes:
    """Prometheus text format 0.0.4 with TEI's spelling: counter samples named as the family
    (no `_total`), and no `_created` series (TEI has none; they would double the output)."""
    lines: list[str] = []
    for family in registry.collect():
        help_text = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        lines.append(f"# HELP {family.name} {help_text}")
        lines.append(f"# TYPE {family.name} {_TYPES.get(family.type, 'untyped')}")
        for sample in family.samples:
            if sample.name == f"{family.name}_created":
                continue
            name = family.name if family.type == "counter" else sample.name
            labels = ",".join(f'{key}="{_escape(value)}"'
                              for key, value in sorted(sample.labels.items()))
            lines.append(f"{name}{{{labels}}} {floatToGoString(sample.value)}" if labels
                         else f"{name} {floatToGoString(sample.value)}")
    return ("\n".join(lines) + "\n").encode()
