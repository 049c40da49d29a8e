"""The CUDA path against the fp32 CPU oracle: fp16/bf16 packed attention, captured graphs, the
varlen kernel's masks, warm-up out of memory, and the real server on a GPU. Every test
here needs CUDA; bench/gpu_check.sh runs them."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from backend_worker.attention import MaskSpec, PackedVarlen, PaddedSDPA, select_attention
from backend_worker.engine import Engine
from backend_worker.graphs import cuda_capture
from shared.modelinfo import load_model_info
from tests.fixtures.families import pack_offset
from tests.fixtures.tiny import MIXED_TEXTS, make_tiny_bert, pack
from tests.fixtures.zoo import FAMILIES

COSINE = 0.999  # fp16 / bf16 against the fp32 oracle, per vector (fp32 itself: 0.99999)
DTYPES = [torch.float16, torch.bfloat16]

def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_on_cuda_matches_the_cpu_oracle(tmp_path: Path, family: str,
                                               dtype: torch.dtype) -> None:
    model_dir = FAMILIES[family](tmp_path / family)
    info = load_model_info(model_dir)
    oracle = Engine.load(info)
    engine = Engine.load(info, device="cuda", dtype=dtype)
    assert isinstance(engine.attention, PackedVarlen), engine.attention.name
    # With the family's position offset, as the router packs (RoBERTa, MPNet: pad_token_id + 1).
    arrays, _ = pack_offset(model_dir, MIXED_TEXTS * 3, info.position_offset)
    got, want = engine.embed(arrays), oracle.embed(arrays)
    assert np.isfinite(got).all()
    assert cosines(got, want).min() >= COSINE


@pytest.mark.parametrize("family", ["bert-mean", "modernbert", "qwen3-lasttoken"])
def test_float32_on_cuda_attends_padded_like_the_cpu_oracle(tmp_path: Path, family: str) -> None:
    """--dtype float32 on a GPU: the varlen kernels have no float32, so the engine takes padded
    SDPA at start (backend_worker/attention) instead of failing its warm-up."""
    model_dir = FAMILIES[family](tmp_path / family)
    info = load_model_info(model_dir)
    engine = Engine.load(info, device="cuda", dtype=torch.float32)
    assert isinstance(engine.attention, PaddedSDPA), engine.attention.name
    arrays, _ = pack_offset(model_dir, MIXED_TEXTS * 3, info.position_offset)
    got, want = engine.embed(arrays), Engine.load(info).embed(arrays)
    assert cosines(got, want).min() >= 0.9999


@pytest.fixture(scope="module")
def bge_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real-sized stack: bge-base's shape with random weights (bench/models.py)."""
    from bench.models import random_model
    from tests.gpu.tokenizer import bert_tokenizer_dir

    root = tmp_path_factory.mktemp("bge")
    return random_model("bge-base", root, bert_tokenizer_dir(root))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bge_base_shape_on_cuda_matches_the_cpu_oracle(bge_base: Path, dtype: torch.dtype) -> None:
    """Long and short inputs through a real-sized stack."""
    model_dir = bge_base
    info = load_model_info(model_dir)
    texts = ["a short query", "word " * 500, *(f"passage {i} " * (i * 7) for i in range(1, 30))]
    arrays, _ = pack(model_dir, texts, max_length=info.max_input_length)
    want = Engine.load(info).embed(arrays)
    got = Engine.load(info, device="cuda", dtype=dtype).embed(arrays)
    assert cosines(got, want).min() >= COSINE


