"""A mixture-of-experts MLP with top-k token routing (nomic-embed-text-v2-moe's layer).

Each token's router probabilities are a float32 softmax over the experts; the token goes to its
`top_k` most probable experts, whose outputs are summed weighted by those probabilities as they
are (not renormalised to sum to 1), then one bias shared by the experts is added. Expert e is a
plain MLP, act(x @ w1[e].T) @ w2[e], with w1 and w2 each stored [experts * intermediate, hidden]
and expert e owning rows e * intermediate onwards: w2 is applied as stored, not transposed (it
has the shape of a transposed weight, and the other reading also runs, giving noise).

Two ways to compute the same sum:
- routed: each expert runs on the tokens sent to it. Compute in proportion to top_k, but which
  tokens go where is read on the host (one sync per layer), so it cannot be captured in a graph.
- dense: every expert runs on every token and the unchosen ones are weighted 0. No host reads
  (capturable) and two large GEMMs instead of a loop, at experts / top_k times the compute: a
  fair price for a GPU's small batches, whose time is launches and weight reads, but not on the
  CPU (3x slower there even for one query, bench/RESULTS.md 2026-12-06 07:05).
Batches of at most `dense_tokens` tokens go dense; the engine raises it to its largest graph
bucket when it captures graphs (0, all routed, until then).
"""

from __future__ import annotations

import torch
from torch import nn

from backend_worker.layers import activation


class MixtureOfExperts(nn.Module):
    """[T, hidden] -> [T, hidden]: the weighted sum of each token's top_k experts, plus the
    shared bias."""

    def __init__(self, hidden: int, intermediate: int, experts: int, top_k: int,
                 act: str) -> None:
        super().__init__()
        self.experts = experts
        self.top_k = top_k
        self.intermediate = intermediate
        self.router = nn.Parameter(torch.empty(experts, hidden))
        self.w1 = nn.Parameter(torch.empty(experts * intermediate, hidden))
        self.w2 = nn.Parameter(torch.empty(experts * intermediate, hidden))
        self.bias = nn.Parameter(torch.empty(hidden))
        self.act = activation(act)
        self.dense_tokens = 0

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's top_k router weights (in x's dtype) and expert indices, [T, top_k].
        The logits are float32 whatever the model's dtype (nomic-ai's code rounds them to it
        before its float32 softmax): rounded to 16 bits, two experts that nearly tie can swap
        places and the token's output changes by a whole expert's, so a float16 or bfloat16
        model sends tokens where the float32 oracle does."""
        logits = nn.functional.linear(x.float(), self.router.float())
        probabilities = logits.softmax(dim=-1)
        weights, chosen = probabilities.topk(self.top_k, dim=-1)
        return weights.to(x.dtype), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.route(x)
        if x.shape[0] <= self.dense_tokens:
            return self._dense(x, weights, chosen) + self.bias
        return self._routed(x, weights, chosen) + self.bias

    def _dense(self, x: torch.Tensor, weights: torch.Tensor,
               chosen: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        gates = torch.zeros(tokens, self.experts, dtype=x.dtype, device=x.device)
        gates.scatter_(1, chosen, weights)
        hidden = self.act(nn.functional.linear(x, self.w1))  # [T, experts * intermediate]
        hidden = hidden.view(tokens, self.experts, self.intermediate) * gates.unsqueeze(-1)
        return hidden.reshape(tokens, self.experts * self.intermediate) @ self.w2

    def _routed(self, x: torch.Tensor, weights: torch.Tensor,
                chosen: torch.Tensor) -> torch.Tensor:
        w1 = self.w1.view(self.experts, self.intermediate, -1)
        w2 = self.w2.view(self.experts, self.intermediate, -1)
        flat = chosen.flatten()  # (token, slot) pairs, token-major
        order = flat.argsort(stable=True)  # grouped by expert, tokens ascending within each
        tokens = order // self.top_k
        gates = weights.flatten()[order].unsqueeze(-1)
        # Tokens per expert, read on the host once (bincount would first read the range too).
        ones = torch.ones_like(flat)
        counts = torch.zeros(self.experts, dtype=flat.dtype, device=flat.device).scatter_add_(
            0, flat, ones).tolist()
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                rows = tokens[start:start + count]
                y = self.act(nn.functional.linear(x[rows], w1[expert])) @ w2[expert]
                out.index_add_(0, rows, y * gates[start:start + count])
                start += count
        return out
