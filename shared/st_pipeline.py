"""A sentence-transformers model's module list (modules.json): where the model's files are, and
what the modules after its Transformer add (Pooling, Dense, Normalize, a LogitScore, SPLADE's
pooling, a SparseAutoEncoder). Each module's own file is parsed by its module (shared/st_modules.py
and the others imported here); the rules that combine the result with config.json are
shared/modelinfo.py's. Pure data: no torch, no tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from shared.errors import ConfigError
from shared.logit_score import LogitScore, parse_logit_score
from shared.sparse_autoencoder import SPARSE_AUTO_ENCODER, CsrSpec, parse_sparse_autoencoder
from shared.sparse_encoder import (
    MLM_TRANSFORMER,
    SPLADE_POOLING,
    SpladeSpec,
    parse_splade_pooling,
)
from shared.sparse_router import ROUTER, RouterLayout, parse_router
from shared.st_modules import (
    DenseSpec,
    builtin_module,
    on_sentence_embedding,
    optional_json,
    parse_dense,
    parse_pooling_config,
    read_json,
)
from shared.static_embedding import static_module_dir

# The order the worker computes a sentence-transformers pipeline in (Dense may repeat).
_PIPELINE_ORDER = {"Transformer": 0, "StaticEmbedding": 0, "Pooling": 1, "Dense": 2,
                   "Normalize": 3, "LogitScore": 4}


@dataclass(frozen=True)
class ModelFiles:
    """Where a model directory's parts are."""

    root: Path  # the directory served (modules.json and the modules' folders)
    modules: list[dict[str, Any]]  # modules.json's entries; [] without one
    kinds: list[str]  # each entry's module type
    # A StaticEmbedding's folder: its tokenizer.json and table are the model's.
    static_dir: Path | None
    layout: RouterLayout | None  # an inference-free SPLADE model's Router
    model_dir: Path  # where config.json (or the static table), tokenizer and weights are


@dataclass(frozen=True)
class Pipeline:
    """What the modules after the Transformer add (and the CLI's --dense replaces)."""

    pooling: str | None  # the Pooling module's mode; None: no Pooling module, or an override
    include_prompt: bool
    dense: list[DenseSpec]
    has_normalize: bool
    logit_score: LogitScore | None
    splade_spec: SpladeSpec
    csr: CsrSpec | None


def locate_model_files(root: Path) -> ModelFiles:
    """Read modules.json and find the folder the model's own files are in; refuses a layout
    served wrong (a Router beside other modules, a Transformer in a sub-folder, a PEFT adapter)."""
    modules = optional_json(root / "modules.json") or []
    kinds = [builtin_module(root / "modules.json", str(module["type"])) for module in modules]
    # A StaticEmbedding's folder holds its tokenizer.json and table: the worker's weights and
    # the router's tokenizer are read there (model_dir), the other modules from the root.
    static_dir = static_module_dir(root, modules, kinds)
    # An inference-free SPLADE model's document route: its Transformer's folder is the model's.
    if ROUTER in kinds and len(kinds) != 1:  # (before its files are looked for)
        raise ConfigError(f"{root}/modules.json: a Router must be the only module ({kinds})")
    layout = parse_router(root) if ROUTER in kinds else None
    _require_transformer_at_root(root, modules, kinds)
    model_dir = static_dir or (layout.transformer_dir if layout else root)
    _refuse_adapters(root, model_dir)
    return ModelFiles(root=root, modules=modules, kinds=kinds, static_dir=static_dir,
                      layout=layout, model_dir=model_dir)


def _require_transformer_at_root(root: Path, modules: list[dict[str, Any]],
                                 kinds: list[str]) -> None:
    for module, kind in zip(modules, kinds, strict=True):
        if kind in ("Transformer", MLM_TRANSFORMER) and (
                (root / module.get("path", "")).resolve() != root.resolve()):
            # Older repositories keep the transformer in a folder of its own (0_BERT/,
            # 0_Transformer/): its config.json and weights are the model's, not the root's.
            raise ConfigError(
                f"{root}/modules.json: the Transformer module is in {module['path']!r}, not at "
                "the model's root; that layout is not supported (move its files to the root "
                "and its path to \"\")")


def _refuse_adapters(root: Path, model_dir: Path) -> None:
    for folder in dict.fromkeys((root, model_dir)):
        if (folder / "adapter_config.json").is_file():
            # transformers (with peft installed) loads the adapter's base model and applies
            # it: served without it, the vectors would be the base model's, silently.
            raise ConfigError(f"{folder}: a PEFT adapter (adapter_config.json) is not applied "
                              "here; merge it into its base model (peft's merge_and_unload, "
                              "then save_pretrained) and serve the merged model")


