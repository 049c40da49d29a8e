"""T5's encoder (model_type "t5" and "mt5"): what sentence-transformers runs for sentence-t5,
GTR and other T5 embedders (it loads T5EncoderModel / MT5EncoderModel, whatever the checkpoint
holds besides the encoder).

- Pre-norm layers: x = x + attention(norm(x)); x = x + ff(norm(x)); a final norm. The norms
  are RMSNorms without offset (T5LayerNorm); no projection has a bias.
- Attention is not scaled by 1 / sqrt(head_dim) (T5 folds that into its initialisation), and
  head_dim (d_kv) need not be d_model / heads.
- Positions are a relative bias only: one [buckets, heads] table, stored in the first layer and
  shared by all, indexed by T5's bidirectional buckets of key - query. It depends on positions
  inside the sequence only, so it is a `PositionBias` of the attention's MaskSpec; position
  ids are not read.
- The feed-forward is `feed_forward_proj`: "relu" (T5 v1.0, sentence-t5, GTR) is
  wo(act(wi(x))); "gated-gelu" (v1.1, mT5, Flan-T5) is wo(gelu_tanh(wi_0(x)) * wi_1(x)).
  config.json's `is_gated_act` and `dense_act_fn`, where stored, decide over it (T5Config).
- In float16, transformers clamps the hidden states after each block to the largest finite
  value (T5's activations overflow float16); so do we. Not bfloat16: its range is float32's,
  which is why bfloat16 is T5's default dtype on a GPU (shared/dtypes.py).
- No heads: T5ForSequenceClassification classifies with the decoder, which we do not run.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Self

import torch
from torch import nn

from backend_worker.attention import Attention, MaskSpec
from backend_worker.head_modules import FamilyHeads
from backend_worker.layers import MLP, GatedMLP, RMSNorm, SelfAttention, activation
from backend_worker.loading import Rule, WeightMap
from backend_worker.models.config import refusal, required_keys
from backend_worker.models.registry import register
from shared.static_embedding import NO_LENGTH_LIMIT

WEIGHT_MAP = WeightMap(
    rules=(
        Rule("shared.weight", "embed.weight"),
        # The encoder's embedding is `shared` itself (transformers ties them; .bin files and
        # transformers 4 saves hold both names, safetensors saves keep `shared` alone): one
        # value under either name, or both names with equal values (load_strict checks).
        Rule("encoder.embed_tokens.weight", "embed.weight"),
        Rule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
             "relative_bias.table.weight"),
        Rule("encoder.block.{i}.layer.0.SelfAttention.{part}.weight",
             "layers.{i}.attention.qkv.weight", fuse=("q", "k", "v")),
        Rule("encoder.block.{i}.layer.0.SelfAttention.o.weight", "layers.{i}.attention.out.weight"),
        Rule("encoder.block.{i}.layer.0.layer_norm.weight", "layers.{i}.attention_norm.weight"),
        # relu (v1.0): wi; gated (v1.1): wi_0 is the activated half. A checkpoint of the other
        # kind fills a parameter this model does not have: an "unexpected keys" error.
        Rule("encoder.block.{i}.layer.1.DenseReluDense.wi.weight", "layers.{i}.mlp.up.weight"),
        Rule("encoder.block.{i}.layer.1.DenseReluDense.{part}.weight",
             "layers.{i}.mlp.gate_up.weight", fuse=("wi_0", "wi_1")),
        Rule("encoder.block.{i}.layer.1.DenseReluDense.wo.weight", "layers.{i}.mlp.down.weight"),
        Rule("encoder.block.{i}.layer.1.layer_norm.weight", "layers.{i}.mlp_norm.weight"),
        Rule("encoder.final_layer_norm.weight", "norm.weight"),
    ),
    # T5ForSequenceClassification nests the whole model in "transformer.",
    # T5ForTokenClassification its encoder.
    prefixes=("transformer.",),
    ignore=(
        # T5ForConditionalGeneration / T5Model checkpoints: sentence-transformers loads the
        # encoder alone from them, dropping these.
        r"decoder\..*",
        r"lm_head\..*",
        # T5ForSequenceClassification's head: backend_worker/heads.py refuses the model (it
        # classifies the decoder's output).
        r"classification_head\..*",
        # T5ForTokenClassification's / T5ForQuestionAnswering's heads: sentence-transformers
        # embeds with the encoder they hold, dropping these (as BERT's classifier is dropped).
        r"classifier\..*",
        r"qa_outputs\..*",
    ),
)

# transformers' defaults per type, where config.json leaves a key out.
_FEED_FORWARD_DEFAULT = {"t5": "relu", "mt5": "gated-gelu"}


def relative_buckets(relative: torch.Tensor, buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional bucket of each relative position (key - query), int64 in
    [0, buckets): half of them per direction, a quarter exact distances, the rest log-spaced up
    to `max_distance`, farther ones in the last bucket of their half."""
    half = buckets // 2
    distance = -relative  # query - key: keys before the query are positive
    bucket = (distance < 0).to(torch.int64) * half
    distance = distance.abs()
    exact = half // 2
    # Same float32 operations in the same order as the reference, so that the truncation to an
    # integer lands on the same side. Distances below `exact` (0 included, whose log is -inf)
    # take the exact branch, hence the clamp, which changes no selected value.
    far = exact + (
        torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
        * (half - exact)
    ).to(torch.int64)
    far = far.clamp(max=half - 1)
    return bucket + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """A relative bias table (T5's, MPNet's), called as a `PositionBias`:
    (length, device, rows) -> [heads, R, L]."""

    def __init__(self, buckets: int, heads: int, max_distance: int) -> None:
        super().__init__()
        self.table = nn.Embedding(buckets, heads)
        self.buckets, self.max_distance = buckets, max_distance

    def forward(
        self, length: int, device: torch.device, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        first, last = rows or (0, length)
        keys = torch.arange(length, device=device)
        queries = torch.arange(first, last, device=device)
        bucket = relative_buckets(keys[None, :] - queries[:, None], self.buckets,
                                  self.max_distance)
        return self.table(bucket).permute(2, 0, 1)


def clamp_float16(x: torch.Tensor) -> torch.Tensor:
    """transformers' T5Block clamp: in float16, hidden states are clamped to the largest finite
    value (1000 below it once any is infinite); other dtypes pass unchanged. Device ops only,
    so it may be captured in a CUDA graph."""
    if x.dtype != torch.float16:
        return x
    largest = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), largest - 1000, largest).to(x.dtype)
    return torch.clamp(x, min=-limit, max=limit)


