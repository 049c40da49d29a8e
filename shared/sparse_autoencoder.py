"""sentence-transformers' SparseAutoEncoder (CSR, "Beyond Matryoshka": a SparseEncoder whose sparse
vector is a top-k autoencoder's code of a dense sentence embedding). Its modules.json is
Transformer -> Pooling -> (Normalize) -> SparseAutoEncoder; the vector is hidden_dim wide.

At inference (torch.inference_mode, as SparseEncoder.encode runs it) the module computes, from
the pooled (L2-normalized, where a Normalize module comes before) vector x:
  - with `normalize`: x = (x - mean(x)) / (std(x) + 1e-5), the standard deviation unbiased
    (torch.std's default): not nn.LayerNorm (biased variance, eps under the root);
  - z = encoder.weight @ (x - pre_bias) + latent_bias;
  - z's k largest entries kept (torch.topk: negative ones too, when fewer are positive), the
    others zero, then relu.
k is SparseEncoder's max_active_dims: config_sentence_transformers.json's, else the module's own
`k` (SparseEncoder sets max_active_dims to it when the file names none), and encode() passes it to
the module. Its select_max_active_dims afterwards (top k by magnitude) keeps the same entries.
Pure data, read from the files: the worker's CSR head computes it (backend_worker/csr_head.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from shared.errors import ConfigError
from shared.sparse_encoder import max_active_dims_of
from shared.st_modules import read_json

SPARSE_AUTO_ENCODER = "SparseAutoEncoder"
# The pipelines served (modules.json's kinds); any other place for the module is refused.
_PIPELINES = (("Transformer", "Pooling", SPARSE_AUTO_ENCODER),
              ("Transformer", "Pooling", "Normalize", SPARSE_AUTO_ENCODER))
# SparseAutoEncoder's config_keys with its __init__ defaults (input_dim has none). k_aux and
# dead_threshold are training settings: read by nothing at inference.
_DEFAULTS: dict[str, Any] = {"hidden_dim": 512, "k": 8, "k_aux": 512, "normalize": False,
                             "dead_threshold": 30}
_KEYS = ("input_dim", *_DEFAULTS)


class CsrSpec(msgspec.Struct, frozen=True):
    """One SparseAutoEncoder module, as the worker applies it to the pooled vector."""

    path: str  # the module's folder (its config.json and weights)
    input_dim: int
    hidden_dim: int  # the sparse vector's width
    k: int  # entries kept: max_active_dims, else the module's k
    standardize: bool  # the module's `normalize`: mean 0, unbiased std 1 (+ 1e-5) first
    l2_first: bool  # a Normalize module comes before it: the pooled vector is L2-normalized


def csr_pipeline(root: Path, kinds: list[str]) -> bool:
    """Whether modules.json (its entries' `kinds`) is a CSR SparseEncoder; a SparseAutoEncoder
    anywhere else is refused, as it would be served as something else."""
    if SPARSE_AUTO_ENCODER not in kinds:
        return False
    if tuple(kinds) in _PIPELINES:
        return True
    raise ConfigError(f"{root}/modules.json: {' -> '.join(kinds)} is not supported (a "
                      "SparseAutoEncoder is served only as Transformer -> Pooling -> "
                      "(Normalize) -> SparseAutoEncoder, the last module)")


def _positive(cfg: dict[str, Any], key: str, where: str) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}: {key} {value!r} is not a positive integer")
    return value


def parse_sparse_autoencoder(module_dir: Path, st_config: dict[str, Any], *,
                             l2_first: bool) -> CsrSpec:
    """The SparseAutoEncoder module at `module_dir` (`st_config`: the model's
    config_sentence_transformers.json, where SparseEncoder keeps max_active_dims; `l2_first`:
    a Normalize module comes before it)."""
    where = f"{module_dir}/config.json"
    cfg = read_json(module_dir / "config.json")
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: not a JSON object")
    unknown = sorted(set(cfg) - set(_KEYS))
    if unknown:
        # (sentence-transformers builds the module from these keys: it would refuse them too.)
        raise ConfigError(f"{where}: SparseAutoEncoder settings {unknown} are not known "
                          f"(known: {', '.join(_KEYS)})")
    if "input_dim" not in cfg:
        raise ConfigError(f"{where}: SparseAutoEncoder without input_dim")
    cfg = {**_DEFAULTS, **cfg}
    input_dim, hidden_dim = (_positive(cfg, key, where) for key in ("input_dim", "hidden_dim"))
    if not isinstance(cfg["normalize"], bool):
        raise ConfigError(f"{where}: normalize {cfg['normalize']!r} is not true or false")
    k = max_active_dims_of(st_config, module_dir)
    if k is None:
        k = _positive(cfg, "k", where)
        if k > hidden_dim:  # torch.topk refuses it: SparseEncoder.encode fails
            raise ConfigError(f"{where}: k {k} is more than hidden_dim {hidden_dim}")
    elif k > hidden_dim:
        raise ConfigError(f"{module_dir.parent}/config_sentence_transformers.json: "
                          f"max_active_dims {k} is more than the SparseAutoEncoder's hidden_dim "
                          f"{hidden_dim} ({where})")
    return CsrSpec(path=str(module_dir), input_dim=input_dim, hidden_dim=hidden_dim, k=k,
                   standardize=cfg["normalize"], l2_first=l2_first)


def check_csr(csr: CsrSpec, root: Path, *, hidden_size: int, kind: str,
              pooling_override: str | None, dense_path: str | None) -> None:
    """What a CSR model may not be served with, once the rest of the model is read."""
    if kind != "embedding":
        raise ConfigError(f"{root}/config.json: a SparseAutoEncoder over a {kind} checkpoint "
                          "is not supported")
    if pooling_override == "splade":
        raise ConfigError("--pooling splade: a SparseAutoEncoder model's sparse vectors come from "
                          "its pooled embedding (another --pooling replaces its Pooling mode)")
    if dense_path is not None:
        raise ConfigError(f"--dense-path {dense_path!r}: a Dense module before the "
                          "SparseAutoEncoder is not supported")
    if csr.input_dim != hidden_size:
        raise ConfigError(f"{csr.path}/config.json: input_dim {csr.input_dim} is not the pooled "
                          f"embedding's size {hidden_size}")