def read_pipeline(files: ModelFiles, config: dict[str, Any], transformer: dict[str, Any],
                  st_file: dict[str, Any], pooling_override: str | None,
                  dense_path: str | None) -> Pipeline:
    """The modules after the Transformer, then what a Router's document route and --dense
    replace of them."""
    pipeline = _parse_modules(files, config, transformer, st_file, pooling_override)
    if files.layout is not None:
        if pooling_override not in (None, "splade"):
            raise ConfigError(f"--pooling {pooling_override!r}: an inference-free SPLADE model "
                              "(a Router of a query and a document route) is served as SPLADE")
        pipeline = replace(pipeline, pooling="splade",
                           splade_spec=parse_splade_pooling(files.layout.pooling_dir, st_file))
    if dense_path is not None:
        pipeline = replace(pipeline, dense=[parse_dense(files.root / dense_path)])
    return pipeline


def _parse_modules(files: ModelFiles, config: dict[str, Any], transformer: dict[str, Any],
                   st_file: dict[str, Any], pooling_override: str | None) -> Pipeline:
    root, modules = files.root, files.modules
    pooling: str | None = None
    include_prompt = True
    dense: list[DenseSpec] = []
    has_normalize = False
    logit_score: LogitScore | None = None
    splade_spec = SpladeSpec()
    csr: CsrSpec | None = None
    previous = ""  # the module before, in the list's order (sentence-transformers ignores idx)
    for index, (module, kind) in enumerate(zip(modules, files.kinds, strict=True)):
        path = root / module.get("path", "")
        _check_position(root, files.static_dir, index, kind, previous)
        previous = kind
        if kind in ("Transformer", MLM_TRANSFORMER, "StaticEmbedding", ROUTER):
            continue  # (checked above; static_module_dir placed it first; parse_router read it)
        if kind == "Pooling":
            pooling_cfg = read_json(path / "config.json")
            include_prompt = pooling_cfg.get("include_prompt", True) is not False
            if pooling_override is None:  # an override replaces the mode, even one we refuse
                pooling = parse_pooling_config(pooling_cfg, path)
        elif kind == SPLADE_POOLING:
            splade_spec = parse_splade_pooling(path, st_file)
            if pooling_override is None:
                pooling = "splade"
        elif kind == "Dense":
            dense.append(parse_dense(path))
        elif kind == "LogitScore":
            if len(modules) != 2:
                raise ConfigError(f"{root}/modules.json: LogitScore is supported only right "
                                  "after the Transformer, as the last module")
            logit_score = parse_logit_score(root, path, config, transformer)
        elif kind == "Normalize":
            # Its config.json (sentence-transformers 6 writes one) may aim it elsewhere.
            on_sentence_embedding(optional_json(path / "config.json") or {}, path, kind)
            has_normalize = True
        elif kind == SPARSE_AUTO_ENCODER:  # (csr_pipeline placed it: last, after Pooling)
            if not include_prompt:  # (the head pools by itself: no prompt exclusion there)
                raise ConfigError(f"{path}: a SparseAutoEncoder after a Pooling with "
                                  "include_prompt=false is not supported")
            csr = parse_sparse_autoencoder(path, st_file, l2_first=has_normalize)
        else:
            raise ConfigError(
                f"{root}/modules.json: module type {module['type']!r} is not supported "
                "(supported: Transformer, Pooling, Dense, Normalize; LogitScore; "
                "StaticEmbedding; MLMTransformer, SpladePooling; SparseAutoEncoder)"
            )
    return Pipeline(pooling=pooling, include_prompt=include_prompt, dense=dense,
                    has_normalize=has_normalize, logit_score=logit_score,
                    splade_spec=splade_spec, csr=csr)


def _check_position(root: Path, static_dir: Path | None, index: int, kind: str,
                    previous: str) -> None:
    """Refuses a module where the worker would compute it in another order than
    sentence-transformers."""
    if static_dir and index > 0 and kind not in ("Dense", "Normalize"):
        # StaticEmbedding's output is already the sentence embedding (the bag's mean).
        raise ConfigError(f"{root}/modules.json: {kind} after a StaticEmbedding is not "
                          "supported (only Dense and Normalize may follow it)")
    if kind in _PIPELINE_ORDER and previous in _PIPELINE_ORDER and (
            _PIPELINE_ORDER[kind] < _PIPELINE_ORDER[previous]
            or (kind == previous and kind != "Dense")):
        # The worker computes Transformer, Pooling, Dense..., Normalize in that order; any
        # other order (a Dense on the token embeddings, a Dense after Normalize) would be
        # served without an error and give other vectors than sentence-transformers.
        raise ConfigError(f"{root}/modules.json: {kind} after {previous} is not supported "
                          "(only Transformer, Pooling, Dense..., Normalize in that order)")
