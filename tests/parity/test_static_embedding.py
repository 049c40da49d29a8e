"""StaticEmbedding parity: tiny static models made and read by sentence-transformers (its own
save, an earlier version's 0_StaticEmbedding/ folder, model2vec's files, vocabulary-quantized
ones too), tokenized by the router's code and embedded by the engine, against
SentenceTransformer.encode (fp32, CPU). A mean of table rows: equal to ~1e-6."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from backend_worker.engine import Engine
from router import tokenization
from router.results import normalize_rows
from shared.errors import ConfigError
from shared.modelinfo import ModelInfo, load_model_info
from shared.protocol import BatchArrays
from shared.static_embedding import NO_LENGTH_LIMIT, STATIC_MODEL_TYPE
from tests.fixtures.static import make_model2vec, make_static

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COVERS = frozenset({STATIC_MODEL_TYPE})

TOL = 1e-6
TEXTS = [
    "The weather is lovely today.",
    "hi",
    "A much longer input, with punctuation; digits 0123456789 and MiXeD case: it spans "
    "well over forty word pieces so that the bags differ a lot in size.",
    "   ",  # no tokens at all: the empty bag's zeros (normalized, still zeros)
    "\n\t",
    "",  # (the API refuses an empty input; the engine would give zeros too)
]


def pack(info: ModelInfo, texts: list[str], max_length: int | None = None) -> BatchArrays:
    """The router's tokenization (a pool process's functions, in process), packed."""
    tokenization._load(str(info.tokenizer_path), info.lowercase, info.model_type,
                       info.conversations, info.empty_bag_id)
    outcome = tokenization._encode(texts, max_length, "right")
    assert outcome.error is None, outcome.error
    ids = [e.ids for e in outcome.value]
    lengths = [len(i) for i in ids]
    return BatchArrays(
        np.concatenate(ids).astype(np.int32),
        np.concatenate([np.arange(n) for n in lengths]).astype(np.int32),
        np.zeros(sum(lengths), dtype=np.int32),
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
    )


def embed(info: ModelInfo, texts: list[str], prompt: str = "",
          max_length: int | None = None) -> np.ndarray:
    """`pack`, the engine, and the router's normalization where the model has a Normalize
    module."""
    vectors = Engine.load(info).embed(pack(info, [prompt + t for t in texts], max_length))
    return normalize_rows(vectors) if info.has_normalize else vectors


def st_encode(model_dir: Path, texts: list[str], **kwargs: object) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    return model.encode(texts, convert_to_numpy=True, **kwargs)


BUILDS = {
    "normalize": lambda p: make_static(p),
    "plain": lambda p: make_static(p, normalize=False),
    "dense-normalize": lambda p: make_static(p, dense_out=8),
    "0_StaticEmbedding": lambda p: make_static(p, subfolder=True, dense_out=8, normalize=False),
    "model2vec": lambda p: make_model2vec(p),
    "model2vec-quantized": lambda p: make_model2vec(p, quantized=True),
}


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_vectors_equal_sentence_transformers(tmp_path: Path, name: str) -> None:
    model_dir = BUILDS[name](tmp_path / name)
    info = load_model_info(model_dir)
    assert info.model_type == STATIC_MODEL_TYPE and info.pooling == "mean"
    assert info.max_input_length == NO_LENGTH_LIMIT and info.length_unlimited
    got = embed(info, TEXTS)
    expected = st_encode(model_dir, TEXTS)
    assert got.shape == expected.shape == (len(TEXTS), info.embedding_dim)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=TOL)
    empty = [i for i, text in enumerate(TEXTS) if not text.strip()]
    if not info.dense:  # (a Dense gives its bias's activation for zeros)
        assert not got[empty].any()
    # One at a time, the same vectors (no neighbour in the batch leaks in).
    for index in (0, 3):
        np.testing.assert_allclose(embed(info, TEXTS[index:index + 1])[0], got[index], atol=TOL)


def test_the_module_folder_holds_the_weights_and_tokenizer(tmp_path: Path) -> None:
    info = load_model_info(make_static(tmp_path / "m", subfolder=True))
    assert Path(info.model_dir) == tmp_path / "m" / "0_StaticEmbedding"
    assert info.tokenizer_path == Path(info.model_dir) / "tokenizer.json"
    assert info.empty_bag_id == info.vocab_size and info.input_id_rows == info.vocab_size + 1


def test_prompts_are_prepended_as_sentence_transformers_does(tmp_path: Path) -> None:
    prompts = {"query": "query: ", "document": "passage: "}
    model_dir = make_static(tmp_path / "m", prompts=prompts, default_prompt_name="query")
    info = load_model_info(model_dir)
    assert info.prompts == prompts and info.default_prompt_name == "query"
    expected = st_encode(model_dir, TEXTS)  # its default prompt
    np.testing.assert_allclose(embed(info, TEXTS, prompt="query: "), expected, atol=TOL)
    expected = st_encode(model_dir, TEXTS, prompt_name="document")
    np.testing.assert_allclose(embed(info, TEXTS, prompt="passage: "), expected, atol=TOL)


def test_the_tokenizer_files_truncation_applies(tmp_path: Path) -> None:
    """StaticEmbedding keeps tokenizer.json's truncation: it is the model's input limit."""
    model_dir = make_static(tmp_path / "m", truncate=3)
    info = load_model_info(model_dir)
    assert info.max_input_length == 3 and not info.length_unlimited
    np.testing.assert_allclose(embed(info, TEXTS), st_encode(model_dir, TEXTS), atol=TOL)
    # With a request's truncation at a longer limit, the file's shorter one still applies.
    np.testing.assert_allclose(embed(info, TEXTS, max_length=100), st_encode(model_dir, TEXTS),
                               atol=TOL)


def test_the_routers_limit_cuts_past_the_files(tmp_path: Path) -> None:
    """A limit shorter than the file's (the batch budget) cuts there: the first tokens' mean."""
    info = load_model_info(make_static(tmp_path / "m", normalize=False))
    cut = embed(info, ["The weather is lovely today."], max_length=2)
    tokenization._load(str(info.tokenizer_path), empty_bag_id=info.empty_bag_id)
    ids = tokenization._encode(["The weather"], None, "right").value[0].ids
    assert len(ids) == 2
    np.testing.assert_allclose(cut, embed(info, ["The weather"]), atol=TOL)


def test_token_ids_past_the_table_are_a_tokenizer_error(tmp_path: Path) -> None:
    """A tokenizer with more ids than the table has rows: StaticEmbedding raises IndexError
    on such a text; the router answers a tokenizer error, never the empty bag's row."""
    from safetensors.numpy import save_file

    model_dir = make_model2vec(tmp_path / "m")
    rows = np.random.default_rng(0).standard_normal((100, 16)).astype(np.float32)
    save_file({"embeddings": rows}, str(model_dir / "model.safetensors"))
    info = load_model_info(model_dir)
    assert info.empty_bag_id == 100
    tokenization._load(str(info.tokenizer_path), empty_bag_id=info.empty_bag_id)
    assert tokenization._encode(["1 2 a"], None, "right").error is None  # low ids: fine
    outcome = tokenization._encode(["weather"], None, "right")  # a whole word, id > 100
    assert outcome.error is not None and "100-row embedding table" in outcome.error


