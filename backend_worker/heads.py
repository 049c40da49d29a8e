"""Heads on top of the encoder: a sequence classifier (LOGITS) and SPLADE's MLM head (SPARSE).

Built once at worker start from (ModelInfo, Engine), loaded strictly from the same checkpoint as
the encoder. The encoder's WeightMap ignores exactly the keys a head owns (`pooler.*`,
`classifier.*`, `cls.*` for BERT); the head's map owns those namespaces and ignores everything
else, so between the two loads every key is used once and a missing or stray head key names
itself. Head math runs in float32 whatever the model dtype (the hidden states are cast).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from backend_worker.layers import activation
from backend_worker.loading import Rule, WeightMap, checkpoint_files, iter_tensors, load_strict
from backend_worker.models import bert
from backend_worker.pooling import token_sequences
from shared.errors import ConfigError
from shared.modelinfo import ModelInfo
from shared.protocol import BatchArrays, OutputKind

# Logits of one SPLADE chunk are [tokens, vocab] float32: bound them (~128 MiB) so a 16k-token
# batch over a 30k vocabulary does not materialise GBs; the reduction is into [n, vocab].
_SPLADE_CHUNK_BYTES = 128 << 20


@dataclass(frozen=True)
class HeadKeys:
    """One family's checkpoint names for one head, as data.

    `owns`: regexes (matched at the start of a key, family prefix stripped) of the keys this
    head must consume; every other key belongs to the encoder's strict load and is skipped here.
    """

    rules: tuple[Rule, ...]
    owns: tuple[str, ...]
    ignore: tuple[str, ...] = ()

    def weight_map(self, family: WeightMap) -> WeightMap:
        prefixes = "|".join(re.escape(p) for p in family.prefixes)
        owned = "|".join(self.owns)
        not_ours = rf"(?!(?:{prefixes})?(?:{owned})).*" if prefixes else rf"(?!(?:{owned})).*"
        return WeightMap(rules=self.rules, prefixes=family.prefixes,
                         normalize=family.normalize, ignore=(*self.ignore, not_ours))


@dataclass(frozen=True)
class Either:
    """A parameter filled by the checkpoint's own key when present, else by a tied one."""

    own: Rule
    tied: Rule


@dataclass(frozen=True)
class FamilyHeads:
    encoder: WeightMap  # for its prefixes and legacy spellings
    classifier: HeadKeys
    mlm: HeadKeys
    mlm_tied: tuple[Either, ...]


BERT_HEADS = FamilyHeads(
    encoder=bert.WEIGHT_MAP,
    classifier=HeadKeys(
        rules=(Rule("pooler.dense.{w}", "pooler.{w}"), Rule("classifier.{w}", "classifier.{w}")),
        owns=(r"pooler\.", r"classifier\."),
    ),
    mlm=HeadKeys(
        rules=(
            Rule("cls.predictions.transform.dense.{w}", "dense.{w}"),
            Rule("cls.predictions.transform.LayerNorm.{w}", "norm.{w}"),
        ),
        owns=(r"cls\.",),
    ),
    mlm_tied=(
        # Tied (the usual): the decoder is the word embedding matrix, saved once.
        Either(Rule("cls.predictions.decoder.weight", "decoder.weight"),
               Rule("embeddings.word_embeddings.weight", "decoder.weight")),
        # NOTE: transformers applies decoder.bias. v4 tied it to predictions.bias (one tensor,
        # both names saved in a .bin); v5 ties them only with tied embeddings and otherwise
        # leaves predictions.bias unused. So decoder.bias wins when saved.
        Either(Rule("cls.predictions.decoder.bias", "decoder.bias"),
               Rule("cls.predictions.bias", "decoder.bias")),
    ),
)
HEADS_BY_MODEL_TYPE: dict[str, FamilyHeads] = {"bert": BERT_HEADS}


