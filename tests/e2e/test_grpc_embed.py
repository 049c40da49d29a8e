"""`embedserve --grpc` on embedding models, with the real grpcio client: every Embed and Tokenize
RPC (unary and stream) answers what the HTTP API answers for the same inputs; Info, health,
reflection, the lifecycle and the error statuses."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2
from grpc_health.v1.health_pb2_grpc import HealthStub as grpc_health_stub
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from router.grpc.protos import pb, services
from tests.e2e.grpc_server import NOT_SERVING, SERVING, GrpcServer, grpc_serving, http_and_grpc
from tests.e2e.server import EMBEDSERVE, Server, free_port
from tests.fixtures.heads import make_tiny_mlm
from tests.fixtures.prometheus import samples, total
from tests.fixtures.tiny import make_tiny_bert

PROMPTS = {"query": "query: "}
TEXTS = ["The weather is lovely today.", "hi", "a b c d e f g", "Zebra!", "x" * 40,
         "It's so sunny outside!", "tokens and more tokens", "é ü ß", "1 2 3", "end"]
LONG = "word " * 200  # past the tiny model's 128 tokens
LEFT = pb.TRUNCATION_DIRECTION_LEFT


def ok(response) -> object:
    assert response.status_code == 200, response.text
    return response.json()


def close(grpc_values, http_values) -> None:
    # gRPC carries float32; HTTP the same float32 values as JSON decimals.
    np.testing.assert_allclose(np.asarray(grpc_values, dtype=np.float64),
                               np.asarray(http_values, dtype=np.float64), rtol=1e-5, atol=1e-6)


def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


@pytest.fixture(scope="module")
def embedder(tmp_path_factory) -> Iterator[tuple[Server, GrpcServer]]:
    root = tmp_path_factory.mktemp("grpc-embedder")
    model = make_tiny_bert(root / "model", prompts=PROMPTS)
    with http_and_grpc("--model-id", str(model), "--max-batch-tokens", "512", root=root) as both:
        yield both


@pytest.fixture(scope="module")
def embed_stub(embedder):
    return services.EmbedStub(embedder[1].channel)


def test_health_per_service(embedder) -> None:
    _, rpc = embedder
    for name in ("", "tei.v1.Info", "tei.v1.Tokenize", "tei.v1.Embed"):
        assert rpc.health(name) == SERVING, name
    for name in ("tei.v1.Predict", "tei.v1.Rerank"):
        assert rpc.health(name) == NOT_SERVING, name
    assert status_of(lambda: rpc.health("tei.v1.Nope"))[0] == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(embedder) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(embedder[1].channel)
    [answer] = stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in answer.list_services_response.service}
    assert {"tei.v1.Info", "tei.v1.Embed", "tei.v1.Predict", "tei.v1.Rerank", "tei.v1.Tokenize",
            "grpc.health.v1.Health"} <= names
    [found] = stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="tei.v1.EmbedRequest")]))
    assert found.file_descriptor_response.file_descriptor_proto  # the .proto, for grpcurl
    # TEI's descriptor is named `tei.proto`; clients may ask for the file by that name.
    [by_name] = stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(file_by_filename="tei.proto")]))
    [proto] = by_name.file_descriptor_response.file_descriptor_proto
    assert descriptor_pb2.FileDescriptorProto.FromString(proto).package == "tei.v1"


def test_reflection_v1_answers_as_v1alpha(embedder) -> None:
    # v1 is what current grpcurl / grpcui / Postman ask first; its messages are v1alpha's.
    info = embedder[1].channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    [answer] = info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    assert "tei.v1.Embed" in {s.name for s in answer.list_services_response.service}


def test_metrics_are_served_on_their_own_port(embedder) -> None:
    # Over gRPC there is no /metrics on the API port: --prometheus-port serves it (TEI's 9000
    # unless set; the test server sets a free port).
    rpc = embedder[1]
    services.EmbedStub(rpc.channel).Embed(pb.EmbedRequest(inputs="counted"))
    scrape = httpx.get(f"http://127.0.0.1:{rpc.metrics_port}/metrics", timeout=10)
    assert scrape.status_code == 200
    assert samples(scrape.text)['te_request_success{method="single"}'] >= 1


def test_keepalive_pings_do_not_end_an_idle_stream(embedder) -> None:
    # grpc-core's default server policy sends GOAWAY "too many pings" after a few pings
    # without data; TEI's tonic server has no such policy, and clients ping idle streams.
    options = [("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.max_pings_without_data", 0)]
    with grpc.insecure_channel(f"127.0.0.1:{embedder[1].port}", options=options) as channel:
        watch = grpc_health_stub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
        code, _ = status_of(lambda: list(watch))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED  # not UNAVAILABLE "Too many pings"


def test_an_undecodable_stream_message_is_answered_not_logged_as_a_crash(embedder) -> None:
    raw = embedder[1].channel.stream_stream("/tei.v1.Embed/EmbedStream",
                                            request_serializer=lambda b: b,
                                            response_deserializer=pb.EmbedResponse.FromString)
    good = pb.EmbedRequest(inputs="hi").SerializeToString()
    replies = raw(iter([good, b"\xff\xff\xff"]))
    first = next(replies)
    assert len(first.embeddings) > 0
    code, details = status_of(lambda: next(replies))
    assert code == grpc.StatusCode.INTERNAL
    assert "decode" in details and "internal server error" not in details


@pytest.mark.parametrize("method", ["/tei.v1.Embed/Embed", "/tei.v1.Tokenize/Decode"])
def test_an_undecodable_unary_request_is_internal_as_in_tei(embedder, method) -> None:
    raw = embedder[1].channel.unary_unary(method, request_serializer=lambda b: b,
                                          response_deserializer=lambda b: b)
    code, details = status_of(lambda: raw(b"\xff\xff\xff"))
    assert code == grpc.StatusCode.INTERNAL  # grpc's own answer would be UNKNOWN
    assert "decode" in details and "internal server error" not in details


def test_info_equals_http(embedder) -> None:
    http, rpc = embedder
    theirs = ok(http.client.get("/info"))
    ours = services.InfoStub(rpc.channel).Info(pb.InfoRequest())
    assert ours.model_type == pb.MODEL_TYPE_EMBEDDING
    for field in ("version", "model_id", "model_dtype", "max_concurrent_requests",
                  "max_input_length", "max_batch_tokens", "max_client_batch_size",
                  "tokenization_workers"):
        assert getattr(ours, field) == theirs[field], field
    assert not ours.HasField("max_batch_requests") and theirs["max_batch_requests"] is None


@pytest.mark.parametrize("options", [
    {},
    {"normalize": True},
    {"prompt_name": "query", "normalize": True},
    {"truncate": True},
    {"truncate": True, "truncation_direction": "left"},
])
def test_embed_equals_http(embedder, embed_stub, options: dict) -> None:
    http, _ = embedder
    body = {"normalize": False, **options}  # proto3: normalize is false unless sent
    text = LONG if options.get("truncate") else TEXTS[0]
    response = http.client.post("/embed", json={"inputs": text, **body})
    [theirs] = ok(response)
    if body.get("truncation_direction") == "left":
        body["truncation_direction"] = LEFT
    reply, call = embed_stub.Embed.with_call(pb.EmbedRequest(inputs=text, **body))
    close(reply.embeddings, theirs)
    assert reply.metadata.compute_tokens == int(response.headers["x-compute-tokens"])
    assert reply.metadata.compute_chars == len(text)
    assert reply.metadata.total_time_ns >= reply.metadata.inference_time_ns > 0
    headers = dict(call.initial_metadata())
    assert headers["x-compute-tokens"] == response.headers["x-compute-tokens"]


def test_embed_stream_answers_in_input_order(embedder, embed_stub) -> None:
    http, _ = embedder
    theirs = ok(http.client.post("/embed", json={"inputs": TEXTS}))
    replies = list(embed_stub.EmbedStream(iter(
        pb.EmbedRequest(inputs=text, normalize=True) for text in TEXTS)))
    assert len(replies) == len(TEXTS)
    for reply, text, row in zip(replies, TEXTS, theirs, strict=True):
        close(reply.embeddings, row)
        assert reply.metadata.compute_chars == len(text)


def test_each_call_has_a_request_id_in_its_trailing_metadata(embed_stub) -> None:
    """The client's x-request-id, else a new one, as HTTP's header: with the status too."""
    def echoed(metadata) -> str:
        [request_id] = [value for key, value in metadata if key == "x-request-id"]
        return request_id

    _, call = embed_stub.Embed.with_call(pb.EmbedRequest(inputs="a"),
                                         metadata=(("x-request-id", "grpc-7"),))
    assert echoed(call.trailing_metadata()) == "grpc-7"
    _, call = embed_stub.Embed.with_call(pb.EmbedRequest(inputs="a"))
    assert re.fullmatch(r"[0-9a-f]{32}", echoed(call.trailing_metadata()))
    with pytest.raises(grpc.RpcError) as info:
        embed_stub.Embed(pb.EmbedRequest(inputs=""), metadata=(("x-request-id", "grpc-8"),))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert echoed(info.value.trailing_metadata()) == "grpc-8"


def test_embed_all_and_its_stream_equal_http(embedder, embed_stub) -> None:
    http, _ = embedder
    theirs = ok(http.client.post("/embed_all", json={"inputs": TEXTS[:3]}))
    reply = embed_stub.EmbedAll(pb.EmbedAllRequest(inputs=TEXTS[0]))
    close([t.embeddings for t in reply.token_embeddings], theirs[0])
    streamed = list(embed_stub.EmbedAllStream(iter(
        pb.EmbedAllRequest(inputs=text) for text in TEXTS[:3])))
    for answer, rows in zip(streamed, theirs, strict=True):
        close([t.embeddings for t in answer.token_embeddings], rows)
        assert answer.metadata.compute_tokens == len(rows)


def test_tokenize_and_decode_equal_http(embedder) -> None:
    http, rpc = embedder
    stub = services.TokenizeStub(rpc.channel)
    text = "Café au lait, s'il vous plaît"
    for options in ({"add_special_tokens": True}, {"add_special_tokens": False},
                    {"add_special_tokens": True, "prompt_name": "query"}):
        [theirs] = ok(http.client.post("/tokenize", json={"inputs": text, **options}))
        ours = stub.Tokenize(pb.EncodeRequest(inputs=text, **options)).tokens
        assert [{"id": t.id, "text": t.text, "special": t.special,
                 "start": t.start if t.HasField("start") else None,
                 "stop": t.stop if t.HasField("stop") else None} for t in ours] == theirs
    ids = [t["id"] for t in theirs]
    for skip in (True, False):
        [decoded] = ok(http.client.post("/decode", json={"ids": ids,
                                                         "skip_special_tokens": skip}))
        assert stub.Decode(pb.DecodeRequest(ids=ids, skip_special_tokens=skip)).text == decoded
    streamed = stub.TokenizeStream(iter(pb.EncodeRequest(inputs=t) for t in TEXTS))
    assert [len(r.tokens) for r in streamed] == [
        len(t) for t in ok(http.client.post("/tokenize", json={"inputs": TEXTS,
                                                               "add_special_tokens": False}))]
    decoded = stub.DecodeStream(iter(pb.DecodeRequest(ids=ids[:n], skip_special_tokens=True)
                                     for n in (1, 2, 3)))
    assert [r.text for r in decoded] == ok(http.client.post(
        "/decode", json={"ids": [ids[:1], ids[:2], ids[:3]]}))


def test_error_statuses(embedder, embed_stub) -> None:
    _, rpc = embedder
    invalid, precondition = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
    code, details = status_of(lambda: embed_stub.Embed(pb.EmbedRequest(inputs=LONG)))
    assert code == invalid and "must have less than 128 tokens" in details
    assert status_of(lambda: embed_stub.Embed(pb.EmbedRequest(inputs="")))[0] == invalid
    code, details = status_of(lambda: embed_stub.Embed(
        pb.EmbedRequest(inputs="a", prompt_name="nope")))
    assert code == invalid and "nope" in details
    assert status_of(lambda: services.TokenizeStub(rpc.channel).Decode(
        pb.DecodeRequest(ids=[10**6])))[0] == invalid
    code, details = status_of(lambda: services.PredictStub(rpc.channel).PredictPair(
        pb.PredictPairRequest(inputs=["a", "b", "c"])))  # checked before the model's kind, as TEI
    assert code == invalid and "Given: 3" in details
    for call in (lambda: embed_stub.EmbedSparse(pb.EmbedSparseRequest(inputs="a")),
                 lambda: services.PredictStub(rpc.channel).Predict(pb.PredictRequest(inputs="a")),
                 lambda: services.RerankStub(rpc.channel).Rerank(
                     pb.RerankRequest(query="q", texts=["a"]))):
        assert status_of(call)[0] == precondition


def test_a_truncation_direction_the_proto_does_not_name_is_invalid(embedder, embed_stub) -> None:
    # Proto3 enums are open: 7 arrives as 7 (TEI's server panics on it); never cut silently.
    for call in (
        lambda: embed_stub.Embed(pb.EmbedRequest(inputs=LONG, truncate=True,
                                                 truncation_direction=7)),
        lambda: list(embed_stub.EmbedAllStream(iter([pb.EmbedAllRequest(
            inputs="a", truncation_direction=2)]))),
    ):
        code, details = status_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "truncation_direction" in details


def test_a_failing_stream_message_ends_the_stream_after_the_earlier_replies(embed_stub) -> None:
    requests = [pb.EmbedRequest(inputs="fine"), pb.EmbedRequest(inputs="also fine"),
                pb.EmbedRequest(inputs=LONG), pb.EmbedRequest(inputs="never answered")]
    replies = embed_stub.EmbedStream(iter(requests))
    assert len(next(replies).embeddings) == len(next(replies).embeddings) > 0
    with pytest.raises(grpc.RpcError) as info:
        next(replies)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_embed_sparse_and_its_stream_equal_http(tmp_path) -> None:
    model = make_tiny_mlm(tmp_path / "model")
    with http_and_grpc("--model-id", str(model), "--pooling", "splade",
                       "--max-batch-tokens", "512", root=tmp_path) as (http, rpc):
        assert rpc.health("tei.v1.Embed") == SERVING
        stub = services.EmbedStub(rpc.channel)
        theirs = ok(http.client.post("/embed_sparse", json={"inputs": TEXTS[:4]}))
        reply = stub.EmbedSparse(pb.EmbedSparseRequest(inputs=TEXTS[0]))
        streamed = list(stub.EmbedSparseStream(iter(
            pb.EmbedSparseRequest(inputs=text) for text in TEXTS[:4])))
        for answer, row in zip([reply, *streamed], [theirs[0], *theirs], strict=True):
            assert [v.index for v in answer.sparse_embeddings] == [v["index"] for v in row]
            close([v.value for v in answer.sparse_embeddings], [v["value"] for v in row])
        # As TEI: Embed gives the sparse vector written out in full, unnormalized only.
        dense = stub.Embed(pb.EmbedRequest(inputs=TEXTS[0])).embeddings
        assert {i: v for i, v in enumerate(dense) if v} == pytest.approx(
            {v.index: v.value for v in reply.sparse_embeddings})
        assert status_of(lambda: stub.Embed(pb.EmbedRequest(inputs="a", normalize=True)))[0] \
            == grpc.StatusCode.FAILED_PRECONDITION


def test_streams_wait_for_permits_that_other_clients_hold(tmp_path) -> None:
    """TEI's streams wait for each message's permit: with one permit, three streams at once
    are all answered in full (each was ended RESOURCE_EXHAUSTED by the others' load). A
    message that waited is one request in the metrics, never a refusal as well."""
    model = make_tiny_bert(tmp_path / "model")
    with grpc_serving("--model-id", str(model), "--max-concurrent-requests", "1",
                      log_path=tmp_path / "log") as rpc:
        stub = services.EmbedStub(rpc.channel)
        requests = [pb.EmbedRequest(inputs=f"text {i} " * 20) for i in range(15)]

        def stream(_: int) -> int | tuple:
            try:
                return len(list(stub.EmbedStream(iter(requests), timeout=60)))
            except grpc.RpcError as exc:
                return exc.code(), exc.details()

        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(stream, range(3))) == [len(requests)] * 3
        scrape = httpx.get(f"http://127.0.0.1:{rpc.metrics_port}/metrics", timeout=10)
        counted = samples(scrape.text)
        assert counted['te_request_count{method="single"}'] == 3 * len(requests)
        assert counted['te_request_success{method="single"}'] == 3 * len(requests)
        assert total(counted, "te_request_failure") == 0


def test_not_serving_and_unavailable_until_ready_then_sigterm_exits_zero(tmp_path) -> None:
    model = make_tiny_bert(tmp_path / "model")
    srv = GrpcServer("--model-id", str(model), "--tokenization-workers", "1",
                     log_path=tmp_path / "log")
    try:
        # The port opens before the worker has loaded torch and the model.
        assert srv.first_health() == NOT_SERVING
        stub = services.EmbedStub(srv.channel)
        code, _ = status_of(lambda: stub.Embed(pb.EmbedRequest(inputs="early")))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert srv.health("tei.v1.Info") == SERVING  # answers from the start
        srv.wait_healthy()
        assert len(stub.Embed(pb.EmbedRequest(inputs="ready")).embeddings) > 0
    finally:
        code = srv.stop()
    assert code == 0, srv.log()


def test_a_busy_port_is_a_clear_error(tmp_path) -> None:
    model = make_tiny_bert(tmp_path / "model")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [EMBEDSERVE, "--grpc", "--model-id", str(model), "--hostname", "127.0.0.1",
             "--port", str(port), "--prometheus-port", str(free_port())],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    assert f"cannot listen for gRPC on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
