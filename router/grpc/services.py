"""The tei.v1 servicers: each method parses its message, asks the service (through
router.operations, as the HTTP routes do) and shapes the reply. Each answer is written once and
serves both the unary RPC and its stream variant (`unary` / `streaming`, router/grpc/calls.py).

Proto3 has no "unset" for scalars: `truncate` false means "do not truncate" here (as in TEI's
gRPC API), where an HTTP request without `truncate` gets --auto-truncate.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import numpy as np

from router import operations
from router.admission import patiently
from router.grpc.calls import in_order, streaming, unary
from router.grpc.protos import pb, services
from router.results import Timings
from router.routes import AppState
from router.schemas import EmbedRequest, TruncationDirection
from shared.errors import EmbedServeError, ErrorType, backend, empty, validation

SERVICE_NAMES = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())
MODEL_TYPES = {"embedding": pb.MODEL_TYPE_EMBEDDING, "classifier": pb.MODEL_TYPE_CLASSIFIER,
               "reranker": pb.MODEL_TYPE_RERANKER}


def _direction(value: int) -> TruncationDirection:
    # Proto3 enums are open: a number this .proto does not name (a newer client's) arrives as
    # is. It is refused by name, not truncated on the right unasked (TEI's server panics).
    if value == pb.TRUNCATION_DIRECTION_LEFT:
        return "left"
    if value == pb.TRUNCATION_DIRECTION_RIGHT:
        return "right"
    raise validation(f"Input validation error: `truncation_direction` {value} is not one of "
                     "TRUNCATION_DIRECTION_RIGHT (0) and TRUNCATION_DIRECTION_LEFT (1)")


def _prompt_name(message) -> str | None:
    return message.prompt_name if message.HasField("prompt_name") else None


def _ns(milliseconds: float) -> int:
    return round(milliseconds * 1e6)


def metadata(timings: Timings, started: float | None = None) -> pb.Metadata:
    """The reply's Metadata; total_time_ns from `started`, else from the admission (TEI's
    clock starts after the permit, which a stream's message may have waited for)."""
    since = timings.admitted_at if started is None else started
    return pb.Metadata(
        compute_chars=timings.characters, compute_tokens=timings.tokens,
        total_time_ns=round((time.perf_counter() - since) * 1e9),
        tokenization_time_ns=_ns(timings.tokenization_ms), queue_time_ns=_ns(timings.queue_ms),
        inference_time_ns=_ns(timings.inference_ms))


class _Servicer:
    def __init__(self, state: AppState) -> None:
        self.state = state
        self.service = state.service
        self.model = state.model
        # Each request of a stream holds at least one of --max-concurrent-requests' permits:
        # more in flight could only wait for one (`patiently`). Answers wait in the stream
        # until the client reads them: --grpc-max-parallel-stream-requests bounds the memory
        # they hold.
        config = state.config
        self.stream_parallelism = min(config.max_concurrent_requests,
                                      config.grpc_max_parallel_stream_requests
                                      or config.max_concurrent_requests)


class InfoServicer(_Servicer, services.InfoServicer):
    async def info(self, request: pb.InfoRequest) -> pb.InfoResponse:
        info = self.state.live_info()
        return pb.InfoResponse(
            version=info.version, sha=info.sha, docker_label=info.docker_label,
            model_id=info.model_id, model_sha=info.model_sha, model_dtype=info.model_dtype,
            model_type=MODEL_TYPES[self.model.kind],
            max_concurrent_requests=info.max_concurrent_requests,
            max_input_length=info.max_input_length, max_batch_tokens=info.max_batch_tokens,
            max_batch_requests=info.max_batch_requests,
            max_client_batch_size=info.max_client_batch_size,
            tokenization_workers=info.tokenization_workers)

    Info = unary(info)


