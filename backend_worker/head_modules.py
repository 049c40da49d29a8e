"""Head modules and the data a family gives to describe its heads' checkpoint keys.

A family file (backend_worker/models/<family>.py) declares a `FamilyHeads`: which keys its
classifier and MLM heads own and which module computes each. backend_worker/heads.py builds and
loads the head a model serves from that description. Head math runs in float32 whatever the
model dtype (hidden states are cast), and every head answers `result(hidden, cu_seqlens)` with
the frames of a worker Result.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from backend_worker.layers import activation
from backend_worker.loading import Rule, WeightMap
from backend_worker.pooling import token_sequences
from shared.protocol import OutputKind
from shared.sparse_encoder import SpladeSpec

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
    """A parameter filled by the checkpoint's own key when present, else by a tied one. With
    `per_config`, the tied one only when config.json ties the word embeddings
    (tie_word_embeddings, true by default): untied, a missing own key is missing."""

    own: Rule
    tied: Rule
    per_config: bool = True


class Head(Protocol):
    output: ClassVar[OutputKind]

    def result(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple:
        """Flat hidden [T, hidden], cu_seqlens int64 [n + 1] -> (rows, dim, *frames)."""
        ...


class LogitsHead(nn.Module):
    """Base of the sequence classifiers: forward gives raw float32 logits [n, labels]; the
    router applies the activation (sigmoid / softmax / none) per request."""

    output: ClassVar[OutputKind] = OutputKind.LOGITS

    def result(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple:
        return self.frames(self(hidden, cu_seqlens).cpu().numpy())

    @staticmethod
    def frames(logits: np.ndarray) -> tuple:
        """(rows, dim, *frames) of a Result from host logits [n, labels]."""
        return logits.shape[0], logits.shape[1], np.ascontiguousarray(logits)


class ClassifierHead(LogitsHead):
    """BertForSequenceClassification: classifier(tanh(pooler(h[CLS]))); another activation
    than tanh for the families whose pooler says one (DeBERTa's pooler_hidden_act)."""

    def __init__(self, hidden: int, labels: int, act: str = "tanh") -> None:
        super().__init__()
        self.pooler = nn.Linear(hidden, hidden)
        self.act = activation(act, where="config.json: pooler activation")
        self.classifier = nn.Linear(hidden, labels)

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        first = hidden.index_select(0, cu_seqlens[:-1]).float()
        return self.classifier(self.act(self.pooler(first)))


# The keys of ClassifierHead as BertForSequenceClassification saves them; the families whose
# classifier is BERT's shape (GTE, NomicBERT) save the same names.
BERT_CLASSIFIER_KEYS = HeadKeys(
    rules=(Rule("pooler.dense.{w}", "pooler.{w}"), Rule("classifier.{w}", "classifier.{w}")),
    owns=(r"pooler\.", r"classifier\."),
)


class SpladeHead(nn.Module):
    """MLM head (dense -> act -> norm -> decoder), then SPLADE's pooling of each sequence's token
    logits (`spec`: relu -> log1p, the max or the sum, the largest entries kept), non-zeros only.
    BERT, RoBERTa, DistilBERT and ModernBERT MLM heads all have this shape under other names."""

    output: ClassVar[OutputKind] = OutputKind.SPARSE

    def __init__(self, hidden: int, vocab: int, act: str, eps: float, *,
                 dense_bias: bool = True, norm_bias: bool = True,
                 decoder_bias: bool = True) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden, bias=dense_bias)
        self.act = activation(act, where="config.json: MLM head activation")
        self.norm = nn.LayerNorm(hidden, eps=eps, bias=norm_bias)
        self.decoder = nn.Linear(hidden, vocab, bias=decoder_bias)
        self.chunk = max(1, _SPLADE_CHUNK_BYTES // (4 * vocab))
        # The model's SpladePooling settings (set by backend_worker/heads.py); TEI's by default.
        self.spec = SpladeSpec()

    def _saturate(self, logits: torch.Tensor) -> torch.Tensor:
        weights = torch.log1p(torch.relu(logits))
        return torch.log1p(weights) if self.spec.log_twice else weights

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """float32 [n, vocab], dense (mostly zeros)."""
        total = hidden.shape[0]
        segments = token_sequences(cu_seqlens, total)
        vocab = self.decoder.out_features
        pooled = hidden.new_zeros(cu_seqlens.shape[0] - 1, vocab, dtype=torch.float32)
        by_max = self.spec.reduce == "max"
        for start in range(0, total, self.chunk):
            x = hidden[start : start + self.chunk].float()
            logits = self.decoder(self.norm(self.act(self.dense(x))))
            index = segments[start : start + self.chunk].unsqueeze(1).expand_as(logits)
            if by_max:
                # Zeros with include_self: max(0, max_t logit) is relu's max, and relu/log1p are
                # monotonic, so they run once on the [n, vocab] maxima instead of T x vocab.
                pooled.scatter_reduce_(0, index, logits, reduce="amax", include_self=True)
            else:
                pooled.scatter_add_(0, index, self._saturate(logits))
        if by_max:
            pooled = self._saturate(pooled)
        keep = self.spec.max_active_dims
        if keep is not None and keep < vocab:
            # SparseEncoder's max_active_dims: the largest entries (all are >= 0), others zero.
            top = pooled.topk(keep, dim=1)
            pooled = torch.zeros_like(pooled).scatter_(1, top.indices, top.values)
        return pooled

    def result(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple:
        dense = self(hidden, cu_seqlens)
        # nonzero is row-major: rows in order, indices ascending within a row.
        where = torch.nonzero(dense)
        return sparse_frames(dense.shape[0], dense.shape[1], where[:, 0], where[:, 1],
                             dense[where[:, 0], where[:, 1]])


def sparse_frames(rows: int, dim: int, row_of: torch.Tensor, indices: torch.Tensor,
                  values: torch.Tensor) -> tuple:
    """(rows, dim, *frames) of a SPARSE Result, protocol.sparse_arrays' layout, from every
    entry's row (ascending), index (ascending within its row) and value; built without a Python
    loop over the sequences."""
    counts = torch.bincount(row_of, minlength=rows)
    offsets = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(counts.cpu().numpy(), out=offsets[1:])
    return (rows, dim, offsets, indices.to(torch.int32).cpu().numpy(),
            values.cpu().numpy())


def _bert_style_classifier(config: dict[str, Any], hidden: int, labels: int) -> nn.Module:
    return ClassifierHead(hidden, labels)


def _bert_style_mlm(config: dict[str, Any], hidden: int, vocab: int) -> SpladeHead:
    return SpladeHead(hidden, vocab, str(config.get("hidden_act", "gelu")),
                      float(config.get("layer_norm_eps", 1e-12)))


# (config.json, hidden size, labels or vocabulary size) -> the head module, on the meta device.
HeadFactory = Callable[[dict[str, Any], int, int], nn.Module]
MlmFactory = Callable[[dict[str, Any], int, int], SpladeHead]


@dataclass(frozen=True)
class FamilyHeads:
    """How one family's checkpoints store their heads. A head the family lacks is None and
    serving it fails at start with a message naming the family."""

    encoder: WeightMap  # for its prefixes and legacy spellings
    classifier: HeadKeys | None = None
    make_classifier: HeadFactory = _bert_style_classifier
    mlm: HeadKeys | None = None
    # MLM parameters that a checkpoint may store itself or tie to another tensor.
    mlm_tied: tuple[Either, ...] = ()
    make_mlm: MlmFactory = _bert_style_mlm
