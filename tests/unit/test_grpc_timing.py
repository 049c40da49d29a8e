"""router/grpc/services.py: the Metadata of a stream's reply times the message as TEI does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest

from router.grpc.protos import pb
from router.grpc.services import EmbedServicer
from tests.unit.test_service_start import (
    holding_every_permit,
    started_stand_in,
    tokenized_as_three_tokens,
)


class _Context:
    async def abort(self, code, details: str) -> None:
        raise AssertionError(f"{code}: {details}")


async def _one(request: pb.EmbedRequest) -> AsyncIterator[pb.EmbedRequest]:
    yield request


def test_a_stream_message_waiting_for_permits_starts_its_total_time_once_admitted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """TEI's stream starts a message's clock after its permit: the wait for other clients'
    permits is not in total_time_ns."""
    tokenized_as_three_tokens(monkeypatch)

    async def main() -> pb.Metadata:
        service = await started_stand_in()
        state = SimpleNamespace(service=service, model=SimpleNamespace(kind="embedding"),
                                config=SimpleNamespace(max_concurrent_requests=8,
                                                       grpc_max_parallel_stream_requests=None))
        servicer = EmbedServicer(state)  # type: ignore[arg-type]
        release = asyncio.Event()
        holder = asyncio.ensure_future(holding_every_permit(service, release))
        await asyncio.sleep(0)
        replies = servicer.EmbedStream(_one(pb.EmbedRequest(inputs="x")), _Context())
        first = asyncio.ensure_future(replies.__anext__())
        await asyncio.sleep(0.5)  # the message waits for a permit all along
        release.set()
        reply = await first
        await replies.aclose()
        await holder
        await service.stop()
        return reply.metadata

    metadata = asyncio.run(main())
    assert metadata.compute_tokens == 3
    assert metadata.total_time_ns < 250_000_000  # not the 500 ms spent waiting
