"""Pooling of flat hidden states into one vector per sequence, then the Dense stack.

Works on the packed layout: hidden [T, hidden] and cu_seqlens [n + 1]. Reductions accumulate in
float32 whatever the model dtype, and the Dense modules run in float32 (they are tiny).
There is deliberately no normalisation here: the router normalises per request, so a request
with normalize=false gets the vector sentence-transformers has before its Normalize module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from backend_worker.layers import activation
from backend_worker.loading import DENSE_WEIGHT_MAP, checkpoint_files, load_strict
from shared.errors import ConfigError
from shared.st_modules import DenseSpec

# (hidden [T, hidden], cu_seqlens [n + 1], lengths [n], firsts [n] or None) -> float32 [n, dim].
# `firsts`: each sequence's first token's position in the sequence the model read, where
# pooling starts after a prompt (None: at 0); only weighted pooling reads positions.
PoolFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
                  torch.Tensor]


def token_sequences(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Sequence index of every flat token: [0, 0, 0, 1, 1, 2, ...]."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    sequences = torch.arange(lengths.shape[0], device=cu_seqlens.device)
    # output_size spares repeat_interleave a device sync to learn the total.
    return torch.repeat_interleave(sequences, lengths, output_size=total)


def pool_cls(
    hidden: torch.Tensor, cu_seqlens: torch.Tensor, lengths: torch.Tensor,
    firsts: torch.Tensor | None = None,
) -> torch.Tensor:
    return hidden.index_select(0, cu_seqlens[:-1]).float()


def pool_last_token(
    hidden: torch.Tensor, cu_seqlens: torch.Tensor, lengths: torch.Tensor,
    firsts: torch.Tensor | None = None,
) -> torch.Tensor:
    return hidden.index_select(0, cu_seqlens[1:] - 1).float()


def _sums(
    hidden: torch.Tensor, cu_seqlens: torch.Tensor, lengths: torch.Tensor,
    weighted: bool = False, firsts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sequence float32 sums of the token vectors; `weighted`: the token at position i
    (from 1) of the sequence the model read times i."""
    segments = token_sequences(cu_seqlens, hidden.shape[0])
    values = hidden.float()
    if weighted:
        positions = _positions(cu_seqlens, segments, firsts)
        values = values * (positions + 1).to(torch.float32).unsqueeze(1)
    sums = hidden.new_zeros(lengths.shape[0], hidden.shape[1], dtype=torch.float32)
    return sums.index_add_(0, segments, values)


def pool_mean(
    hidden: torch.Tensor, cu_seqlens: torch.Tensor, lengths: torch.Tensor,
    firsts: torch.Tensor | None = None,
) -> torch.Tensor:
    return _sums(hidden, cu_seqlens, lengths) / lengths.unsqueeze(1).to(torch.float32)


def pool_mean_sqrt_len(
    hidden: torch.Tensor, cu_seqlens: torch.Tensor, lengths: torch.Tensor,
    firsts: torch.Tensor | None = None,
) -> torch.Tensor:
    # sentence-transformers' mean_sqrt_len_tokens: the token sum over sqrt(length).
    return _sums(hidden, cu_seqlens, lengths) / lengths.unsqueeze(1).to(torch.float32).sqrt()


def pool_weighted_mean(
    hidden: torch.Tensor, cu_seqlens: torch.Tensor, lengths: torch.Tensor,
    firsts: torch.Tensor | None = None,
) -> torch.Tensor:
    """sentence-transformers' weightedmean (SGPT's): token i of a sequence (from 1) weighs i,
    so later tokens, which a causal model read with more context, count more. The weights are
    positions in the sequence itself, as sentence-transformers counts them past left padding."""
    skipped = torch.zeros_like(lengths) if firsts is None else firsts
    last = skipped + lengths  # (the last token's position, from 1)
    # the weights' sum: i over skipped < i <= last
    total = (last * (last + 1) - skipped * (skipped + 1)).to(torch.float32) / 2
    return _sums(hidden, cu_seqlens, lengths, True, firsts) / total.unsqueeze(1)


def _positions(
    cu_seqlens: torch.Tensor, segments: torch.Tensor, firsts: torch.Tensor | None
) -> torch.Tensor:
    """Each flat token's position in its sequence (counted from `firsts`, if given)."""
    positions = torch.arange(segments.shape[0], device=segments.device) - cu_seqlens[segments]
    return positions if firsts is None else positions + firsts[segments]


