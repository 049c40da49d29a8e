"""A CSR SparseEncoder's head: the pooled embedding through its SparseAutoEncoder's encoder, top-k,
relu (shared/sparse_autoencoder.py says what and why), as SPARSE frames.

Loaded strictly from the module's own folder: pre_bias, latent_bias and the encoder weight, which
the module ties to its decoder (`decoder.linear.weight` is the same tensor: safetensors keeps one
of the two names, a torch.save state dict both); `stats_last_nonzero` is a training statistic.
Float32 whatever the model dtype, as the fp32 oracle computes it. (Not as SparseEncoder keeps the
module: sentence-transformers 6 casts every module after the Transformer to its dtype, so a
SparseEncoder loaded in bf16 / fp16 pools, standardizes and encodes in bf16 / fp16; with top-k,
such rounding may swap the k-th latent for the next one.)
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from backend_worker.head_modules import sparse_frames
from backend_worker.loading import Rule, WeightMap, checkpoint_files, iter_tensors, load_strict
from backend_worker.pooling import Pooler
from shared.errors import ConfigError
from shared.modelinfo import ModelInfo
from shared.protocol import OutputKind
from shared.sparse_autoencoder import CsrSpec

# SparseAutoEncoder.LN's eps, added to the standard deviation (not under a root).
_STD_EPS = 1e-5
_ENCODER, _DECODER = "encoder.weight", "decoder.linear.weight"


class CsrHead(nn.Module):
    """Pooling (the model's mode, no Dense), then the SparseAutoEncoder. `encoder` is one linear
    layer whose bias is the module's latent_bias: F.linear(x - pre_bias, W, latent_bias)."""

    output: ClassVar[OutputKind] = OutputKind.SPARSE

    def __init__(self, spec: CsrSpec, pooling: str | None) -> None:
        super().__init__()
        self.pooler = Pooler(pooling, [])
        self.spec = spec
        self.pre_bias = nn.Parameter(torch.empty(spec.input_dim))
        self.encoder = nn.Linear(spec.input_dim, spec.hidden_dim)

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """float32 [n, hidden_dim], dense (k non-negative entries per row at most)."""
        x = self.pooler(hidden, cu_seqlens)  # float32
        if self.spec.l2_first:
            x = F.normalize(x, p=2, dim=-1)
        if self.spec.standardize:
            x = x - x.mean(dim=-1, keepdim=True)
            x = x / (x.std(dim=-1, keepdim=True) + _STD_EPS)
        latents = self.encoder(x - self.pre_bias)
        top = latents.topk(self.spec.k, dim=-1)
        return torch.zeros_like(latents).scatter_(-1, top.indices, top.values).relu_()

    def result(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple:
        dense = self(hidden, cu_seqlens)
        # nonzero is row-major: rows in order, indices ascending within a row.
        where = torch.nonzero(dense)
        return sparse_frames(dense.shape[0], dense.shape[1], where[:, 0], where[:, 1],
                             dense[where[:, 0], where[:, 1]])


def _weight_map(files: list[Path]) -> WeightMap:
    """The encoder weight under whichever of its tied names the files hold; where both, they
    must be one tensor (a torch.save of the module writes it twice)."""
    tied = {key: value for key, value in iter_tensors(files) if key in (_ENCODER, _DECODER)}
    if len(tied) == 2 and not torch.equal(tied[_ENCODER], tied[_DECODER]):
        raise ConfigError(f"{files[0].parent}: {_ENCODER} and {_DECODER} differ (the module "
                          "ties them: one tensor)")
    source = _ENCODER if _ENCODER in tied or not tied else _DECODER
    return WeightMap(
        rules=(Rule("pre_bias", "pre_bias"), Rule("latent_bias", "encoder.bias"),
               Rule(source, "encoder.weight")),
        ignore=("stats_last_nonzero", *((_DECODER,) if len(tied) == 2 else ())),
    )


def build_csr_head(info: ModelInfo, device: torch.device) -> CsrHead:
    """The model's CSR head, loaded strictly, float32, on `device`."""
    assert info.csr is not None
    files = checkpoint_files(info.csr.path)
    with torch.device("meta"):
        head = CsrHead(info.csr, info.pooling)
    head = head.to_empty(device=device)
    load_strict(head, files, _weight_map(files))
    return head.eval()
