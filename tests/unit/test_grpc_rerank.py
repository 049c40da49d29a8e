"""router/grpc/services.py: Rerank and RerankStream refuse a model of another kind in the words
of TEI's gRPC server (router/src/grpc/server.rs), which are not its HTTP /rerank's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace

import grpc
import pytest

from router.grpc.protos import pb
from router.grpc.services import RerankServicer
from tests.unit.test_service_start import started_stand_in


class _Aborted(Exception):
    pass


class _Context:
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


async def _messages(*texts: str) -> AsyncIterator[pb.RerankStreamRequest]:
    for text in texts:
        yield pb.RerankStreamRequest(query="q", text=text)


def _refusals(kind: str) -> list[tuple[grpc.StatusCode, str]]:
    async def main() -> list[tuple[grpc.StatusCode, str]]:
        service = await started_stand_in()
        service.model_kind = kind
        state = SimpleNamespace(service=service, model=SimpleNamespace(kind=kind),
                                config=SimpleNamespace(max_concurrent_requests=8,
                                                       grpc_max_parallel_stream_requests=None,
                                                       payload_limit=2_000_000))
        servicer = RerankServicer(state)  # type: ignore[arg-type]
        refused = []
        for call in (lambda: servicer.Rerank(pb.RerankRequest(query="q", texts=["a"]),
                                             _Context()),
                     lambda: servicer.Rerank(pb.RerankRequest(query="q"), _Context()),
                     lambda: servicer.RerankStream(_messages("a", "b"), _Context())):
            with pytest.raises(_Aborted) as info:
                await call()
            refused.append(info.value.args)
        await service.stop()
        return refused

    return asyncio.run(main())


@pytest.mark.parametrize(("kind", "message"), [
    ("embedding", "model is not a classifier model"),
    ("classifier", "model is not a re-ranker model"),
])
def test_a_model_of_another_kind_is_refused_in_tei_grpc_words(kind: str, message: str) -> None:
    precondition = grpc.StatusCode.FAILED_PRECONDITION
    rerank, no_texts, stream = _refusals(kind)
    assert rerank == stream == (precondition, message)
    # Empty texts are refused before the model's kind, as TEI's Rerank checks them.
    assert no_texts == (grpc.StatusCode.INVALID_ARGUMENT, "`texts` cannot be empty")