def pool_max(
    hidden: torch.Tensor, cu_seqlens: torch.Tensor, lengths: torch.Tensor,
    firsts: torch.Tensor | None = None,
) -> torch.Tensor:
    segments = token_sequences(cu_seqlens, hidden.shape[0])
    out = hidden.new_empty(lengths.shape[0], hidden.shape[1], dtype=torch.float32)
    index = segments.unsqueeze(1).expand(-1, hidden.shape[1])
    # include_self=False: every sequence has >= 1 token, so each row is written by real values.
    return out.scatter_reduce_(0, index, hidden.float(), reduce="amax", include_self=False)


def _sparse_only(
    hidden: torch.Tensor, cu_seqlens: torch.Tensor, lengths: torch.Tensor,
    firsts: torch.Tensor | None = None,
) -> torch.Tensor:
    raise RuntimeError("splade pooling gives sparse vectors: use the SPARSE output (heads.py)")


POOLERS: dict[str, PoolFn] = {
    "cls": pool_cls,
    "mean": pool_mean,
    "max": pool_max,
    "last-token": pool_last_token,
    "mean_sqrt_len_tokens": pool_mean_sqrt_len,
    "weightedmean": pool_weighted_mean,
}


class DenseLayer(nn.Module):
    """A sentence-transformers Dense module: Linear then activation, plus its input with
    use_residual (projected, without a bias, where the sizes differ), as Dense.forward adds it.
    Its parameters carry the module's own checkpoint names (linear.*, residual.weight)."""

    def __init__(self, spec: DenseSpec) -> None:
        super().__init__()
        self.linear = nn.Linear(spec.in_features, spec.out_features, bias=spec.bias)
        self.act = activation(spec.activation, where=f"{spec.path}: Dense activation")
        self.adds_input = spec.residual
        self.residual = (nn.Linear(spec.in_features, spec.out_features, bias=False)
                         if spec.residual and spec.in_features != spec.out_features else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.linear(x))
        if not self.adds_input:
            return out
        return out + (x if self.residual is None else self.residual(x))


class Pooler(nn.Module):
    """Pooling mode plus the Dense stack, as described by ModelInfo."""

    def __init__(self, mode: str | None, dense: list[DenseSpec]) -> None:
        super().__init__()
        if mode == "splade":
            # SPLADE's vector comes from the MLM head (backend_worker/heads.py, SPARSE output),
            # not from pooling hidden states: the Engine still builds a Pooler for every model,
            # so this one constructs and refuses to be called (the worker never offers POOLED
            # for a SPLADE model).
            if dense:
                raise ConfigError("splade pooling with Dense modules is not supported")
            self.mode = mode
            self._pool: PoolFn = _sparse_only
            self.dense = nn.ModuleList()
            self._specs = []
            return
        if mode is None:
            raise ConfigError(
                "the model has no sentence-transformers pooling config; pass --pooling "
                f"(one of {', '.join(POOLERS)})"
            )
        if mode not in POOLERS:
            raise ConfigError(
                f"pooling {mode!r} is not supported (supported: {', '.join(POOLERS)})"
            )
        self.mode = mode
        self._pool = POOLERS[mode]
        self.dense = nn.ModuleList(DenseLayer(spec) for spec in dense)
        self._specs = list(dense)

    def load_dense(self) -> None:
        """Fill the Dense layers from their module directories, strictly."""
        for spec, layer in zip(self._specs, self.dense, strict=True):
            assert isinstance(layer, DenseLayer)
            load_strict(layer, checkpoint_files(spec.path), DENSE_WEIGHT_MAP)

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor,
                starts: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [T, hidden] (any float dtype), cu_seqlens int64 [n + 1] -> float32 [n, dim].
        `starts` (int64 [n], each below its sequence's length): pooling leaves out each
        sequence's tokens before it (a prompt), as sentence-transformers' include_prompt=false
        masks them: CLS is then the first token after the prompt."""
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if starts is not None:
            segments = token_sequences(cu_seqlens, hidden.shape[0])
            kept = _positions(cu_seqlens, segments, None) >= starts[segments]
            hidden, lengths = hidden[kept], lengths - starts
            cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
        x = self._pool(hidden, cu_seqlens, lengths, starts)
        for layer in self.dense:
            x = layer(x)
        return x
