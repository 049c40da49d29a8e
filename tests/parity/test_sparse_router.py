"""Inference-free SPLADE (a SparseEncoder whose only module is a Router of a SparseStaticEmbedding
query route and a SPLADE document route) served from its own files: the document route by the
worker, the query route by the router's lookup (router/query_route.py), against
SparseEncoder.encode_document / encode_query / encode (fp32, CPU); the route and prompt each
request gets; and the Routers that are refused. Tiny random checkpoints."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from backend_worker.engine import Engine
from backend_worker.heads import build_head, run_head
from router import tokenization
from router.inputs import InputRules
from router.query_route import QueryVectors
from router.results import densify
from shared.errors import ConfigError, EmbedServeError
from shared.modelinfo import ModelInfo, load_model_info
from shared.protocol import BatchArrays
from shared.sparse_router import QueryRoute
from tests.fixtures.sparse import make_inference_free

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOL = 1e-4
TEXTS = ["The weather is lovely today.", "hi hi hi", "   ",
         "a query with many words " * 12,  # past the 128-token limit: cut on the right
         "what is the capital of france?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_inference_free(tmp_path_factory.mktemp("router") / "model", max_active_dims=9)


def encodings(info: ModelInfo, texts: list[str], max_length: int, special: bool) -> list:
    tokenization._load(str(info.tokenizer_path), info.lowercase, info.model_type)
    outcome = tokenization._encode(texts, max_length, "right", None, special)
    assert outcome.error is None, outcome.error
    return outcome.value


def rules(info: ModelInfo, prompts: dict[str, str] | None = None,
          default_prompt: str | None = None) -> InputRules:
    return InputRules(max_input_length=info.max_input_length, max_client_batch_size=32,
                      vocab_size=info.vocab_size,
                      prompts=info.prompts if prompts is None else prompts,
                      default_prompt=default_prompt)


def queries(info: ModelInfo, **kw) -> QueryVectors:
    assert info.query_route is not None
    return QueryVectors(info.query_route, info.splade_spec.max_active_dims, info.vocab_size,
                        rules(info, **kw))


def documents(info: ModelInfo, texts: list[str]) -> np.ndarray:
    engine = Engine.load(info)
    head = build_head(info, engine.device)
    assert head is not None
    ids = [e.ids for e in encodings(info, texts, info.max_input_length, True)]
    lengths = [len(i) for i in ids]
    arrays = BatchArrays(np.concatenate(ids), np.concatenate([np.arange(n) for n in lengths]),
                         np.zeros(sum(lengths), dtype=np.int32),
                         np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    _, dim, offsets, indices, values = run_head(engine, head)(arrays)
    return densify([(indices[a:b], values[a:b]) for a, b in itertools.pairwise(offsets)], dim)


def test_both_routes_match_sparse_encoder(model_dir: Path) -> None:
    from sentence_transformers import SparseEncoder

    info = load_model_info(model_dir)
    assert info.pooling == "splade" and info.query_route is not None
    assert info.model_dir == str(model_dir / "document_0_MLMTransformer")
    encoder = SparseEncoder(str(model_dir), device="cpu")
    side = queries(info)
    assert side.rules.max_input_length == 128  # the query tokenizer's own, no special tokens
    assert len(encodings(info, TEXTS[3:4], None, False)[0].ids) > 128, "a cut to check"
    query_rows = side.vectors(encodings(info, TEXTS, 128, False))
    # What /embed_sparse sends: indices ascending, no zero entries (SparseEncoder's sparse rows).
    assert all((np.diff(ids) > 0).all() and (values != 0).all() for ids, values in query_rows)
    ours = {"query": densify(query_rows, info.vocab_size), "document": documents(info, TEXTS)}
    expected = {
        "query": encoder.encode_query(TEXTS, convert_to_tensor=True).to_dense().numpy(),
        "document": encoder.encode_document(TEXTS, convert_to_tensor=True).to_dense().numpy(),
    }
    for route in ("query", "document"):
        diff = float(np.abs(ours[route] - expected[route]).max())
        assert diff <= TOL, (route, diff)
        assert np.array_equal(ours[route] != 0, expected[route] != 0), route
    # encode() takes the default route, the document one here.
    plain = encoder.encode(TEXTS, convert_to_tensor=True).to_dense().numpy()
    assert float(np.abs(ours["document"] - plain).max()) <= TOL
    nonzero = (ours["query"] != 0).sum(axis=1)
    assert nonzero[2] == 0 and nonzero.max() == 9, "no tokens: no entries; max_active_dims"
    assert (ours["query"] < 0).any(), "negative weights kept by magnitude"


def test_the_route_and_the_prompt_each_request_gets(model_dir: Path) -> None:
    info = load_model_info(model_dir)
    side = queries(info, prompts={"query": "q: ", "passage": "p: "}, default_prompt="p: ")
    assert side.choose("query") == (side, "q: ")
    # A route named, without a prompt of that name: no prompt (encode_document's "document"
    # prompt, "" unless set), not the default one.
    assert side.choose("document") == (None, None)
    assert side.choose(None) == (None, "p: ")  # the default route (document)
    assert side.choose("passage") == (None, "p: ")  # a prompt, on the default route
    with pytest.raises(EmbedServeError, match="not found in the Sentence Transformers prompts"):
        side.choose("nope")
    assert info.query_route is not None
    without_default = QueryVectors(QueryRoute(**{**_fields(info.query_route), "default": None}),
                                   None, info.vocab_size, rules(info))
    assert without_default.choose("query")[0] is without_default
    for name in (None, "document_ish"):
        with pytest.raises(EmbedServeError, match="no default route"):
            without_default.choose(name)


def test_a_named_route_without_its_prompt_gets_none_as_encode_query_does(
        model_dir: Path, tmp_path: Path) -> None:
    """A file without "query" / "document" prompts but with a default prompt: SparseEncoder
    fills those prompts with "", so encode_query / encode_document use no prompt while encode
    uses the default one."""
    from sentence_transformers import SparseEncoder

    root = _copy(model_dir, tmp_path)
    path = root / "config_sentence_transformers.json"
    path.write_text(json.dumps({**json.loads(path.read_text()),
                                "prompts": {"passage": "zebra apple "},
                                "default_prompt_name": "passage"}))
    info = load_model_info(root)
    side = queries(info, default_prompt="zebra apple ")
    encoder = SparseEncoder(str(root), device="cpu")
    texts = TEXTS[:2]
    route, prompt = side.choose("query")
    assert route is side
    ours = densify(side.vectors(encodings(info, [(prompt or "") + t for t in texts], 128,
                                          False)), info.vocab_size)
    expected = encoder.encode_query(texts, convert_to_tensor=True).to_dense().numpy()
    assert float(np.abs(ours - expected).max()) <= TOL
    for name, encode in (("document", encoder.encode_document), (None, encoder.encode)):
        route, prompt = side.choose(name)
        assert route is None
        ours = documents(info, [(prompt or "") + t for t in texts])
        expected = encode(texts, convert_to_tensor=True).to_dense().numpy()
        assert float(np.abs(ours - expected).max()) <= TOL, name


def _fields(route: QueryRoute) -> dict:
    return {name: getattr(route, name) for name in route.__struct_fields__}


def test_a_query_route_default_is_taken_without_a_name(tmp_path: Path) -> None:
    model_dir = make_inference_free(tmp_path / "model", default_route="query")
    info = load_model_info(model_dir)
    assert info.query_route is not None and info.query_route.default == "query"
    side = queries(info)
    assert side.choose(None)[0] is side and side.choose("document")[0] is None


def test_a_peft_adapter_on_the_document_route_is_refused(model_dir: Path,
                                                         tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    transformer_dir = Path(load_model_info(copy).model_dir)
    (transformer_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ConfigError, match="PEFT adapter") as info:
        load_model_info(copy)
    assert str(transformer_dir) in str(info.value)


def test_the_query_weights_are_checked(model_dir: Path, tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    info = load_model_info(model_dir)
    assert info.query_route is not None
    bad = tmp_path / "model.safetensors"
    save_file({"weight": np.ones(info.vocab_size - 1, dtype=np.float32)}, str(bad))
    route = QueryRoute(**{**_fields(info.query_route), "weights_path": str(bad)})
    with pytest.raises(ConfigError, match=r"one tensor `weight` of \[237\]"):
        QueryVectors(route, None, info.vocab_size, rules(info))


def test_bfloat16_query_weights_are_refused_by_name(model_dir: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    info = load_model_info(model_dir)
    assert info.query_route is not None
    bad = tmp_path / "model.safetensors"
    save_file({"weight": torch.ones(info.vocab_size, dtype=torch.bfloat16)}, str(bad))
    route = QueryRoute(**{**_fields(info.query_route), "weights_path": str(bad)})
    with pytest.raises(ConfigError, match="float16/32/64"):
        QueryVectors(route, None, info.vocab_size, rules(info))


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_])
def test_non_float_query_weights_are_refused_not_cast(model_dir: Path, tmp_path: Path,
                                                      dtype: type) -> None:
    # An integer (quantized) weight cast to float32 would weigh every query token wrongly.
    from safetensors.numpy import save_file

    info = load_model_info(model_dir)
    assert info.query_route is not None
    bad = tmp_path / "model.safetensors"
    save_file({"weight": np.ones(info.vocab_size, dtype=dtype)}, str(bad))
    route = QueryRoute(**{**_fields(info.query_route), "weights_path": str(bad)})
    with pytest.raises(ConfigError, match="not floating point"):
        QueryVectors(route, None, info.vocab_size, rules(info))


def test_query_weights_from_an_idf_file_are_refused(model_dir: Path, tmp_path: Path) -> None:
    """SparseStaticEmbedding.load reads a config `path` ending in .json instead of its
    model.safetensors."""
    root = _copy(model_dir, tmp_path)
    path = root / "query_0_SparseStaticEmbedding" / "config.json"
    path.write_text(json.dumps({"frozen": True, "path": "idf.json"}))
    with pytest.raises(ConfigError, match=r"idf\.json"):
        load_model_info(root)


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    return copy


def _edit_router(root: Path, **changes: object) -> None:
    path = root / "router_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if key in ("structure", "types"):
            config[key] = value
        else:
            config["parameters"][key] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(("changes", "named"), [
    ({"structure": {"query": ["query_0_SparseStaticEmbedding"]}}, "routes"),
    ({"structure": {"query": ["query_0_SparseStaticEmbedding"],
                    "document": ["document_0_MLMTransformer"]}}, "routes"),
    ({"structure": {"a": ["query_0_SparseStaticEmbedding"],
                    "b": ["query_0_SparseStaticEmbedding"]}}, "routes"),
    ({"structure": {"query": ["query_0_SparseStaticEmbedding"],
                    "document": ["document_0_MLMTransformer", "document_1_SpladePooling"],
                    "other": ["document_0_MLMTransformer", "document_1_SpladePooling"]}},
     "routes"),
    ({"structure": {"query": ["query_0_SparseStaticEmbedding", "document_1_SpladePooling"],
                    "document": ["document_0_MLMTransformer", "document_1_SpladePooling"]}},
     "routes"),
    ({"structure": {"query": ["query_0_SparseStaticEmbedding"],
                    "document": ["document_0_MLMTransformer", "document_0_MLMTransformer",
                                 "document_1_SpladePooling"]}}, "routes"),
    ({"route_mappings": {"query,text": "query"}}, "route_mappings"),
    ({"default_route": "passage"}, "default_route 'passage'"),
    ({"types": {"query_0_SparseStaticEmbedding": "custom.Module",
                "document_0_MLMTransformer":
                    "sentence_transformers.sparse_encoder.models.MLMTransformer",
                "document_1_SpladePooling":
                    "sentence_transformers.sparse_encoder.models.SpladePooling"}},
     "repository's own code"),
])
def test_other_routers_are_refused(model_dir: Path, tmp_path: Path, changes: dict,
                                   named: str) -> None:
    root = _copy(model_dir, tmp_path)
    _edit_router(root, **changes)
    with pytest.raises(ConfigError, match=named):
        load_model_info(root)


def test_a_router_beside_other_modules_is_refused(model_dir: Path, tmp_path: Path) -> None:
    root = _copy(model_dir, tmp_path)
    path = root / "modules.json"
    modules = json.loads(path.read_text())
    path.write_text(json.dumps([*modules, {"idx": 1, "name": "1", "path": "1_Normalize",
                                           "type": "sentence_transformers.models.Normalize"}]))
    with pytest.raises(ConfigError, match="Router must be the only module"):
        load_model_info(root)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "tokenizer.json"])
def test_routes_with_different_tokenizers_are_refused(model_dir: Path, tmp_path: Path,
                                                      name: str) -> None:
    root = _copy(model_dir, tmp_path)
    path = root / "query_0_SparseStaticEmbedding" / name
    path.write_text(json.dumps({**json.loads(path.read_text()), "do_lower_case": False}))
    with pytest.raises(ConfigError, match="different tokenizers"):
        load_model_info(root)


def test_lower_casing_documents_only_is_refused(model_dir: Path, tmp_path: Path) -> None:
    root = _copy(model_dir, tmp_path)
    path = root / "document_0_MLMTransformer" / "sentence_bert_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "do_lower_case": True}))
    with pytest.raises(ConfigError, match="do_lower_case"):
        load_model_info(root)


@pytest.mark.parametrize(("parameters", "default"), [
    ({"default_route": None}, "query"),  # allow_empty_key: the first route
    ({"default_route": None, "allow_empty_key": None}, "query"),  # (its default is true)
    ({"default_route": None, "allow_empty_key": False}, None),
])
def test_the_default_route_is_the_routers(model_dir: Path, tmp_path: Path, parameters: dict,
                                          default: str | None) -> None:
    """Router's rule: default_route, else (allow_empty_key, true unless set) the first route."""
    root = _copy(model_dir, tmp_path)
    path = root / "router_config.json"
    config = json.loads(path.read_text())
    for key, value in parameters.items():
        if value is None:
            config["parameters"].pop(key, None)
        else:
            config["parameters"][key] = value
    path.write_text(json.dumps(config))
    info = load_model_info(root)
    assert info.query_route is not None and info.query_route.default == default