class EmbedServicer(_Servicer, services.EmbedServicer):
    async def embed(self, request: pb.EmbedRequest) -> pb.EmbedResponse:
        result = await self.service.embed(EmbedRequest(
            inputs=request.inputs, truncate=request.truncate, normalize=request.normalize,
            truncation_direction=_direction(request.truncation_direction),
            prompt_name=_prompt_name(request)))
        return pb.EmbedResponse(embeddings=result.vectors[0].tolist(),
                                metadata=metadata(result.timings))

    async def embed_sparse(self, request: pb.EmbedSparseRequest) -> pb.EmbedSparseResponse:
        outcome = await operations.embed_sparse(
            self.service, request.inputs, truncate=request.truncate,
            direction=_direction(request.truncation_direction),
            prompt_name=_prompt_name(request))
        indices, values = outcome.rows[0]
        return pb.EmbedSparseResponse(
            sparse_embeddings=[pb.SparseValue(index=i, value=v)
                               for i, v in zip(indices.tolist(), values.tolist(), strict=True)],
            metadata=metadata(outcome.timings))

    async def embed_all(self, request: pb.EmbedAllRequest) -> pb.EmbedAllResponse:
        outcome = await operations.embed_all(
            self.service, request.inputs, truncate=request.truncate,
            direction=_direction(request.truncation_direction),
            prompt_name=_prompt_name(request))
        return pb.EmbedAllResponse(
            token_embeddings=[pb.TokenEmbedding(embeddings=row)
                              for row in outcome.rows[0].tolist()],
            metadata=metadata(outcome.timings))

    Embed = unary(embed)
    EmbedStream = streaming(embed)
    EmbedSparse = unary(embed_sparse)
    EmbedSparseStream = streaming(embed_sparse)
    EmbedAll = unary(embed_all)
    EmbedAllStream = streaming(embed_all)


class PredictServicer(_Servicer, services.PredictServicer):
    async def _classify(self, inputs: str | list[str], request) -> pb.PredictResponse:
        [ranked], timings = await operations.classify(
            self.service, self.model, inputs, truncate=request.truncate,
            direction=_direction(request.truncation_direction), raw_scores=request.raw_scores)
        return pb.PredictResponse(
            predictions=[pb.Prediction(score=score, label=label) for score, label in ranked],
            metadata=metadata(timings))

    async def predict(self, request: pb.PredictRequest) -> pb.PredictResponse:
        return await self._classify(request.inputs, request)

    async def predict_pair(self, request: pb.PredictPairRequest) -> pb.PredictResponse:
        # One text or a pair, checked first and in TEI's words, as its PredictPair does
        # (before the model's kind: 3 inputs to an embedding model are INVALID_ARGUMENT too).
        if len(request.inputs) not in (1, 2):
            raise validation("`inputs` must have a single or two elements. "
                             f"Given: {len(request.inputs)}")
        return await self._classify(list(request.inputs), request)

    Predict = unary(predict)
    PredictStream = streaming(predict)
    PredictPair = unary(predict_pair)
    PredictPairStream = streaming(predict_pair)


