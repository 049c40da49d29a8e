"""The inference service: the token-budget queue, scheduling, post-processing; requests
hold their permits through `admission` (router/admission.py).

Requests come in from the HTTP layer as typed structs; they leave as float32 arrays plus the
timings that feed the response headers. The scheduler forms a batch only when a worker has a
free slot (late formation), so batches collect as much work as the budget allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from opentelemetry.trace import Tracer

from router.admission import Admission
from router.inputs import (
    InputRules,
    Pair,
    as_input_list,
    check_batch_size,
    check_dimensions,
    is_batch,
    resolve_prompt,
    tokenize_inputs,
    unnormalizable,
    without_trailing,
)
from router.metrics import DROPPED, MODEL_TYPE, Metrics, tokenization_refusals
from router.query_route import QueryVectors
from router.queue import Entry, TokenBudgetQueue
from router.results import EmbedResult, Outcome, Timings, densify, normalize_rows
from router.schemas import EmbedRequest
from router.tasks import start_supervised
from router.tokenization import Encoded, TokenizerPool
from router.tracing import record_phases
from router.workers import WorkerPool
from shared import logs
from shared.errors import TEI_BACKEND, ConfigError, EmbedServeError, backend, unhealthy
from shared.protocol import OutputKind

log = logging.getLogger(__name__)


class InferenceService:
    def __init__(
        self,
        *,
        rules: InputRules,
        embedding_dim: int,
        max_concurrent_requests: int,
        max_batch_tokens: int,
        max_batch_requests: int | None,
        auto_truncate: bool,
        position_offset: int,
        model_kind: str,
        splade: bool,
        tokenizers: TokenizerPool,
        workers: WorkerPool,
        metrics: Metrics,
        tracer: Tracer | None = None,
        empty_bag_id: int | None = None,
        queries: QueryVectors | None = None,
        lexical: bool = False,
        csr: bool = False,
        output_dim: int | None = None,
    ) -> None:
        self.rules = rules
        self.embedding_dim = embedding_dim
        # The width a request without `dimensions` gets (the model's truncate_dim, if it sets
        # one); `dimensions` may still ask for any width up to embedding_dim, as encode's may.
        self.output_dim = embedding_dim if output_dim is None else output_dim
        self.auto_truncate = auto_truncate
        self.position_offset = position_offset
        self.model_kind = model_kind
        self.splade = splade
        self.lexical = lexical  # sparse vectors beside the dense ones (BGE-M3's lexical weights)
        # A CSR SparseEncoder: its vectors are sparse, as SPLADE's are, but of a pooled embedding
        # (its token embeddings are a Transformer's: /embed_all serves them).
        self.csr = csr
        # A static model (StaticEmbedding) has no token embeddings (sentence-transformers has
        # none to give): its rows per token are not hidden states, so /embed_all is refused.
        # An input without tokens is sent as its empty bag's id, which no count includes.
        self.empty_bag_id = empty_bag_id
        self.static = empty_bag_id is not None
        # An inference-free SPLADE model's query route, computed here (router/query_route.py).
        self.queries = queries
        self.tokenizers = tokenizers
        self.workers = workers
        self.metrics = metrics
        metrics.watch_queue(lambda: len(self._queue) if self._queue is not None else 0)
        # None unless --otlp-endpoint is set: then no request pays for tracing.
        self.tracer = tracer
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests
        self.max_concurrent_requests = max_concurrent_requests
        self.admission = Admission(max_concurrent_requests)
        self._queue: TokenBudgetQueue | None = None
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, ready_timeout: float) -> None:
        await self.tokenizers.start()
        ready = await self.workers.start(ready_timeout)
        if ready.max_positions < self.rules.max_input_length:
            # Longer inputs would index past the model's position table: each such batch would
            # fail in the worker. Say so once, at start, with the flag that fixes it.
            raise ConfigError(
                f"the model takes at most {ready.max_positions} tokens per input (its position "
                f"table), but the maximum input length is {self.rules.max_input_length}: "
                f"lower it with --max-batch-tokens {ready.max_positions} --auto-truncate true, "
                "or fix the limit in the model's files (max_seq_length in its "
                "sentence_bert_config.json, or model_max_length)")
        self._queue = TokenBudgetQueue(
            self.max_batch_tokens, self.max_batch_requests, ready.cost_model
        )
        self._scheduler = start_supervised(self._schedule(), "the batch scheduler")

    @property
    def started(self) -> bool:
        """The workers were all ready once (start-up is over); a restart does not undo it."""
        return self._queue is not None

    @property
    def draining(self) -> bool:
        return self.admission.draining

    @property
    def ready(self) -> bool:
        return self._queue is not None and self.workers.healthy and not self.draining

    def on_workers_changed(self) -> None:
        """Called by the worker pool on every READY, result, failure and death."""
        if self._queue is not None and not self.workers.any_ready:
            # Waiting entries would wait for a restart that may take long or never succeed:
            # fail them now, as a client would rather retry than hang.
            for entry in self._queue.clear():
                entry.future.set_exception(
                    unhealthy("no backend worker is up (the worker died and is restarting)"))
        self._wake.set()

    async def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.cancel()
        await self.workers.stop()
        self.tokenizers.close()

    async def _schedule(self) -> None:
        """Dispatches on every wake-up: a slot freed or a worker ready (on_workers_changed),
        or a request queued while every worker was busy (_infer)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._dispatch()

    def _dispatch(self) -> None:
        assert self._queue is not None
        while len(self._queue) and (worker := self.workers.pick()) is not None:
            batch = self._queue.take()
            if not batch:
                break
            self.workers.submit(worker, batch)

    # -- requests ----------------------------------------------------------------------------

    def require(self, route_needs: str) -> None:
        """424 when a route does not fit the served model, in TEI's words (its
        TextEmbeddingsError::Backend, whose text starts "Backend error: ")."""
        no_hidden = ("`embed_all` is not available for SPLADE models" if self.splade else
                     "`embed_all` is not available for static embedding models (no token "
                     "embeddings)" if self.static else "Model is not an embedding model")
        refusal = {
            "embedding": (self.model_kind != "embedding", "Model is not an embedding model"),
            "hidden states": (self.model_kind != "embedding" or self.splade or self.static,
                              no_hidden),
            "sparse": (not (self.splade or self.lexical or self.csr),
                       "Model is not an embedding model with SPLADE pooling"),
            "classifier": (self.model_kind == "embedding", "Model is not a classifier model"),
            "reranker": (self.model_kind != "reranker", "model is not a re-ranker model"),
        }
        refused, message = refusal[route_needs]
        if refused:
            self.metrics.failed(MODEL_TYPE)
            raise backend(TEI_BACKEND + message)

    def accepted(self, inputs: str | list, parse: Callable[[str | list], list[Any]],
                 what: str) -> list[Any]:
        """A request's inputs as `parse` reads them, then --max-client-batch-size, then the
        model kind (`what` it must give), in TEI's order; the refusals count as run's do (an
        oversized one also as received, as TEI counts it)."""
        with self.refusals_counted():
            batch = parse(inputs)
            try:
                check_batch_size(len(batch), self.rules)
            except EmbedServeError:
                self.metrics.received("batch")
                raise
        self.require(what)
        return batch

    @contextlib.contextmanager
    def refusals_counted(self) -> Iterator[None]:
        """Checks made before `run`: their refusals count in te_request_failure as run's do."""
        try:
            yield
        except EmbedServeError as exc:
            self.metrics.refused(exc)
            raise

    async def run(
        self,
        inputs: Sequence[str | list[int] | Pair],
        output: OutputKind,
        *,
        truncate: bool | None,
        direction: str,
        prompt_name: str | None = None,
        client_inputs: int | None = None,
        batched: bool | None = None,
    ) -> Outcome:
        """Admission, tokenization, batching and inference for one request's inputs.
        `client_inputs`: how many inputs the client sent, where the server made more of them
        (re-rank pieces): that count is the one --max-client-batch-size bounds."""
        client_inputs = client_inputs or len(inputs)
        if batched is None:  # (an API TEI has no counterpart for: by the count)
            batched = client_inputs != 1
        method = "batch" if batched else "single"
        self.metrics.received(method)
        try:
            outcome = await self._run(inputs, output, truncate=truncate, direction=direction,
                                      prompt_name=prompt_name, client_inputs=client_inputs)
        except EmbedServeError as exc:
            self.metrics.refused(exc)
            raise
        except asyncio.CancelledError:
            self.metrics.failed(DROPPED)
            raise
        self.metrics.succeeded(method)
        return outcome

    async def _run(
        self,
        inputs: Sequence[str | list[int] | Pair],
        output: OutputKind,
        *,
        truncate: bool | None,
        direction: str,
        prompt_name: str | None,
        client_inputs: int,
    ) -> Outcome:
        if self.draining:
            raise unhealthy("the server is shutting down")
        if self._queue is None or not self.workers.any_ready:
            raise unhealthy("no backend worker is ready (the model is loading or restarting)")
        check_batch_size(client_inputs, self.rules)
        # (route: the query route of an inference-free SPLADE model, when the request takes it)
        with tokenization_refusals():  # (TEI finds the prompt in its tokenization)
            route, prompt = (self.queries.choose(prompt_name) if self.queries is not None
                             else (None, resolve_prompt(prompt_name, self.rules)))
        kind = "predict" if output is OutputKind.LOGITS else "embed"
        async with self.admission.admitted(len(inputs)):
            # After any wait for permits (a gRPC stream message's), where TEI starts its clock:
            # the wait is neither tokenization nor part of te_request_duration.
            started = time.perf_counter()
            self.metrics.admitted(kind, len(inputs))
            with tokenization_refusals():
                encoded, characters = await tokenize_inputs(
                    inputs,
                    prompt=prompt,
                    explicit_prompt=prompt_name is not None,
                    truncate=self.auto_truncate if truncate is None else truncate,
                    direction=direction.lower(),
                    rules=route.rules if route is not None else self.rules,
                    tokenizers=self.tokenizers,
                    special_tokens=route is None,
                )
            tokenized = time.perf_counter()
            for enc in encoded:
                self.metrics.input_length.observe(len(enc.ids))
            entries: dict[Entry, float] = {}
            if route is not None:  # computed here, at once: no batch, no worker
                rows = route.vectors(encoded)
            else:
                rows, entries = await self._infer(self._scored(encoded, output), output)
        done = time.perf_counter()
        if entries:
            self.metrics.answered(kind, started, tokenized, entries)
        else:
            self.metrics.answered_here(kind, started, tokenized, done, len(encoded))
        if self.tracer is not None:
            record_phases(self.tracer, started, tokenized, entries, (done, encoded))
        count = len(entries) or 1
        return Outcome(rows, Timings(
            characters=characters,
            tokens=sum(len(enc.ids) for enc in encoded) - self._empty_bags(encoded),
            tokenization_ms=(tokenized - started) * 1e3,
            queue_ms=sum(e.dispatched_at - e.enqueued_at for e in entries) / count * 1e3,
            inference_ms=(sum(f - e.dispatched_at for e, f in entries.items()) / count
                          if entries else done - tokenized) * 1e3,
            admitted_at=started,
        ))

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """Pooled vectors; a SPLADE model's are its sparse vectors written out in full (vocabulary
        wide), which TEI gives only unnormalized; a CSR model's likewise (hidden_dim wide)."""
        inputs = self.accepted(request.inputs, as_input_list, "embedding")
        sparse = self.splade or self.csr
        if sparse and request.normalize:
            self.metrics.failed(MODEL_TYPE)
            raise unnormalizable(self.splade)
        dimensions = request.dimensions
        with self.refusals_counted():
            check_dimensions(dimensions, self.embedding_dim)
        if dimensions is None and self.output_dim < self.embedding_dim:
            dimensions = self.output_dim
        outcome = await self.run(
            inputs, OutputKind.SPARSE if sparse else OutputKind.POOLED,
            truncate=request.truncate, direction=request.truncation_direction,
            prompt_name=request.prompt_name, batched=is_batch(request.inputs),
        )
        vectors = (densify(outcome.rows, self.embedding_dim) if sparse
                   else outcome.matrix())
        if dimensions is not None:
            vectors = vectors[:, :dimensions]
        if request.normalize:
            vectors = normalize_rows(vectors)
        return EmbedResult(np.ascontiguousarray(vectors, dtype=np.float32), outcome.timings)

    def _scored(self, encoded: list[Encoded], output: OutputKind) -> list[Encoded]:
        """What the worker computes (the client's tokens are still the ones counted)."""
        pad = self.rules.scored_before
        if output is not OutputKind.LOGITS or pad is None:
            return encoded
        return [without_trailing(enc, pad) for enc in encoded]

    def _empty_bags(self, encoded: list[Encoded]) -> int:
        """Inputs sent as the empty bag's stand-in id alone (clients cannot send that id)."""
        bag = self.empty_bag_id
        return 0 if bag is None else sum(
            1 for enc in encoded if enc.ids.shape[0] == 1 and int(enc.ids[0]) == bag)

    async def _infer(
        self, encoded: list[Encoded], output: OutputKind
    ) -> tuple[list[Any], dict[Entry, float]]:
        assert self._queue is not None
        if not self.workers.any_ready:
            # Every worker died while this request was tokenized (or waited for permits): the
            # queue was emptied then, and entries put now would wait for the restart.
            raise unhealthy("no backend worker is up (the worker died and is restarting)")
        loop = asyncio.get_running_loop()
        span = logs.current_span.get()
        request_id = span.request_id if span is not None else ""
        entries = [
            Entry(request_id, enc.ids, enc.type_ids, self.position_offset, output,
                  loop.create_future(), enc.pool_from)
            for enc in encoded
        ]
        for entry in entries:
            self._queue.put(entry)
        # A worker with nothing to do gets the request at once, without a turn of the event
        # loop (a query's latency). Otherwise the scheduler forms the batch on its next turn,
        # with whatever else arrived meanwhile (late formation: under load, a slot that frees
        # takes one full batch, not the first request to arrive).
        worker = self.workers.pick()
        if worker is not None and not worker.in_flight:
            self._dispatch()
        else:
            self._wake.set()
        try:
            results = await asyncio.gather(*(e.future for e in entries))
        except BaseException:
            # All-or-nothing: abandon the siblings so the queue drops them unseen.
            for entry in entries:
                entry.future.cancel()
            raise
        return [row for row, _ in results], {e: f for e, (_, f) in zip(entries, results,
                                                                        strict=True)}
