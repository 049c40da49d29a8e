"""The CUDA-graph latency path without a GPU: bucket choice, padding to a bucket, and the
static-buffer replay discipline, run with the eager stand-in for a graph and a CPU varlen kernel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backend_worker.attention import PackedVarlen, PaddedSDPA, torch_varlen_kernel
from backend_worker.engine import Engine
from backend_worker.graphs import (
    Bucket,
    GraphedPooling,
    choose_bucket,
    eager_capture,
    graph_buckets,
    pad_to_bucket,
)
from shared.modelinfo import load_model_info
from shared.protocol import BatchArrays
from tests.fixtures.capture import opaque, strict_capture
from tests.fixtures.families import make_tiny, pack_offset
from tests.fixtures.tiny import MIXED_TEXTS, make_tiny_bert, pack
from tests.fixtures.varlen import cpu_varlen
from tests.fixtures.zoo import FAMILIES


def batch(lengths: list[int], seed: int = 0) -> BatchArrays:
    rng = np.random.default_rng(seed)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    total = int(cu[-1])
    return BatchArrays(
        input_ids=rng.integers(5, 50, total).astype(np.int32),
        position_ids=np.concatenate([np.arange(n) for n in lengths]).astype(np.int32),
        token_type_ids=np.zeros(total, dtype=np.int32),
        cu_seqlens=cu,
    )


def test_buckets_respect_the_budget_and_are_ordered_by_cost() -> None:
    buckets = graph_buckets(128)
    assert buckets == sorted(buckets)
    assert max(b.tokens for b in buckets) == 128
    assert all(b.sequences < b.tokens for b in buckets)
    assert choose_bucket(buckets, 8, 1) == Bucket(16, 2)
    assert choose_bucket(buckets, 15, 1) == Bucket(16, 2)
    assert choose_bucket(buckets, 16, 1) == Bucket(32, 2)  # no room left for a filler
    assert choose_bucket(buckets, 40, 5) == Bucket(64, 8)
    assert choose_bucket(buckets, 129, 1) is None  # too big: eager
    assert choose_bucket(buckets, 100, 40) == Bucket(128, 64)
    assert choose_bucket(buckets, 120, 40) is None  # 24 fillers no longer fit in 128 tokens


def test_buckets_are_ordered_by_cost_whatever_order_they_are_given_in() -> None:
    assert graph_buckets(64, tokens=(64, 16), sequences=(8, 2)) == [
        Bucket(16, 2), Bucket(16, 8), Bucket(64, 2), Bucket(64, 8)]
    seen: list[int] = []

    def forward(ids, positions, types, cu, max_len: int) -> torch.Tensor:
        seen.append(max_len)
        return torch.zeros(cu.shape[0] - 1, 4)

    graphed = GraphedPooling(forward, [Bucket(16, 2), Bucket(64, 8), Bucket(32, 2)],
                             torch.device("cpu"))
    # Largest captured first (the later, smaller graphs reuse the pool it sized).
    assert seen == [64, 32, 16]
    assert graphed.bucket_for(batch([3])) == Bucket(16, 2)  # the cheapest that fits


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=70))
def test_padding_fills_a_bucket_exactly_and_keeps_the_real_batch(lengths: list[int]) -> None:
    arrays = batch(lengths)
    buckets = graph_buckets(512)
    bucket = choose_bucket(buckets, sum(lengths), len(lengths))
    if bucket is None:
        assert not any(b.fits(sum(lengths), len(lengths)) for b in buckets)
        return
    assert all(not b.fits(sum(lengths), len(lengths)) for b in buckets if b < bucket)
    padded = pad_to_bucket(arrays, bucket)
    assert padded.input_ids.shape == padded.position_ids.shape == (bucket.tokens,)
    assert padded.cu_seqlens.shape == (bucket.sequences + 1,)
    assert padded.cu_seqlens[-1] == bucket.tokens
    assert (np.diff(padded.cu_seqlens) >= 1).all(), "no empty sequence, ever"
    n, total = len(lengths), sum(lengths)
    assert np.array_equal(padded.cu_seqlens[: n + 1], arrays.cu_seqlens)
    for name in ("input_ids", "position_ids", "token_type_ids"):
        assert np.array_equal(getattr(padded, name)[:total], getattr(arrays, name))
    # Fillers are token 0 at position 0: in range for any model, however long the filler.
    assert not padded.input_ids[total:].any() and not padded.position_ids[total:].any()


def test_padding_refuses_a_batch_that_does_not_fit() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        pad_to_bucket(batch([10, 10]), Bucket(16, 8))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return str(make_tiny_bert(tmp_path_factory.mktemp("graphs") / "tiny", pooling="mean"))


def test_replayed_buckets_equal_the_eager_forward(tiny_dir: str) -> None:
    info = load_model_info(tiny_dir)
    eager = Engine.load(info)  # padded SDPA: the reference path
    packed = Engine.load(info, attention=PackedVarlen(torch_varlen_kernel(cpu_varlen)))
    assert packed.capture_graphs(256, eager_capture)
    assert packed.graphs is not None
    texts = list(MIXED_TEXTS)
    for count in (1, 2, 5):
        arrays, _ = pack(tiny_dir, texts[:count])
        bucket = packed.graphs.bucket_for(arrays)
        assert bucket is not None, f"{count} inputs should take a graph"
        np.testing.assert_allclose(packed.embed(arrays), eager.embed(arrays), atol=1e-5)
    # Replaying a bucket again with other inputs overwrites the static buffers cleanly.
    arrays, _ = pack(tiny_dir, texts[3:4])
    np.testing.assert_allclose(packed.embed(arrays), eager.embed(arrays), atol=1e-5)
    # Too big for any captured bucket: the eager packed path answers.
    big, _ = pack(tiny_dir, texts * 4)
    assert packed.graphs.bucket_for(big) is None
    np.testing.assert_allclose(packed.embed(big), eager.embed(big), atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_replays_graphs_equal_to_its_eager_forward(tmp_path, family: str) -> None:
    """Graphs for every family of the zoo, position biases (MPNet, ALiBi), windows and causal
    decoders included: replayed buckets answer as the padded CPU path does."""
    model_dir = FAMILIES[family](tmp_path / family)
    info = load_model_info(model_dir)
    eager = Engine.load(info)
    packed = Engine.load(info, attention=PackedVarlen(torch_varlen_kernel(opaque(cpu_varlen))))
    # Under capture's rules: no device reads, no tensors from host data in the captured run.
    assert packed.capture_graphs(256, strict_capture) and packed.graphs is not None
    for count in (1, 3):
        arrays, _ = pack_offset(model_dir, MIXED_TEXTS[:count], info.position_offset)
        assert packed.graphs.bucket_for(arrays) is not None
        np.testing.assert_allclose(packed.embed(arrays), eager.embed(arrays), atol=1e-4)


# The graph pieces whose dtypes meet inside a half-precision graph: a float32 content bias cast
# to the scores' dtype (DeBERTa), capped scores (Gemma 2, in its CUDA default bfloat16), a float
# position-bias mask and the float16 clamp's device-computed limit (mT5 under --dtype float16),
# router weights and expert gates (MoE), an int64 id map beside float weights (model2vec).
HALF_PRECISION_FAMILIES = [("deberta-v3", torch.float16), ("gemma2-capped", torch.bfloat16),
                           ("mt5-gated", torch.float16), ("nomic-moe", torch.float16),
                           ("static-model2vec-quantized", torch.float16)]


@pytest.mark.parametrize(("family", "dtype"), HALF_PRECISION_FAMILIES,
                         ids=[family for family, _ in HALF_PRECISION_FAMILIES])
def test_half_precision_graphs_replay_their_eager_forward(
    tmp_path, family: str, dtype: torch.dtype,
) -> None:
    """A GPU captures graphs in float16 or bfloat16, where the other graph tests run float32:
    replayed buckets give float32 rows equal to the same engine's eager packed forward, and
    near the float32 oracle."""
    model_dir = FAMILIES[family](tmp_path / family)
    info = load_model_info(model_dir)
    oracle = Engine.load(info)
    packed = Engine.load(info, dtype=dtype,
                         attention=PackedVarlen(torch_varlen_kernel(opaque(cpu_varlen))))
    arrays, _ = pack_offset(model_dir, MIXED_TEXTS[:3], info.position_offset)
    eager = packed.embed(arrays)  # before capture: no graph to replay
    assert packed.capture_graphs(256, strict_capture) and packed.graphs is not None
    assert packed.graphs.bucket_for(arrays) is not None
    replayed = packed.embed(arrays)
    assert replayed.dtype == np.float32
    np.testing.assert_allclose(replayed, eager, atol=2e-2, rtol=2e-2)
    want = oracle.embed(arrays)
    cosines = (replayed * want).sum(1) / (np.linalg.norm(replayed, axis=1)
                                          * np.linalg.norm(want, axis=1))
    assert cosines.min() >= 0.999


def test_a_batch_that_leaves_a_prompt_out_runs_eagerly_beside_the_graphs(tiny_dir: str) -> None:
    """The graphs pool every token: a batch whose pooling leaves a prompt out must not replay
    one, though a bucket fits it (its vectors would average the prompt in)."""
    info = load_model_info(tiny_dir)
    eager = Engine.load(info)
    packed = Engine.load(info, attention=PackedVarlen(torch_varlen_kernel(cpu_varlen)))
    assert packed.capture_graphs(256, eager_capture) and packed.graphs is not None
    arrays, _ = pack(tiny_dir, list(MIXED_TEXTS[:3]))
    assert packed.graphs.bucket_for(arrays) is not None
    pool_from = [2, 0, 1]
    ours = packed.embed(arrays, pool_from)
    np.testing.assert_allclose(ours, eager.embed(arrays, pool_from), atol=1e-5)
    assert not np.allclose(ours, packed.embed(arrays), atol=1e-3)  # the prompt counts


def _out_of_range(name: str, value: int):
    def edit(arrays: BatchArrays) -> BatchArrays:
        values = getattr(arrays, name).copy()
        values[1] = value
        return arrays._replace(**{name: values})
    return edit


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graphed"])
@pytest.mark.parametrize(("edit", "message"), [
    (_out_of_range("input_ids", 99999), r"input_ids out of range \[0, \d+\)"),
    (_out_of_range("input_ids", -1), r"input_ids out of range \[0, \d+\)"),
    (_out_of_range("position_ids", 128), r"position_ids out of range \[0, 128\)"),
    (_out_of_range("token_type_ids", 2), r"token_type_ids out of range \[0, 2\)"),
    (lambda a: a._replace(cu_seqlens=a.cu_seqlens - np.int32(1) * (np.arange(3) == 2)),
     "cu_seqlens does not cover input_ids"),
    (lambda a: a._replace(cu_seqlens=np.array([0, 5, 5, 12], dtype=np.int32)),
     "every sequence >= 1 token"),
    (lambda a: a._replace(cu_seqlens=np.array([1, 5, 12], dtype=np.int32)),
     "every sequence >= 1 token"),
], ids=["id-past-vocab", "id-negative", "position", "token-type", "uncovered", "empty", "offset"])
def test_a_batch_breaking_the_routers_invariants_is_refused_by_name(
    tiny_dir: str, graphed: bool, edit, message: str,
) -> None:
    """Checked on the host on either path: on CUDA an index out of range is a device assert
    that kills the worker, not an error for one batch."""
    packed = Engine.load(load_model_info(tiny_dir),
                         attention=PackedVarlen(torch_varlen_kernel(cpu_varlen)))
    if graphed:
        assert packed.capture_graphs(64, eager_capture)
    arrays = edit(batch([5, 7]))
    if graphed:
        assert packed.graphs is not None and packed.graphs.bucket_for(arrays) is not None
    with pytest.raises(ValueError, match=message):
        packed.embed(arrays)


def test_the_padded_path_is_not_captured(tiny_dir: str) -> None:
    engine = Engine.load(load_model_info(tiny_dir), attention=PaddedSDPA())
    assert not engine.capture_graphs(64, eager_capture)
    assert engine.graphs is None


def test_a_capture_that_fails_leaves_every_batch_eager(
    tiny_dir: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """A kernel this torch cannot capture costs short requests their speed-up, not the
    server: the buckets captured before the failure are dropped and batches run eagerly."""
    captured: list[int] = []

    def fails_on_the_third(run):
        captured.append(1)
        if len(captured) == 3:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return eager_capture(run)

    info = load_model_info(tiny_dir)
    packed = Engine.load(info, attention=PackedVarlen(torch_varlen_kernel(cpu_varlen)))
    assert not packed.capture_graphs(256, fails_on_the_third)
    assert packed.graphs is None and len(captured) == 3
    assert "cannot capture CUDA graphs (CUDA error: operation not permitted" in caplog.text
    arrays, _ = pack(tiny_dir, MIXED_TEXTS[:2])
    np.testing.assert_allclose(packed.embed(arrays), Engine.load(info).embed(arrays), atol=1e-5)


def test_out_of_memory_while_capturing_is_not_swallowed(tiny_dir: str) -> None:
    def out_of_memory(run):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    packed = Engine.load(load_model_info(tiny_dir),
                         attention=PackedVarlen(torch_varlen_kernel(cpu_varlen)))
    with pytest.raises(torch.OutOfMemoryError):
        packed.capture_graphs(256, out_of_memory)


@pytest.mark.parametrize("forward", [
    lambda x: x * x.sum().item(),  # a device read
    lambda x: x * torch.tensor([2.0]),  # host data, frozen into the graph at capture
    lambda x: x if bool(x.sum() > 0) else -x,  # a branch on a device value
    lambda x: torch.repeat_interleave(x, x.long()),  # an output size only the data knows
], ids=["item", "tensor", "branch", "repeat_interleave"])
def test_the_capture_stand_in_refuses_what_cuda_capture_refuses(forward) -> None:
    from tests.fixtures.capture import NotCapturable

    x = torch.ones(4)
    with pytest.raises(NotCapturable):
        strict_capture(lambda: forward(x))


def _classifiers() -> dict:
    from tests.fixtures.decoders import decoder_vocab, make_decoder_dir
    from tests.fixtures.heads import LABELS, make_tiny_classifier
    from tests.fixtures.modernbert import bare_modernbert

    return {
        "bert-classifier": lambda p: make_tiny_classifier(p, LABELS),
        "bert-reranker": lambda p: make_tiny_classifier(p, ["score"], seed=1),
        "distilbert": lambda p: make_tiny(p, "distilbert", "DistilBertForSequenceClassification"),
        "modernbert": lambda p: bare_modernbert(
            p, architecture="ModernBertForSequenceClassification"),
        "mistral-window": lambda p: make_decoder_dir(
            p, "mistral", architecture="MistralForSequenceClassification",
            overrides={"sliding_window": 5, "pad_token_id": decoder_vocab()["[PAD]"],
                       "num_labels": 3}),
    }


@pytest.mark.parametrize("kind", ["bert-classifier", "bert-reranker", "distilbert", "modernbert",
                                  "mistral-window"])
def test_classifier_heads_replay_graphs_equal_to_their_eager_logits(tmp_path, kind: str) -> None:
    """Graphs that end in a classifier's head (the re-ranker latency path) answer the logits
    the eager path does; a graph captured for the head is never used for pooling."""
    from backend_worker.heads import build_head, run_head

    model_dir = _classifiers()[kind](tmp_path / kind)
    info = load_model_info(model_dir)
    eager = Engine.load(info)
    packed = Engine.load(info, attention=PackedVarlen(torch_varlen_kernel(opaque(cpu_varlen))))
    head = build_head(info, packed.device)
    assert packed.capture_graphs(256, strict_capture, reduce=head)
    eager_head = build_head(info, eager.device)
    for count in (1, 3):
        arrays, _ = pack_offset(model_dir, MIXED_TEXTS[:count], info.position_offset)
        assert packed.replay(arrays, head) is not None
        assert packed.replay(arrays, packed.pooler) is None
        rows, dim, logits = run_head(packed, head)(arrays)
        want = run_head(eager, eager_head)(arrays)
        assert (rows, dim) == want[:2]
        np.testing.assert_allclose(logits, want[2], atol=1e-4)


def test_a_capture_error_without_a_message_is_still_logged(
    tiny_dir: str, caplog: pytest.LogCaptureFixture,
) -> None:
    def fails(run):
        raise RuntimeError()

    packed = Engine.load(load_model_info(tiny_dir),
                         attention=PackedVarlen(torch_varlen_kernel(cpu_varlen)))
    assert not packed.capture_graphs(256, fails)
    assert "cannot capture CUDA graphs (RuntimeError)" in caplog.text