def test_the_query_route_keeps_its_tokenizers_limit(model_dir: Path, tmp_path: Path) -> None:
    """A document limit below the query tokenizer's: queries are cut at the latter, as
    SparseStaticEmbedding's tokenizer call does; a tokenizer without a limit gives none."""
    from sentence_transformers import SparseEncoder

    root = _copy(model_dir, tmp_path)
    path = root / "document_0_MLMTransformer" / "sentence_bert_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "max_seq_length": 32}))
    info = load_model_info(root)
    side = queries(info)
    assert info.max_input_length == 32 and side.rules.max_input_length == 128
    ours = densify(side.vectors(encodings(info, TEXTS[3:4], 128, False)), info.vocab_size)
    encoder = SparseEncoder(str(root), device="cpu")
    expected = encoder.encode_query(TEXTS[3:4], convert_to_tensor=True).to_dense().numpy()
    assert float(np.abs(ours - expected).max()) <= TOL
    path.write_text(json.dumps({**json.loads(path.read_text()), "max_seq_length": None}))
    for limit, expected_limit in ((64, 64), (1e30, None)):
        for folder in ("query_0_SparseStaticEmbedding", "document_0_MLMTransformer"):
            path = root / folder / "tokenizer_config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()),
                                        "model_max_length": limit}))
        info = load_model_info(root)  # (the document route's: its folder's tokenizer limit)
        assert info.query_route is not None and info.query_route.max_length == expected_limit
        assert info.max_input_length == (expected_limit or 128)


def test_pooling_overrides(model_dir: Path) -> None:
    assert load_model_info(model_dir, pooling_override="splade").query_route is not None
    with pytest.raises(ConfigError, match="served as SPLADE"):
        load_model_info(model_dir, pooling_override="mean")


def test_missing_query_weights_are_named(model_dir: Path, tmp_path: Path) -> None:
    root = _copy(model_dir, tmp_path)
    (root / "query_0_SparseStaticEmbedding" / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"model\.safetensors not found"):
        load_model_info(root)


def test_a_token_past_the_query_weights_is_the_tokenizers_error(model_dir: Path) -> None:
    from router.tokenization import Encoded

    info = load_model_info(model_dir)
    ids = np.asarray([3, info.vocab_size], dtype=np.int32)
    with pytest.raises(EmbedServeError, match=f"token id {info.vocab_size} has no weight") as err:
        queries(info).vectors([Encoded(ids, ids)])
    assert err.value.error_type.value == "Tokenizer"
