"""The heads compute in float32 whatever the model's dtype (backend_worker/head_modules.py,
lexical.py, experts.py): bfloat16 hidden states give what their float32 values give, and a
mixture-of-experts routes a bfloat16 model's tokens on float32 router logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend_worker.experts import MixtureOfExperts
from backend_worker.head_modules import ClassifierHead, LogitsHead, SpladeHead
from backend_worker.lexical import LexicalHead
from shared import protocol
from shared.sparse_encoder import SpladeSpec

HIDDEN, VOCAB = 16, 40
CU = torch.tensor([0, 3, 7, 12], dtype=torch.int64)


def _random(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return module.eval()


def _hidden(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(int(CU[-1]), HIDDEN, generator=generator).to(torch.bfloat16)


def _same(got: tuple, want: tuple) -> None:
    assert got[:2] == want[:2]
    for a, b in zip(got[2:], want[2:], strict=True):
        assert a.dtype == b.dtype
        assert (a == b).all()


@pytest.mark.parametrize("head", [
    ClassifierHead(HIDDEN, 3),
    SpladeHead(HIDDEN, VOCAB, "gelu", 1e-12),
], ids=["classifier", "splade"])
def test_a_head_casts_low_precision_hidden_states_to_float32(head: torch.nn.Module) -> None:
    head = _random(head, 1)
    hidden = _hidden()
    with torch.inference_mode():
        got = head.result(hidden, CU)  # type: ignore[operator]
        want = head.result(hidden.float(), CU)  # type: ignore[operator]
    assert got[-1].dtype.name == "float32"  # the logits, or the sparse values
    _same(got, want)


def test_lexical_weights_cast_low_precision_hidden_states_to_float32() -> None:
    head = _random(LexicalHead(HIDDEN, VOCAB, [0, 2]), 2)
    hidden = _hidden(1)
    ids = torch.tensor([0, 5, 5, 2, 7, 9, 5, 3, 0, 1, 3, 3])
    with torch.inference_mode():
        got = head.result(hidden, ids, CU)
        want = head.result(hidden.float(), ids, CU)
    assert got[-1].dtype.name == "float32"
    _same(got, want)


def test_a_bfloat16_mixture_routes_on_float32_logits() -> None:
    """Rounded to bfloat16, near-tied router logits swap order and send tokens to other
    experts than the float32 oracle does (nomic-ai's code rounds them; we do not)."""
    experts, top_k = 8, 2
    moe = _random(MixtureOfExperts(HIDDEN, 8, experts, top_k, "gelu"), 3).to(torch.bfloat16)
    x = torch.randn(2048, HIDDEN, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    with torch.inference_mode():
        weights, chosen = moe.route(x)
        probabilities = (x.float() @ moe.router.float().T).softmax(dim=-1)
    want_weights, want_chosen = probabilities.topk(top_k, dim=-1)
    assert weights.dtype == torch.bfloat16
    assert torch.equal(chosen, want_chosen)
    assert torch.equal(weights, want_weights.to(torch.bfloat16))


def test_max_active_dims_one_short_of_the_vocabulary_drops_the_smallest_entry() -> None:
    """Every logit positive (a large decoder bias): max_active_dims = vocabulary - 1 keeps all
    but each row's smallest entry, as SparseEncoder's top-k does."""
    head = _random(SpladeHead(HIDDEN, VOCAB, "gelu", 1e-12), 5)
    with torch.no_grad():
        head.decoder.bias.fill_(20.0)
    hidden = _hidden(2).float()
    with torch.inference_mode():
        full = head(hidden, CU)
        head.spec = SpladeSpec(max_active_dims=VOCAB - 1)
        kept = head(hidden, CU)
    assert bool((full > 0).all())
    want = full.clone()
    want[torch.arange(full.shape[0]), full.argmin(dim=1)] = 0
    assert torch.equal(kept, want)
    assert ((kept > 0).sum(dim=1) == VOCAB - 1).all()


def test_logits_frames_are_one_contiguous_block() -> None:
    """A replayed graph's logits may be a view with other strides: the frame is made contiguous
    (protocol.encode refuses anything else), values and shape unchanged."""
    block = np.arange(24, dtype=np.float32).reshape(4, 6)
    view = block[:, ::2]
    rows, dim, frame = LogitsHead.frames(view)
    assert (rows, dim) == (4, 3)
    assert frame.flags.c_contiguous
    assert np.array_equal(frame, view)
    protocol.encode(protocol.Result(1, rows, dim, 0.0), frame)