class RerankServicer(_Servicer, services.RerankServicer):
    def _ranks(self, scores: np.ndarray, texts: list[str], return_text: bool) -> list[pb.Rank]:
        return [pb.Rank(index=int(i), score=float(scores[i]),
                        text=texts[i] if return_text else None)
                for i in operations.best_first(scores)]

    def _require_reranker(self) -> None:
        """The model-kind refusal in the words of TEI's gRPC Rerank and RerankStream, which
        write their own status (no "Backend error: "): an embedding model is "not a
        classifier model" there, a classifier "not a re-ranker model"."""
        try:
            self.service.require("reranker")
        except EmbedServeError:
            kind = "classifier" if self.model.kind == "embedding" else "re-ranker"
            raise backend(f"model is not a {kind} model") from None

    async def rerank(self, request: pb.RerankRequest) -> pb.RerankResponse:
        # From the call, as TEI's Rerank and RerankStream time theirs (their texts' permits
        # are waited for inside).
        started = time.perf_counter()
        texts = list(request.texts)
        if texts:  # (empty texts are refused first, by operations.rerank, as TEI does)
            self._require_reranker()
        scores, timings = await operations.rerank(
            self.service, self.model, request.query, texts, truncate=request.truncate,
            direction=_direction(request.truncation_direction), raw_scores=request.raw_scores)
        return pb.RerankResponse(ranks=self._ranks(scores, texts, request.return_text),
                                 metadata=metadata(timings, started))

    async def rerank_stream(
        self, requests: AsyncIterator[pb.RerankStreamRequest]
    ) -> pb.RerankResponse:
        """One (query, text) per message, scored as the messages arrive; `raw_scores` and
        `return_text` come from the first message (TEI's rule)."""
        started = time.perf_counter()
        self._require_reranker()
        limit = self.state.config.payload_limit
        first: list[pb.RerankStreamRequest] = []  # its raw_scores and return_text apply
        texts: list[str] = []  # kept for return_text only: a message is dropped once scored
        kept = 0

        async def noting(requests: AsyncIterator[pb.RerankStreamRequest]):
            nonlocal kept
            async for request in requests:
                if not first:
                    first.append(request)
                if first[0].return_text:
                    # The texts come back in the answer: bounded as one /rerank body is.
                    kept += len(request.text.encode())
                    if kept > limit:
                        raise EmbedServeError(
                            ErrorType.PAYLOAD_TOO_LARGE, f"the stream's texts, returned with "
                            f"return_text, exceed the payload limit of {limit} bytes")
                    texts.append(request.text)
                yield request

        async def score(request: pb.RerankStreamRequest) -> tuple[float, Timings]:
            [value], timings = await patiently(lambda: operations.rerank(
                self.service, self.model, request.query, [request.text],
                truncate=request.truncate, direction=_direction(request.truncation_direction),
                raw_scores=first[0].raw_scores))
            return value, timings

        parts = [part async for part in in_order(noting(requests), score,
                                                 self.stream_parallelism)]
        if not parts:
            raise empty("`texts` cannot be empty: the stream sent no message")
        scores = np.array([value for value, _ in parts])
        return pb.RerankResponse(
            ranks=self._ranks(scores, texts, first[0].return_text),
            metadata=metadata(operations.combined([timings for _, timings in parts]), started))

    Rerank = unary(rerank)
    RerankStream = unary(rerank_stream)


class TokenizeServicer(_Servicer, services.TokenizeServicer):
    async def tokenize(self, request: pb.EncodeRequest) -> pb.EncodeResponse:
        [tokens] = await operations.tokenize(
            self.service, [request.inputs], add_special_tokens=request.add_special_tokens,
            prompt_name=_prompt_name(request))
        return pb.EncodeResponse(tokens=[
            pb.SimpleToken(id=t.id, text=t.text, special=t.special, start=t.start, stop=t.stop)
            for t in tokens])

    async def decode(self, request: pb.DecodeRequest) -> pb.DecodeResponse:
        [text] = await operations.decode(self.service, [list(request.ids)],
                                         skip_special_tokens=request.skip_special_tokens)
        return pb.DecodeResponse(text=text)

    Tokenize = unary(tokenize)
    TokenizeStream = streaming(tokenize)
    Decode = unary(decode)
    DecodeStream = streaming(decode)


def servicers(state: AppState) -> dict[str, _Servicer]:
    """Every tei.v1 servicer, by its full service name."""
    made = {cls.__name__.removesuffix("Servicer"): cls(state)
            for cls in (InfoServicer, EmbedServicer, PredictServicer, RerankServicer,
                        TokenizeServicer)}
    assert set(made) == set(pb.DESCRIPTOR.services_by_name), "one servicer per service"
    return {f"tei.v1.{name}": servicer for name, servicer in made.items()}