def test_a_token_id_equal_to_the_tables_rows_is_not_the_empty_bag(tmp_path: Path) -> None:
    """The first id past the table is the empty bag's stand-in: a text tokenized to it is
    refused as any id past the table, never averaged as the stand-in's zeros."""
    from safetensors.numpy import save_file

    model_dir = make_model2vec(tmp_path / "m")
    tokenization._load(str(model_dir / "tokenizer.json"), empty_bag_id=237)
    (hello,) = tokenization._encode(["hello"], None, "right").value[0].ids
    rows = np.random.default_rng(0).standard_normal((int(hello), 16)).astype(np.float32)
    save_file({"embeddings": rows}, str(model_dir / "model.safetensors"))
    info = load_model_info(model_dir)
    assert info.empty_bag_id == hello
    tokenization._load(str(info.tokenizer_path), empty_bag_id=info.empty_bag_id)
    outcome = tokenization._encode(["hello"], None, "right")
    assert outcome.error is not None and f"{hello}-row embedding table" in outcome.error


def test_a_lower_casing_setting_beside_it_is_not_applied(tmp_path: Path) -> None:
    """StaticEmbedding reads no sentence_bert_config.json: a do_lower_case there (a leftover
    at the root) does not lower-case the texts it tokenizes."""
    model_dir = make_static(tmp_path / "m")
    (model_dir / "sentence_bert_config.json").write_text(json.dumps({"do_lower_case": True}))
    assert not load_model_info(model_dir).lowercase


def _rewrite_weights(model_dir: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(model_dir / "model.safetensors"))


