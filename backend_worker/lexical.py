"""BGE-M3's lexical weights (shared/lexical.py): one linear layer turns each token's last hidden
state into a weight, relu'd; each sequence keeps, per vocabulary id, the largest weight of its
tokens, leaving out the cls / eos / pad / unk ids and weights that are not > 0. Computed in
float32 from the hidden states, as SPARSE frames (protocol.sparse_arrays' layout)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from backend_worker.head_modules import sparse_frames
from backend_worker.heads import pack_head
from backend_worker.loading import iter_tensors
from backend_worker.pooling import token_sequences
from shared.errors import ConfigError
from shared.lexical import LexicalWeights
from shared.protocol import BatchArrays, OutputKind


class LexicalHead(nn.Module):
    output: ClassVar[OutputKind] = OutputKind.SPARSE
    ignored: torch.Tensor  # the ids never weighted (a buffer)

    def __init__(self, hidden: int, vocab: int, ignored_ids: list[int]) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, 1)
        self.vocab = vocab
        self.register_buffer("ignored", torch.tensor(ignored_ids, dtype=torch.int64),
                             persistent=False)

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor,
                cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, weights): sequence * vocab + id of every kept (sequence, id), ascending, and
        its largest weight."""
        weights = torch.relu(self.linear(hidden.float())).squeeze(-1)
        ids = input_ids.long()
        kept = (weights > 0) & ~torch.isin(ids, self.ignored)
        sequences = token_sequences(cu_seqlens, ids.shape[0])
        keys, where = torch.unique(sequences[kept] * self.vocab + ids[kept], return_inverse=True)
        # (weights kept are > 0: a zero start is no weight)
        best = weights.new_zeros(keys.shape[0]).scatter_reduce_(
            0, where, weights[kept], reduce="amax", include_self=True)
        return keys, best

    def result(self, hidden: torch.Tensor, input_ids: torch.Tensor,
               cu_seqlens: torch.Tensor) -> tuple:
        keys, weights = self(hidden, input_ids, cu_seqlens)
        return sparse_frames(cu_seqlens.shape[0] - 1, self.vocab, keys // self.vocab,
                             keys % self.vocab, weights)


def build_lexical(spec: LexicalWeights, hidden: int, vocab: int,
                  device: torch.device) -> LexicalHead:
    """The head, loaded strictly from its file (a `weight` [1, hidden] and a `bias` [1])."""
    tensors = dict(iter_tensors([Path(spec.path)]))
    shapes = {name: list(t.shape) for name, t in tensors.items()}
    if shapes != {"weight": [1, hidden], "bias": [1]}:
        raise ConfigError(f"{spec.path}: expected weight [1, {hidden}] and bias [1] (BGE-M3's "
                          f"sparse_linear), found {shapes}")
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():  # .float() would cast it without a word
            raise ConfigError(f"{spec.path}: {name} is {tensor.dtype}, not floating point")
    head = LexicalHead(hidden, vocab, spec.ignored_ids)
    head.linear.load_state_dict({name: t.float() for name, t in tensors.items()})
    head = head.to(device).eval()
    pack_head(head, device)
    return head


def run_lexical(engine: Any, head: LexicalHead) -> Callable[[BatchArrays], tuple]:
    """A worker output function: packed batch -> SPARSE frames of the lexical weights."""

    def compute(arrays: BatchArrays) -> tuple:
        with torch.inference_mode():
            hidden = engine.hidden_states(arrays)
            device = hidden.device
            ids = torch.from_numpy(arrays.input_ids.astype(np.int64)).to(device)
            cu_seqlens = torch.from_numpy(arrays.cu_seqlens.astype(np.int64)).to(device)
            return head.result(hidden, ids, cu_seqlens)

    return compute
