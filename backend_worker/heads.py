"""Build and load the head a model serves: a sequence classifier (LOGITS) or SPLADE's MLM head
(SPARSE), as its family describes them (a `FamilyHeads` in the family's model file); or a
LogitScore re-ranker's score, from two rows of its LM head (backend_worker/logit_score_head.py);
or a CSR SparseEncoder's SparseAutoEncoder, from its own folder (backend_worker/csr_head.py).

Loaded strictly from the same checkpoint as the encoder. The encoder's WeightMap ignores exactly
the keys a head owns (`pooler.*`, `classifier.*`, `cls.*` for BERT); the head's map owns those
namespaces and ignores everything else, so between the two loads every key is used once and a
missing or stray head key names itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from backend_worker.cpu_linear import pack_linears, packing_available
from backend_worker.csr_head import build_csr_head
from backend_worker.head_modules import FamilyHeads, Head, HeadKeys, LogitsHead
from backend_worker.loading import Rule, WeightMap, checkpoint_files, iter_tensors, load_strict
from backend_worker.logit_score_head import build_logit_score_head
from backend_worker.models import model_class
from backend_worker.models.registry import supported_with_heads
from shared.errors import ConfigError
from shared.modelinfo import ModelInfo
from shared.protocol import BatchArrays


def _family(info: ModelInfo) -> FamilyHeads:
    heads = model_class(info.config).heads
    if heads is None:
        raise ConfigError(
            f"config.json: model_type {info.model_type!r} has no classification or MLM heads "
            f"here (as in TEI); heads are served for {', '.join(supported_with_heads())}"
        )
    return heads


def _has_key(files: list[Path], family: WeightMap, rule: Rule) -> bool:
    """Whether the checkpoint holds the key of `rule` (under any of the family's prefixes)."""
    from safetensors import safe_open

    probe = WeightMap(rules=(rule,), prefixes=family.prefixes, normalize=family.normalize)
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                keys: Any = list(handle.keys())
        else:
            keys = (key for key, _ in iter_tensors([path]))
        if any(probe.resolve(key) is not None for key in keys):
            return True
    return False


def _int(config: dict[str, Any], key: str) -> int:
    try:
        return int(config[key])
    except KeyError as exc:
        raise ConfigError(f"config.json: lacks {key!r}") from exc


def build_head(info: ModelInfo, device: torch.device) -> Head | None:
    """The head this model serves (None: a plain embedding model), loaded strictly, float32."""
    if info.csr is not None:  # (shared/sparse_autoencoder.py refused it over anything else)
        csr = build_csr_head(info, device)
        pack_head(csr, device)
        return csr
    if info.kind == "embedding" and not info.splade:
        return None
    if info.splade and info.kind != "embedding":
        raise ConfigError(f"--pooling splade: {info.model_dir} is a {info.kind} "
                          f"({info.architectures}), served through its classification head")
    if info.logit_score is not None:  # two rows of the LM head, not a head of its own keys
        return build_logit_score_head(info, device)
    family = _family(info)
    files = checkpoint_files(info.model_dir)
    config = info.config
    module: nn.Module
    if info.kind != "embedding":
        if family.classifier is None:
            raise ConfigError(f"config.json: {info.model_type} has no sequence classifier here")
        keys = family.classifier
        with torch.device("meta"):
            module = family.make_classifier(config, info.hidden_size, len(info.id2label))
    else:
        if family.mlm is None:
            raise ConfigError(f"config.json: {info.model_type} has no MLM (SPLADE) head here")
        if not any(str(a).endswith("ForMaskedLM") for a in info.architectures):
            raise ConfigError(
                f"--pooling splade needs a *ForMaskedLM checkpoint (its MLM head makes the "
                f"sparse vector); {info.model_dir} has architectures {info.architectures}"
            )
        rules, owns, ignore = list(family.mlm.rules), list(family.mlm.owns), []
        # Untied (tie_word_embeddings false, as transformers reads it), a missing decoder
        # weight is missing: the strict load names it instead of filling it from the tied one.
        tied = bool(config.get("tie_word_embeddings", True))
        for choice in family.mlm_tied:
            own = (_has_key(files, family.encoder, choice.own)
                   or (choice.per_config and not tied))
            used, unused = (choice.own, choice.tied) if own else (choice.tied, choice.own)
            rules.append(used)
            owns.append(re.escape(used.source) + "$")
            ignore.append(re.escape(unused.source))
        keys = HeadKeys(tuple(rules), tuple(owns), (*family.mlm.ignore, *ignore))
        with torch.device("meta"):
            mlm = family.make_mlm(config, info.hidden_size, _int(config, "vocab_size"))
        mlm.spec = info.splade_spec
        module = mlm
    module = module.to_empty(device=device)
    load_strict(module, files, keys.weight_map(family.encoder))
    pack_head(module, device)
    return module.eval()  # type: ignore[return-value]


def pack_head(module: nn.Module, device: torch.device) -> None:
    """Heads compute in float32: on a CPU, their linear layers take oneDNN's prepacked weights as
    the encoder's do (backend_worker/cpu_linear.py). SPLADE's decoder (hidden x vocabulary) is
    the cost: alone 6.9 -> 1.1 ms for an 11-token query, 85 -> 67 ms for 512 tokens (BERT-tiny,
    30,522 x 128, 2 AVX2 cores; bench/RESULTS.md)."""
    if packing_available(device, torch.float32):
        pack_linears(module)


def run_head(engine: Any, head: Head) -> Callable[[BatchArrays], tuple]:
    """A worker output function: packed batch -> (rows, dim, *frames) through the head."""

    def compute(arrays: BatchArrays) -> tuple:
        with torch.inference_mode():
            if isinstance(head, LogitsHead):  # small batches may replay a captured graph
                logits = engine.replay(arrays, head)
                if logits is not None:
                    return head.frames(logits)
            hidden = engine.hidden_states(arrays)
            cu_seqlens = torch.from_numpy(arrays.cu_seqlens.astype(np.int64)).to(hidden.device)
            return head.result(hidden, cu_seqlens)

    return compute