@pytest.mark.parametrize(("tensors", "match"), [
    ({"embeddings": np.zeros((237, 4), dtype=np.int8)}, r"embeddings is I8.*integer"),
    ({"embeddings": np.zeros((237, 4), dtype=np.float32),
      "extra": np.zeros(3, dtype=np.float32)}, r"unexpected tensors.*'extra'"),
    ({"embeddings": np.zeros((10, 4), dtype=np.float32),
      "mapping": np.arange(237, dtype=np.int64)}, r"mapping points outside the 10 rows"),
    ({"embeddings": np.zeros((10, 4), dtype=np.float32),
      "mapping": np.zeros(237, dtype=np.int64),
      "weights": np.ones(5, dtype=np.float32)}, r"weights has 5 entries.*237"),
    ({"other": np.zeros((237, 4), dtype=np.float32)}, r"neither embedding.weight"),
    ({"embeddings": np.zeros((237, 4), dtype=np.float16)}, r"F16 embeddings table.*float32"),
    # A mapping alone does not promote the rows (only per-token weights do).
    ({"embeddings": np.zeros((10, 4), dtype=np.float16),
      "mapping": np.zeros(237, dtype=np.int64)}, r"F16 embeddings table.*float32"),
    # One past the last row (the worker's empty bag's id) is outside the table too.
    ({"embeddings": np.zeros((10, 4), dtype=np.float32),
      "mapping": np.full(237, 10, dtype=np.int64)}, r"mapping points outside the 10 rows"),
])
def test_tables_not_reproduced_are_refused(tmp_path: Path, tensors: dict[str, np.ndarray],
                                           match: str) -> None:
    model_dir = make_model2vec(tmp_path / "m")
    _rewrite_weights(model_dir, tensors)
    with pytest.raises(ConfigError, match=match):
        load_model_info(model_dir)


def test_a_half_precision_table_with_weights_is_folded_in_float32(tmp_path: Path) -> None:
    """Per-token weights promote model2vec's float16 rows to float32 when StaticEmbedding
    folds them: that float32 table is what it averages, and what is served."""
    rng = np.random.default_rng(5)
    model_dir = make_model2vec(tmp_path / "m")
    _rewrite_weights(model_dir, {
        "embeddings": rng.standard_normal((50, 16)).astype(np.float16),
        "mapping": rng.integers(0, 50, 237).astype(np.int64),
        "weights": rng.uniform(0.1, 2.0, 237).astype(np.float16),
    })
    info = load_model_info(model_dir)
    np.testing.assert_allclose(embed(info, TEXTS), st_encode(model_dir, TEXTS), atol=TOL)


def test_a_pytorch_bin_table_is_refused_by_name(tmp_path: Path) -> None:
    model_dir = make_model2vec(tmp_path / "m")
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"pytorch_model.bin is not read for StaticEmbedding"):
        load_model_info(model_dir)


def _edit_modules(model_dir: Path, edit) -> None:
    listing = json.loads((model_dir / "modules.json").read_text())
    (model_dir / "modules.json").write_text(json.dumps(edit(listing)))


def test_pipelines_not_reproduced_are_refused(tmp_path: Path) -> None:
    model_dir = make_static(tmp_path / "m")
    static, normalize = json.loads((model_dir / "modules.json").read_text())
    pooling = {"idx": 1, "name": "p", "path": "1_Pooling",
               "type": "sentence_transformers.models.Pooling"}
    (model_dir / "1_Pooling").mkdir()
    (model_dir / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_mean_tokens": True}))
    _edit_modules(model_dir, lambda m: [static, pooling, normalize])
    with pytest.raises(ConfigError, match=r"Pooling after a StaticEmbedding"):
        load_model_info(model_dir)
    _edit_modules(model_dir, lambda m: [normalize, static])
    with pytest.raises(ConfigError, match=r"StaticEmbedding must be the first module"):
        load_model_info(model_dir)
    # A Transformer (or a second StaticEmbedding) after it would be left uncomputed.
    transformer = {"idx": 1, "name": "t", "path": "",
                   "type": "sentence_transformers.models.Transformer"}
    for second in (transformer, {**transformer, "type": "sentence_transformers.models."
                                 "StaticEmbedding"}):
        _edit_modules(model_dir, lambda m, s=second: [static, s, normalize])
        with pytest.raises(ConfigError, match=r"after a StaticEmbedding is not supported"):
            load_model_info(model_dir)


def test_pooling_other_than_the_bags_mean_is_refused(tmp_path: Path) -> None:
    model_dir = make_static(tmp_path / "m")
    with pytest.raises(ConfigError, match=r"--pooling 'cls'.*only mean pooling"):
        load_model_info(model_dir, pooling_override="cls")
    assert load_model_info(model_dir, pooling_override="mean").pooling == "mean"


def test_captured_graphs_give_the_empty_bag_zeros(tmp_path: Path) -> None:
    """The latency path (CUDA graphs, here under capture's rules on the CPU) computes the same
    rows, the empty bag's stand-in id included."""
    from backend_worker.attention import PackedVarlen, torch_varlen_kernel
    from tests.fixtures.capture import opaque, strict_capture
    from tests.fixtures.varlen import cpu_varlen

    info = load_model_info(make_model2vec(tmp_path / "m", quantized=True))
    packed = Engine.load(info, attention=PackedVarlen(torch_varlen_kernel(opaque(cpu_varlen))))
    assert packed.capture_graphs(256, strict_capture) and packed.graphs is not None
    arrays = pack(info, TEXTS)
    assert packed.graphs.bucket_for(arrays) is not None
    got = packed.embed(arrays)
    np.testing.assert_allclose(got, Engine.load(info).embed(arrays), atol=TOL)
    assert not got[3:].any()
