"""Inference-free SPLADE: a SparseEncoder whose only module is a `Router` with two routes, as
sentence-transformers saves opensearch-neural-sparse-encoding-doc-* and the like. Documents take
the SPLADE route (a masked-LM Transformer, then SpladePooling: shared/sparse_encoder.py); queries
take the other, one `SparseStaticEmbedding`: a fixed weight (an IDF) for each vocabulary id the
query's tokens have, without special tokens. encode_document / encode_query choose the route by
task; encode alone takes the Router's default route.

The query route needs no model: the router computes it from the weights (router/query_route.py).
Pure data, read from the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from shared.errors import ConfigError
from shared.sparse_encoder import SPLADE_POOLING, is_mlm_transformer
from shared.st_modules import builtin_module, optional_json, read_json, transformer_settings

ROUTER = "Router"
SPARSE_STATIC = "SparseStaticEmbedding"
# transformers' "no limit" model_max_length is ~1e30; anything this large is that sentinel.
_NO_LIMIT_SENTINEL = 10**7


class QueryRoute(msgspec.Struct, frozen=True):
    """The Router's routes by name, and what the query route computes with."""

    query: str  # the SparseStaticEmbedding route
    document: str  # the SPLADE route
    default: str | None  # the route of a request that names none (None: it must name one)
    weights_path: str  # the SparseStaticEmbedding's model.safetensors ("weight": [vocab])
    max_length: int | None  # its tokenizer's model_max_length (None: the document route's)


class RouterLayout(msgspec.Struct, frozen=True):
    """Where the document route's modules are, and the query route."""

    transformer_dir: Path
    pooling_dir: Path
    route: QueryRoute


def parse_router(root: Path) -> RouterLayout:
    """The Router at `root` (modules.json's only module), refused unless it is one SPLADE route
    and one SparseStaticEmbedding route."""
    cfg = read_json(root / "router_config.json")
    types: dict[str, str] = cfg.get("types") or {}
    structure: dict[str, list[str]] = cfg.get("structure") or {}
    params: dict[str, Any] = cfg.get("parameters") or {}
    kinds = {name: builtin_module(root / "router_config.json", str(path))
             for name, path in types.items()}
    query = document = None
    transformer: dict[str, Any] = {}  # the document route's sentence_bert_config.json
    for route, names in structure.items():
        route_kinds = [kinds.get(name, "?") for name in names]
        if route_kinds == [SPARSE_STATIC]:
            query = query or route
        elif len(names) == 2 and route_kinds[1] == SPLADE_POOLING and document is None:
            settings = transformer_settings(root / names[0])
            if is_mlm_transformer(route_kinds[0], settings):
                document, transformer = route, settings
    if len(structure) != 2 or query is None or document is None:
        shape = {route: [kinds.get(n, "?") for n in names] for route, names in structure.items()}
        raise ConfigError(f"{root}/router_config.json: routes {shape} are not supported (only "
                          "inference-free SPLADE: one route of a SparseStaticEmbedding, one of a "
                          "masked-LM Transformer and SpladePooling)")
    if params.get("route_mappings"):
        raise ConfigError(f"{root}/router_config.json: route_mappings "
                          f"{params['route_mappings']!r} are not supported (routes are chosen "
                          "by their name only)")
    default = params.get("default_route")
    if default is None and params.get("allow_empty_key", True):
        default = next(iter(structure))  # sentence-transformers' rule: the first route
    if default is not None and default not in structure:
        raise ConfigError(f"{root}/router_config.json: default_route {default!r} is not one of "
                          f"the routes {list(structure)}")
    transformer_dir, pooling_dir = (root / name for name in structure[document])
    static_dir = root / structure[query][0]
    idf = (optional_json(static_dir / "config.json") or {}).get("path")
    if isinstance(idf, str) and idf.endswith(".json"):
        # SparseStaticEmbedding.load then builds its weights from that file, not its own.
        raise ConfigError(f"{static_dir}/config.json: weights from {idf!r} (a token -> weight "
                          "JSON) are not supported; model.safetensors is read")
    weights = static_dir / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{static_dir}: model.safetensors not found (the query route's "
                          "weights; other formats are not read)")
    query_files = {}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        # One tokenizer serves both routes (the query route without special tokens): the
        # query's must be the document's, as sentence-transformers' own construction makes it.
        query_files[name] = optional_json(static_dir / name)
        if query_files[name] != optional_json(transformer_dir / name):
            raise ConfigError(f"{static_dir}/{name} differs from {transformer_dir}/{name}: "
                              "routes with different tokenizers are not supported")
    if transformer.get("do_lower_case"):
        raise ConfigError(f"{transformer_dir}/sentence_bert_config.json: do_lower_case would "
                          "lower-case documents only; not supported in a Router")
    limit = (query_files["tokenizer_config.json"] or {}).get("model_max_length")
    return RouterLayout(transformer_dir, pooling_dir, QueryRoute(
        query=query, document=document, default=default, weights_path=str(weights),
        max_length=int(limit) if limit is not None and limit < _NO_LIMIT_SENTINEL else None))
