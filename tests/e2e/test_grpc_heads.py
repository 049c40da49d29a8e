"""`embedserve --grpc` on classifier and re-ranker models, with the real grpcio client: Predict,
PredictPair, Rerank and their streams answer what the HTTP API answers; Bearer auth."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from router.grpc.protos import pb, services
from tests.e2e.grpc_server import NOT_SERVING, SERVING, GrpcServer, http_and_grpc
from tests.e2e.server import Server
from tests.e2e.test_grpc_embed import close, ok, status_of
from tests.fixtures.heads import LABELS, make_tiny_classifier

QUERY = "what is the capital of france?"
DOCS = ["Paris is the capital and largest city of France.", "hi", "the cat sat on the dog",
        "France's capital city is Paris, on the Seine."]
KEY = "s3cret"
AUTH = (("authorization", f"Bearer {KEY}"),)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Iterator[tuple[Server, GrpcServer]]:
    root = tmp_path_factory.mktemp("grpc-classifier")
    model = make_tiny_classifier(root / "model", LABELS)
    with http_and_grpc("--model-id", str(model), "--max-batch-tokens", "512", root=root) as both:
        yield both


@pytest.fixture(scope="module")
def reranker(tmp_path_factory) -> Iterator[tuple[Server, GrpcServer]]:
    """Served with --api-key (both APIs): every call below but health and reflection sends it."""
    root = tmp_path_factory.mktemp("grpc-reranker")
    model = make_tiny_classifier(root / "model", ["score"], seed=1)
    with http_and_grpc("--model-id", str(model), "--max-batch-tokens", "512", "--api-key", KEY,
                       root=root) as both:
        both[0].client.headers["authorization"] = f"Bearer {KEY}"
        yield both


def same_predictions(reply: pb.PredictResponse, theirs: list[dict]) -> None:
    assert [p.label for p in reply.predictions] == [p["label"] for p in theirs]
    close([p.score for p in reply.predictions], [p["score"] for p in theirs])


@pytest.mark.parametrize("raw_scores", [False, True])
def test_predict_and_predict_pair_equal_http(classifier, raw_scores: bool) -> None:
    http, rpc = classifier
    stub = services.PredictStub(rpc.channel)
    inputs = [[DOCS[0]], [QUERY, DOCS[0]], [DOCS[2]]]
    theirs = ok(http.client.post("/predict", json={"inputs": inputs, "raw_scores": raw_scores}))
    same_predictions(stub.Predict(pb.PredictRequest(inputs=DOCS[0], raw_scores=raw_scores)),
                     theirs[0])
    for item, row in zip(inputs, theirs, strict=True):
        reply = stub.PredictPair(pb.PredictPairRequest(inputs=item, raw_scores=raw_scores))
        same_predictions(reply, row)
        assert reply.metadata.compute_chars == sum(len(text) for text in item)
    streamed = stub.PredictPairStream(iter(
        pb.PredictPairRequest(inputs=item, raw_scores=raw_scores) for item in inputs))
    for reply, row in zip(streamed, theirs, strict=True):
        same_predictions(reply, row)
    singles = stub.PredictStream(iter(
        pb.PredictRequest(inputs=item[0], raw_scores=raw_scores) for item in inputs[::2]))
    for reply, row in zip(singles, theirs[::2], strict=True):
        same_predictions(reply, row)


def test_classifier_health_and_errors(classifier) -> None:
    _, rpc = classifier
    assert rpc.health("tei.v1.Predict") == SERVING
    assert rpc.health("tei.v1.Embed") == rpc.health("tei.v1.Rerank") == NOT_SERVING
    stub = services.PredictStub(rpc.channel)
    code, details = status_of(lambda: stub.PredictPair(
        pb.PredictPairRequest(inputs=["a", "b", "c"])))
    # TEI's words, which its clients may match.
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT,
                               "`inputs` must have a single or two elements. Given: 3")
    assert status_of(lambda: list(stub.PredictPairStream(iter([pb.PredictPairRequest()])))) == \
        (grpc.StatusCode.INVALID_ARGUMENT, "`inputs` must have a single or two elements. Given: 0")
    assert status_of(lambda: services.EmbedStub(rpc.channel).Embed(
        pb.EmbedRequest(inputs="a")))[0] == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("raw_scores", [False, True])
def test_rerank_and_rerank_stream_equal_http(reranker, raw_scores: bool) -> None:
    http, rpc = reranker
    stub = services.RerankStub(rpc.channel)
    theirs = ok(http.client.post("/rerank", json={"query": QUERY, "texts": DOCS,
                                                  "return_text": True,
                                                  "raw_scores": raw_scores}))
    reply = stub.Rerank(pb.RerankRequest(query=QUERY, texts=DOCS, return_text=True,
                                         raw_scores=raw_scores), metadata=AUTH)
    streamed = stub.RerankStream(iter(
        # Only the first message's raw_scores / return_text count (TEI's rule).
        pb.RerankStreamRequest(query=QUERY, text=text, return_text=i == 0,
                               raw_scores=raw_scores and i == 0)
        for i, text in enumerate(DOCS)), metadata=AUTH)
    for answer in (reply, streamed):
        assert [r.index for r in answer.ranks] == [r["index"] for r in theirs]
        assert [r.text for r in answer.ranks] == [r["text"] for r in theirs]
        close([r.score for r in answer.ranks], [r["score"] for r in theirs])
    assert streamed.metadata.compute_chars == sum(len(QUERY) + len(d) for d in DOCS)
    assert streamed.metadata.compute_tokens == reply.metadata.compute_tokens
    plain = stub.Rerank(pb.RerankRequest(query=QUERY, texts=DOCS), metadata=AUTH)
    assert not any(r.HasField("text") for r in plain.ranks)


def test_rerank_errors(reranker) -> None:
    _, rpc = reranker
    assert rpc.health("tei.v1.Rerank") == rpc.health("tei.v1.Predict") == SERVING
    stub = services.RerankStub(rpc.channel)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(lambda: stub.Rerank(pb.RerankRequest(query=QUERY), metadata=AUTH))[0] == \
        invalid
    assert status_of(lambda: stub.RerankStream(iter([]), metadata=AUTH))[0] == invalid
    too_many = pb.RerankRequest(query=QUERY, texts=["t"] * 33)  # --max-client-batch-size 32
    assert status_of(lambda: stub.Rerank(too_many, metadata=AUTH))[0] == invalid
    # A stream's texts are kept only to be returned: then they are bounded as one body is
    # (--payload-limit, 2 MB), and otherwise each is dropped once scored.
    big = "paris " * 150_000

    def stream(return_text: bool):
        return stub.RerankStream(iter(pb.RerankStreamRequest(query=QUERY, text=big,
                                                             truncate=True,
                                                             return_text=return_text)
                                      for _ in range(3)), metadata=AUTH)

    code, details = status_of(lambda: stream(True))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "return_text" in details
    assert len(stream(False).ranks) == 3


def test_api_key_is_required_except_for_health_and_reflection(reranker) -> None:
    _, rpc = reranker
    stub = services.RerankStub(rpc.channel)
    request = pb.RerankRequest(query=QUERY, texts=DOCS)
    calls = {
        "unary": lambda md: stub.Rerank(request, metadata=md),
        "client stream": lambda md: stub.RerankStream(
            iter([pb.RerankStreamRequest(query=QUERY, text="a")]), metadata=md),
        "bidi stream": lambda md: list(services.TokenizeStub(rpc.channel).TokenizeStream(
            iter([pb.EncodeRequest(inputs="a")]), metadata=md)),
        "info": lambda md: services.InfoStub(rpc.channel).Info(pb.InfoRequest(), metadata=md),
    }
    for name, call in calls.items():
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", KEY),)):
            code, _ = status_of(lambda call=call, metadata=metadata: call(metadata))
            assert code == grpc.StatusCode.UNAUTHENTICATED, (name, metadata)
        call(AUTH)  # the right key passes
    assert rpc.health() == SERVING  # health needs no key
    reflection = reflection_pb2_grpc.ServerReflectionStub(rpc.channel)
    [answer] = reflection.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")]))
    assert "tei.v1.Rerank" in {s.name for s in answer.list_services_response.service}