class Head(Protocol):
    output: ClassVar[OutputKind]

    def result(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple:
        """Flat hidden [T, hidden], cu_seqlens int64 [n + 1] -> (rows, dim, *frames)."""
        ...


class ClassifierHead(nn.Module):
    """BertForSequenceClassification: classifier(tanh(pooler(h[CLS]))), raw logits.

    The router applies the activation (sigmoid / softmax / none) per request.
    """

    output: ClassVar[OutputKind] = OutputKind.LOGITS

    def __init__(self, hidden: int, labels: int) -> None:
        super().__init__()
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, labels)

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        first = hidden.index_select(0, cu_seqlens[:-1]).float()
        return self.classifier(torch.tanh(self.pooler(first)))

    def result(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple:
        logits = self(hidden, cu_seqlens).cpu().numpy()
        return logits.shape[0], logits.shape[1], np.ascontiguousarray(logits)


class SpladeHead(nn.Module):
    """MLM head, then relu -> log1p -> max over each sequence's tokens, non-zeros only."""

    output: ClassVar[OutputKind] = OutputKind.SPARSE

    def __init__(self, hidden: int, vocab: int, act: str, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.act = activation(act, where="config.json: hidden_act")
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.decoder = nn.Linear(hidden, vocab)
        self.chunk = max(1, _SPLADE_CHUNK_BYTES // (4 * vocab))

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """float32 [n, vocab], dense (mostly zeros)."""
        total = hidden.shape[0]
        segments = token_sequences(cu_seqlens, total)
        # Zeros with include_self: max(0, max_t logit) is relu's max, and relu/log1p are
        # monotonic, so log1p is applied once to the [n, vocab] maxima instead of T x vocab.
        vocab = self.decoder.out_features
        best = hidden.new_zeros(cu_seqlens.shape[0] - 1, vocab, dtype=torch.float32)
        for start in range(0, total, self.chunk):
            x = hidden[start : start + self.chunk].float()
            logits = self.decoder(self.norm(self.act(self.dense(x))))
            index = segments[start : start + self.chunk].unsqueeze(1).expand_as(logits)
            best.scatter_reduce_(0, index, logits, reduce="amax", include_self=True)
        return torch.log1p(best)

    def result(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple:
        dense = self(hidden, cu_seqlens)
        # nonzero is row-major: rows in order, indices ascending within a row. The frames are
        # protocol.sparse_arrays' layout, built without a Python loop over the sequences.
        where = torch.nonzero(dense)
        counts = torch.bincount(where[:, 0], minlength=dense.shape[0])
        offsets = np.zeros(dense.shape[0] + 1, dtype=np.int32)
        np.cumsum(counts.cpu().numpy(), out=offsets[1:])
        indices = where[:, 1].to(torch.int32).cpu().numpy()
        values = dense[where[:, 0], where[:, 1]].cpu().numpy()
        return dense.shape[0], dense.shape[1], offsets, indices, values


def _family(info: ModelInfo) -> FamilyHeads:
    heads = HEADS_BY_MODEL_TYPE.get(info.model_type)
    if heads is None:
        raise ConfigError(
            f"config.json: heads of model_type {info.model_type!r} are not supported "
            f"(supported: {', '.join(sorted(HEADS_BY_MODEL_TYPE))})"
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
    if info.kind == "embedding" and not info.splade:
        return None
    if info.splade and info.kind != "embedding":
        raise ConfigError(f"--pooling splade: {info.model_dir} is a {info.kind} "
                          f"({info.architectures}), served through its classification head")
    family = _family(info)
    files = checkpoint_files(info.model_dir)
    config = info.config
    module: nn.Module
    if info.kind != "embedding":
        keys = family.classifier
        with torch.device("meta"):
            module = ClassifierHead(info.hidden_size, len(info.id2label))
    else:
        if not any(str(a).endswith("ForMaskedLM") for a in info.architectures):
            raise ConfigError(
                f"--pooling splade needs a *ForMaskedLM checkpoint (its MLM head makes the "
                f"sparse vector); {info.model_dir} has architectures {info.architectures}"
            )
        rules, owns, ignore = list(family.mlm.rules), list(family.mlm.owns), []
        for choice in family.mlm_tied:
            used, unused = ((choice.own, choice.tied) if _has_key(files, family.encoder, choice.own)
                            else (choice.tied, choice.own))
            rules.append(used)
            owns.append(re.escape(used.source) + "$")
            ignore.append(re.escape(unused.source))
        keys = HeadKeys(tuple(rules), tuple(owns), (*family.mlm.ignore, *ignore))
        with torch.device("meta"):
            module = SpladeHead(info.hidden_size, _int(config, "vocab_size"),
                                str(config.get("hidden_act", "gelu")),
                                float(config.get("layer_norm_eps", 1e-12)))
    module = module.to_empty(device=device)
    load_strict(module, files, keys.weight_map(family.encoder))
    return module.eval()  # type: ignore[return-value]


def run_head(engine: Any, head: Head) -> Callable[[BatchArrays], tuple]:
    """A worker output function: packed batch -> (rows, dim, *frames) through the head."""

    def compute(arrays: BatchArrays) -> tuple:
        with torch.inference_mode():
            hidden = engine.hidden_states(arrays)
            cu_seqlens = torch.from_numpy(arrays.cu_seqlens.astype(np.int64)).to(hidden.device)
            return head.result(hidden, cu_seqlens)

    return compute