class T5Layer(nn.Module):
    def __init__(self, hidden: int, eps: float, attention: SelfAttention, mlp: nn.Module) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(hidden, eps)
        self.attention = attention
        self.mlp_norm = RMSNorm(hidden, eps)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, meta: Any) -> torch.Tensor:
        x = clamp_float16(x + self.attention(self.attention_norm(x), meta))
        return clamp_float16(x + self.mlp(self.mlp_norm(x)))


def feed_forward(config: dict[str, Any], model_type: str) -> tuple[bool, str]:
    """(gated, activation name) as T5Config derives them: from `feed_forward_proj`, unless
    config.json stores `is_gated_act` / `dense_act_fn` themselves."""
    proj = str(config.get("feed_forward_proj") or _FEED_FORWARD_DEFAULT[model_type])
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise refusal(model_type, f"feed_forward_proj={proj!r} (supported: an activation, or "
                                  "gated-<activation>)")
    # transformers' special case: "gated-gelu" means the tanh approximation.
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    where = f"config.json: feed_forward_proj {proj!r}: activation"
    # NOTE: config.json files saved by transformers hold both derived keys, and T5Config reads
    # them back over what feed_forward_proj says (older saves have "dense_act_fn": "gelu" beside
    # "gated-gelu", from before the special case): where present, they decide.
    if "dense_act_fn" in config:
        act, where = config["dense_act_fn"], "config.json: dense_act_fn"
    activation(act, where=where)
    return bool(config.get("is_gated_act", len(parts) == 2)), act


@register(model_types=("t5", "mt5"))
class T5EncoderModel(nn.Module):
    """T5EncoderModel's last hidden state, flat. Token types and position ids are ignored."""

    weight_map: ClassVar[WeightMap] = WEIGHT_MAP
    heads: ClassVar[FamilyHeads | None] = None

    def __init__(
        self, *, vocab_size: int, d_model: int, d_kv: int, d_ff: int, num_layers: int,
        num_heads: int, buckets: int, max_distance: int, eps: float, gated: bool, act: str,
        attention: Attention,
    ) -> None:
        super().__init__()
        # No position table: any length is computed (the buckets saturate). The input limit is
        # sentence-transformers', which T5's n_positions does not cap (shared/modelinfo.py).
        self.max_positions = NO_LENGTH_LIMIT
        self.embed = nn.Embedding(vocab_size, d_model)
        self.relative_bias = RelativePositionBias(buckets, num_heads, max_distance)
        mask = MaskSpec(bias=self.relative_bias, scale=1.0)
        self.layers = nn.ModuleList(
            T5Layer(
                d_model, eps,
                SelfAttention(d_model, num_heads, attention, bias=False, head_dim=d_kv,
                              mask=mask),
                GatedMLP(d_model, d_ff, act) if gated else MLP(d_model, d_ff, act, bias=False),
            )
            for _ in range(num_layers)
        )
        self.norm = RMSNorm(d_model, eps)

    @classmethod
    def from_config(cls, config: dict[str, Any], attention: Attention) -> Self:
        model_type = str(config.get("model_type"))
        if config.get("is_decoder"):
            raise refusal(model_type, "is_decoder=True (a decoder stack alone)")
        gated, act = feed_forward(config, model_type)
        with required_keys(model_type):
            return cls(
                vocab_size=int(config["vocab_size"]),
                d_model=int(config["d_model"]),
                d_kv=int(config["d_kv"]),
                d_ff=int(config["d_ff"]),
                num_layers=int(config["num_layers"]),
                num_heads=int(config["num_heads"]),
                buckets=int(config.get("relative_attention_num_buckets", 32)),
                max_distance=int(config.get("relative_attention_max_distance", 128)),
                eps=float(config.get("layer_norm_epsilon", 1e-6)),
                gated=gated, act=act,
                attention=attention,
            )

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor,
        meta: Any,
    ) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, meta)
        return self.norm(x)