def test_graph_replay_equals_the_eager_cuda_forward(tmp_path: Path) -> None:
    model_dir = make_tiny_bert(tmp_path / "tiny", pooling="mean")
    info = load_model_info(model_dir)
    eager = Engine.load(info, device="cuda", dtype=torch.float16)
    graphed = Engine.load(info, device="cuda", dtype=torch.float16)
    assert graphed.capture_graphs(1024, cuda_capture())
    for count in (1, 3, 5):
        arrays, _ = pack(model_dir, MIXED_TEXTS[:count])
        assert graphed.graphs is not None and graphed.graphs.bucket_for(arrays) is not None
        np.testing.assert_allclose(graphed.embed(arrays), eager.embed(arrays), atol=2e-3)
    # Another batch through the same bucket: static inputs were overwritten, not mixed.
    first, _ = pack(model_dir, [MIXED_TEXTS[1]])
    np.testing.assert_allclose(graphed.embed(first), eager.embed(first), atol=2e-3)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_replays_graphs_like_the_cpu_oracle(tmp_path: Path, family: str) -> None:
    """Captured graphs for every family, position biases (block-diagonal SDPA inside the
    graph) and windows included."""
    model_dir = FAMILIES[family](tmp_path / family)
    info = load_model_info(model_dir)
    oracle = Engine.load(info)
    engine = Engine.load(info, device="cuda", dtype=torch.float16)
    assert engine.capture_graphs(512, cuda_capture())
    for count in (1, 3):
        arrays, _ = pack_offset(model_dir, MIXED_TEXTS[:count], info.position_offset)
        assert engine.graphs is not None and engine.graphs.bucket_for(arrays) is not None
        assert cosines(engine.embed(arrays), oracle.embed(arrays)).min() >= COSINE


@pytest.mark.parametrize("labels", [["a", "b", "c"], ["score"]], ids=["classifier", "reranker"])
def test_classifier_graphs_answer_the_cpu_logits(tmp_path: Path, labels: list[str]) -> None:
    """Graphs ending in a classifier head: the re-ranker latency path."""
    from backend_worker.heads import build_head, run_head
    from tests.fixtures.heads import make_tiny_classifier

    model_dir = make_tiny_classifier(tmp_path / "c", labels)
    info = load_model_info(model_dir)
    oracle = Engine.load(info)
    engine = Engine.load(info, device="cuda", dtype=torch.float16)
    head = build_head(info, engine.device)
    assert engine.capture_graphs(512, cuda_capture(), reduce=head)
    arrays, _ = pack(model_dir, MIXED_TEXTS[:3])
    assert engine.replay(arrays, head) is not None
    got = run_head(engine, head)(arrays)[2]
    want = run_head(oracle, build_head(info, oracle.device))(arrays)[2]
    np.testing.assert_allclose(got, want, atol=2e-2)


@pytest.mark.parametrize("which", ["splade-sum", "lexical"])
def test_sparse_heads_on_cuda_answer_the_cpu_vectors(tmp_path: Path, which: str) -> None:
    """A SparseEncoder's own SPLADE settings (sum, log1p_relu) and BGE-M3's lexical weights,
    from float16 hidden states, against the fp32 CPU vectors."""
    from backend_worker.heads import build_head, run_head
    from backend_worker.lexical import build_lexical, run_lexical
    from router.results import densify
    from tests.fixtures.lexical import make_m3
    from tests.fixtures.sparse import make_sparse_encoder

    model_dir = (make_sparse_encoder(tmp_path / "s", strategy="sum", activation="log1p_relu")
                 if which == "splade-sum" else make_m3(tmp_path / "m"))
    info = load_model_info(model_dir)

    def vectors(engine: Engine) -> np.ndarray:
        if info.lexical is not None:
            run = run_lexical(engine, build_lexical(info.lexical, info.hidden_size,
                                                    info.vocab_size, engine.device))
        else:
            head = build_head(info, engine.device)
            assert head is not None
            run = run_head(engine, head)
        arrays, _ = pack_offset(model_dir, [t for t in MIXED_TEXTS if isinstance(t, str)],
                                info.position_offset)
        _, dim, offsets, indices, values = run(arrays)
        return densify([(indices[a:b], values[a:b]) for a, b in itertools.pairwise(offsets)],
                       dim)

    got = vectors(Engine.load(info, device="cuda", dtype=torch.float16))
    want = vectors(Engine.load(info))
    assert np.isfinite(got).all() and (got >= 0).all()
    weighted = want.any(axis=1)  # (a text may have no weighted token at all)
    assert got[~weighted].max(initial=0.0) < 0.05  # (a weight at the relu's edge may differ)
    assert cosines(got[weighted], want[weighted]).min() >= COSINE


@pytest.mark.parametrize("mask", [MaskSpec(), MaskSpec(causal=True), MaskSpec(window=3),
                                  MaskSpec(causal=True, window=5), MaskSpec(scale=0.2)],
                         ids=["plain", "causal", "window", "causal-window", "scale"])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_varlen_kernel_masks_match_padded_sdpa(mask: MaskSpec, kv_heads: int) -> None:
    packed = select_attention("cuda")
    assert isinstance(packed, PackedVarlen)
    lengths = [1, 9, 33, 4, 70]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    gen = torch.Generator(device="cuda").manual_seed(0)
    total = int(cu[-1])
    q = torch.randn(total, 8, 64, device="cuda", dtype=torch.float16, generator=gen)
    k = torch.randn(total, kv_heads, 64, device="cuda", dtype=torch.float16, generator=gen)
    v = torch.randn(total, kv_heads, 64, device="cuda", dtype=torch.float16, generator=gen)
    cu_t = torch.from_numpy(cu.astype(np.int64)).cuda()
    got = packed.attend(q, k, v, packed.prepare(cu_t, cu), mask)
    padded = PaddedSDPA()
    want = padded.attend(q.float(), k.float(), v.float(), padded.prepare(cu_t, cu), mask)
    torch.testing.assert_close(got.float(), want, atol=5e-3, rtol=5e-3)


def test_warm_up_out_of_memory_names_the_flag(tmp_path: Path, bge_base: Path) -> None:
    from tests.e2e.server import Server

    # 2^25 tokens through bge-base in float32: the embedding output alone is 103 GB, more than
    # an H100 or an H200 holds, while the warm-up batch's host arrays stay ~0.5 GB.
    server = Server("--model-id", str(bge_base), "--device", "cuda",
                    "--max-batch-tokens", str(2**25), log_path=tmp_path / "log")
    try:  # (the per-test timeout of gpu_check.sh is 90 s)
        code = server.process.wait(timeout=75)
    finally:  # not left holding the GPU through the tests and the benchmark after it
        server.stop()
    log = (tmp_path / "log").read_text()
    assert code != 0
    assert "--max-batch-tokens" in log and "out of memory" in log, log[-2000:]


def test_server_on_cuda_answers_like_sentence_transformers(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from tests.e2e.server import serving

    model_dir = make_tiny_bert(tmp_path / "tiny", pooling="mean")
    texts = [t if isinstance(t, str) else t[0] for t in MIXED_TEXTS]
    want = SentenceTransformer(str(model_dir), device="cpu").encode(texts)
    with serving("--model-id", str(model_dir), "--device", "cuda",
                 log_path=tmp_path / "server.log", dtype=None) as server:
        info = server.client.get("/info").json()
        assert "cuda" in json.dumps(info)
        assert info["model_dtype"] == "float16"  # CUDA's default
        got = np.array(server.client.post("/embed", json={"inputs": texts}).json())
        one = np.array(server.client.post("/embed", json={"inputs": texts[0]}).json())
    assert cosines(got, want).min() >= COSINE
    assert cosines(one, want[:1]).min() >= COSINE


# In a child process: the device-side assert poisons that process's CUDA context for good.
_POISON = """
import torch
from backend_worker.main import device_fault
cuda = torch.device("cuda")
assert device_fault(cuda) is None
try:
    torch.zeros(2, device=cuda)[torch.tensor([5], device=cuda)].cpu()  # out of bounds
except RuntimeError:
    pass
print("FAULT:", device_fault(cuda))
"""


def test_a_poisoned_cuda_context_is_seen_as_a_lost_device() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _POISON], capture_output=True, text=True,
                          timeout=120, check=True)
    fault = done.stdout.split("FAULT:", 1)[1].strip()
    assert fault != "None" and "CUDA" in fault, done.stdout + done.stderr
